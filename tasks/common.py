"""What every stage task shares: the run context, the stage result, the state dir, the MLflow stage run.

A task is thin: it resolves its inputs, opens the stage's MLflow child run with the lineage tags,
calls one function in models/, and returns a small `StageResult` (refs, not weights) that Prefect
persists under the state dir.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from data_contracts.artifacts import EXTERNAL_KINDS, ArtifactRef
from tasks.tracking import Tracker, mlflow_digest

log = logging.getLogger("posttrain.tracking")


class RunContext(BaseModel):
    """Per-flow-run settings handed to every task (not part of any cache key)."""

    state_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    code_version: str = "unknown"
    recipe: str = ""
    resumed_from: str | None = None
    log_models: str = "all"  # tracking.log_models: which outputs are copied into MLflow


class StageResult(BaseModel):
    stage: str
    output: ArtifactRef
    mlflow_run_id: str | None = None
    cache_key: str
    metrics: dict[str, float] = Field(default_factory=dict)
    resumed_from_step: int | None = None
    wall_seconds: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)


def state_paths(state_dir: str | os.PathLike) -> dict[str, Path]:
    root = Path(state_dir).resolve()
    return {
        "root": root,
        "work": root / "work",
        "results": root / "results",
        "datasets": root / "datasets",
        "artifacts": root / "mlartifacts",
        "prefect": root / "prefect",
        "ops": root / "torch_extensions",
        "models": root / "models",
        "tracking_queue": root / "tracking-queue",
    }


def default_tracking_uri(state_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'mlflow.db'}"


def workdir_for(ctx: RunContext, stage: str, cache_key: str) -> Path:
    d = state_paths(ctx.state_dir)["work"] / f"{stage}-{cache_key[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


_TRACKERS: dict[tuple[str, ...], Tracker] = {}
_TRACKERS_LOCK = threading.Lock()


def tracker_for(ctx: RunContext, fresh: bool = False) -> Tracker:
    """The process's tracker for this store, made once (parallel branches share it). One that went
    offline stays offline and queues (asking a dead store again at every stage cost a timeout each);
    `fresh` replaces an offline one with a new connection (a flow's start)."""
    paths = state_paths(ctx.state_dir)
    key = (ctx.tracking_uri, ctx.experiment, str(paths["artifacts"]), str(paths["tracking_queue"]))
    with _TRACKERS_LOCK:
        t = _TRACKERS.get(key)
        if t is not None and fresh and t.offline:
            t.journal.close()  # complete: the new tracker's replay may take it
        if t is None or (fresh and t.offline) or not (t.ok or t.offline):  # never connected: try again
            t = _TRACKERS[key] = Tracker(*key[:3], queue_dir=key[3])
        return t


def start_tracking(ctx: RunContext) -> tuple[Tracker, dict | None]:
    """A flow run's tracker, connected afresh if this process's last one went offline (a served
    process runs many flows), and the replay of what earlier runs queued for this store, if any."""
    tracker = tracker_for(ctx, fresh=True)
    if tracker.offline or not tracker.ok:
        return tracker, None
    try:
        report = replay_queued(ctx.state_dir, only_uri=ctx.tracking_uri)
    except Exception as e:  # noqa: BLE001 - the journals stay queued for `posttrain sync`
        log.warning("replaying queued tracking calls into %s failed: %s: %s", ctx.tracking_uri, type(e).__name__, e)
        return tracker, {"error": f"{type(e).__name__}: {e}"}
    tracker.ids.reload()  # results cached by the replayed runs name their placeholders
    return tracker, report


def replay_queued(state_dir: str | os.PathLike, only_uri: str | None = None, tracking_uri: str | None = None) -> dict | None:
    """Replay the state dir's queued tracking calls into their store (or `tracking_uri`); None if none."""
    from tasks.tracking_queue import pending_journals, replay

    queue = state_paths(state_dir)["tracking_queue"]
    if not pending_journals(queue):
        return None

    def open_tracker(uri: str, experiment: str, artifact_root: str | None) -> Tracker:
        return Tracker(uri, experiment, artifact_root, raise_errors=True)  # `replay` translates the ids itself

    return replay(queue, open_tracker, only_uri=only_uri, tracking_uri=tracking_uri)


def prefect_ids() -> tuple[str, str]:
    try:
        from prefect.runtime import flow_run, task_run

        return str(flow_run.id or ""), str(task_run.id or "")
    except Exception:  # noqa: BLE001 - outside a Prefect run (a direct .fn() call in a test)
        return "", ""


def lineage_tags(ctx: RunContext, stage: str, cache_key: str, inputs: dict[str, ArtifactRef], cached: bool) -> dict:
    flow_id, task_id = prefect_ids()
    return {
        "posttrain.stage": stage,
        "posttrain.recipe": ctx.recipe,
        "posttrain.cache_key": cache_key,
        "posttrain.inputs": json.dumps(
            [{"name": n, "kind": r.kind, "path": r.path, "digest": r.digest, "run_id": r.run_id} for n, r in inputs.items()]
        ),
        "posttrain.upstream_runs": json.dumps(sorted({r.run_id for r in inputs.values() if r.run_id})),
        "posttrain.code_version": ctx.code_version,
        "posttrain.prefect_flow_run_id": flow_id,
        "posttrain.prefect_task_run_id": task_id,
        "posttrain.cached": str(cached).lower(),
        **({"posttrain.resumed_from_run": ctx.resumed_from} if ctx.resumed_from else {}),
    }


class StageRun:
    """The MLflow child run of one stage execution; closes FAILED when the body raises."""

    def __init__(self, ctx: RunContext, stage: str, cache_key: str, config: dict, inputs: dict[str, ArtifactRef],
                 run_name: str | None = None):
        self.ctx, self.stage, self.inputs = ctx, stage, inputs
        self.tracker = tracker_for(ctx)
        self.t0 = time.perf_counter()
        self.run_id = self.tracker.start_run(
            run_name or stage, params=dict(config, stage=stage),
            tags=lineage_tags(ctx, stage, cache_key, inputs, cached=False), parent_run_id=ctx.parent_run_id,
        )
        for name, ref in inputs.items():
            if ref.kind in EXTERNAL_KINDS:
                self.tracker.log_dataset(self.run_id, ref.path, f"{name}:{Path(ref.path).name}", ref.digest,
                                         context="training" if ref.kind == "dataset" else ref.kind)

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.tracker.set_tags(self.run_id, {"posttrain.error": f"{type(exc).__name__}: {exc}"[:8000]})
            self.tracker.end_run(self.run_id, "FAILED")
        else:
            self.tracker.end_run(self.run_id, "FINISHED")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def finish_output(self, output: ArtifactRef, artifact_path: str | None = "model") -> None:
        self.tracker.set_tags(self.run_id, {"posttrain.output_digest": output.digest, "posttrain.output_path": output.path})
        if artifact_path and Path(output.path).is_dir() and self.ctx.log_models == "all":
            self.tracker.log_artifacts(self.run_id, output.path, artifact_path)


def record_cache_hit(ctx: RunContext, result: StageResult, inputs: dict[str, ArtifactRef], config: dict,
                     wall_seconds: float, run_name: str | None = None) -> str | None:
    """A cache hit still gets a stage run: it names the run that produced the result."""
    tracker = tracker_for(ctx)
    # the stage asking, which may differ from the one that produced the result (an evaluation of a
    # checkpoint that an earlier stage left unchanged is a cache hit of that stage's evaluation)
    stage = run_name or result.stage
    tags = lineage_tags(ctx, stage, result.cache_key, inputs, cached=True)
    tags.update({
        "posttrain.output_digest": result.output.digest,
        "posttrain.output_path": result.output.path,
        "posttrain.cached_from_run": result.mlflow_run_id or "",
    })
    run_id = tracker.start_run(stage, params=dict(config, stage=stage), tags=tags,
                               parent_run_id=ctx.parent_run_id)
    if result.metrics:
        tracker.log_metrics(run_id, [result.metrics])
    for name, ref in inputs.items():
        if ref.kind in EXTERNAL_KINDS:
            tracker.log_dataset(run_id, ref.path, f"{name}:{Path(ref.path).name}", ref.digest,
                                context="training" if ref.kind == "dataset" else ref.kind)
    tracker.log_metrics(run_id, [{"wall_seconds": wall_seconds}])
    tracker.end_run(run_id)
    return run_id


__all__ = ["RunContext", "StageResult", "StageRun", "mlflow_digest", "record_cache_hit", "replay_queued", "start_tracking",
           "state_paths", "tracker_for", "workdir_for"]
