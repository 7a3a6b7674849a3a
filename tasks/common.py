"""What every stage task shares: the run context, the stage result, the state dir, the MLflow stage run.

A task is thin: it resolves its inputs, opens the stage's MLflow child run with the lineage tags,
calls one function in models/, and returns a small `StageResult` (refs, not weights) that Prefect
persists under the state dir.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from data_contracts.artifacts import ArtifactRef
from tasks.tracking import Tracker, mlflow_digest


class RunContext(BaseModel):
    """Per-flow-run settings handed to every task (not part of any cache key)."""

    state_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    code_version: str = "unknown"
    recipe: str = ""
    resumed_from: str | None = None


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
    }


def default_tracking_uri(state_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'mlflow.db'}"


def workdir_for(ctx: RunContext, stage: str, cache_key: str) -> Path:
    d = state_paths(ctx.state_dir)["work"] / f"{stage}-{cache_key[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=8)
def _tracker(uri: str, experiment: str, artifact_root: str) -> Tracker:
    return Tracker(uri, experiment, artifact_root)


def tracker_for(ctx: RunContext) -> Tracker:
    t = _tracker(ctx.tracking_uri, ctx.experiment, str(state_paths(ctx.state_dir)["artifacts"]))
    if not t.ok:  # the store was down when first asked: try again rather than stay dark all run
        _tracker.cache_clear()
        t = _tracker(ctx.tracking_uri, ctx.experiment, str(state_paths(ctx.state_dir)["artifacts"]))
    return t


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
            if ref.kind == "dataset":
                self.tracker.log_dataset(self.run_id, ref.path, f"{name}:{Path(ref.path).name}", ref.digest)

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
        if artifact_path and Path(output.path).is_dir():
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
        if ref.kind == "dataset":
            tracker.log_dataset(run_id, ref.path, f"{name}:{Path(ref.path).name}", ref.digest)
    tracker.log_metrics(run_id, [{"wall_seconds": wall_seconds}])
    tracker.end_run(run_id)
    return run_id


__all__ = ["RunContext", "StageResult", "StageRun", "mlflow_digest", "record_cache_hit", "state_paths", "workdir_for"]
