"""Stages on work pools: a node with a `work_pool` runs as its own flow run on a worker of that pool.

    recipe flow (post-train) ──run_deployment("posttrain-stage/<pool>")──► worker of <pool>
                                                                          └─ posttrain_stage flow run:
                                                                             NodeRunner.run(node) — the same
                                                                             cached task + evaluation as
                                                                             in the recipe flow's process

Every pool a recipe names has one deployment of the `posttrain-stage` flow, named after the pool
(`posttrain pools deploy POOL…` creates the process pool when missing, then the deployment, from this
checkout). The recipe flow checks at its start, before any stage runs, that a Prefect server is set
and that every pool named exists and has that deployment; a pool with no live worker is only a
warning: its stages wait for one, and fail after `work_pool_start_timeout_s`.

The stage flow gets plain JSON: the node's name, the recipe (name or absolute path), overrides and
smoke flag, the run context (state dir, tracking URI, MLflow parent run id, code version), the
node's dataset refs, its upstream nodes' output refs, the evaluation problems and the cache key the
recipe flow computed. It loads the same recipe, plans the node again (a different key means the
worker's checkout differs: it fails saying so), runs the same cached task with the same result
storage (`<state>/results`), so a stage finished anywhere is a cache hit everywhere, and writes its
result to `<state>/stage-runs/<stage flow run id>.json`, which the recipe flow reads back. Its MLflow
runs are children of the recipe's parent run, tagged with the recipe's flow run id (as in one
process), plus `posttrain.prefect_stage_flow_run_id` and `posttrain.work_pool`. Workers therefore
need the state dir at the same path and the tracking server (or the SQLite file) in reach.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

STAGE_FLOW = "posttrain-stage"
ENTRYPOINT = "flows/pools.py:posttrain_stage"
REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.5  # how often the recipe flow reads a dispatched stage's state (one small API call)

class PoolError(RuntimeError):
    """A work pool a recipe names cannot take its stages, or a dispatched stage did not complete."""


def deployment_name(pool: str) -> str:
    return f"{STAGE_FLOW}/{pool}"


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _by_pool(cfg) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in cfg.graph():
        pool = cfg.work_pool(node.name)
        if pool:
            out.setdefault(pool, []).append(node.name)
    return out


def check_pools(cfg) -> dict[str, int]:
    """Before any stage runs: a Prefect server is set, every pool exists and has the stage deployment.
    Returns {pool: live workers}; a pool without one gets a warning (its stages wait for a worker)."""
    by_pool = _by_pool(cfg)
    if not by_pool:
        return {}
    where = "; ".join(f"{', '.join(nodes)} on {pool!r}" for pool, nodes in by_pool.items())
    api = _api_url()
    if not api:
        raise PoolError(f"work pools need a Prefect server ({where}): set PREFECT_API_URL=http://HOST:4200/api "
                        "to the server the pools' workers poll, or drop the nodes' work_pool to run them here")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    live: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        for pool, nodes in by_pool.items():
            fix = f"create it and its stage deployment with `posttrain pools deploy {pool}`"
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise PoolError(f"work pool {pool!r} (nodes {', '.join(nodes)}) does not exist on {api}: {fix}") from None
            try:
                client.read_deployment_by_name(deployment_name(pool))
            except ObjectNotFound:
                raise PoolError(f"work pool {pool!r} (nodes {', '.join(nodes)}) has no deployment "
                                f"{deployment_name(pool)!r} on {api}: {fix}") from None
            workers = client.read_workers_for_work_pool(pool)
            live[pool] = sum(1 for w in workers if w.status == WorkerStatus.ONLINE)
            if not live[pool]:
                _warn(f"work pool {pool!r} has no live worker: nodes {', '.join(nodes)} wait for one "
                      f"(`prefect worker start --pool {pool}`) and fail after {cfg.work_pool_start_timeout_s:g} s")
    return live


def _warn(msg: str) -> None:
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        from prefect import get_run_logger

        get_run_logger().warning(msg)  # in the flow run's logs (a worker's or served run's too)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _recipe_ref(recipe: str) -> str:
    """What a worker loads: a shipped recipe by name, a recipe file by absolute path (it must be
    readable there too, like the state dir)."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe or os.sep in recipe:
        return str(Path(recipe).expanduser().resolve())
    return recipe


def dispatch(pool: str, node, cfg, ctx, source: dict[str, Any], data: dict, upstream: dict, problems, cache_key: str,
             flow_run_id: str):
    """Run one node as a `posttrain-stage` flow run on `pool`; (StageResult, summary row) once it completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling

    from tasks.common import StageResult, state_paths
    from tasks.progress import reporter

    params = {
        "node": node.name, "recipe": _recipe_ref(str(source.get("recipe") or cfg.name)),
        "overrides": list(source.get("overrides") or []), "smoke": bool(source.get("smoke")),
        "ctx": ctx.model_dump(mode="json"),
        "data": {k: r.model_dump(mode="json") for k, r in data.items()},
        "upstream": {k: r.model_dump(mode="json") for k, r in upstream.items()},
        "problems": problems.model_dump(mode="json"), "cache_key": cache_key,
        "parent_flow_run_id": flow_run_id, "work_pool": pool,
    }
    t0 = time.perf_counter()
    fr = run_deployment(name=deployment_name(pool), parameters=params, timeout=0,
                        flow_run_name=f"{ctx.recipe}-{node.name}", tags=["posttrain", f"stage:{node.name}"])
    what = f"stage {node.name!r} on work pool {pool!r}: flow run {fr.id} ({fr.name})"
    deadline = time.monotonic() + cfg.work_pool_start_timeout_s
    started = False
    with get_client(sync_client=True) as client:
        try:
            while True:
                fr = client.read_flow_run(fr.id)
                st = fr.state
                if st is not None and st.is_final():
                    break
                started = started or (st is not None and st.type not in (StateType.SCHEDULED, StateType.PENDING))
                if not started and time.monotonic() > deadline:
                    client.set_flow_run_state(fr.id, Cancelled(message="no worker started it"), force=True)
                    raise PoolError(f"{what}: no worker of the pool started it within "
                                    f"{cfg.work_pool_start_timeout_s:g} s (work_pool_start_timeout_s); "
                                    f"start one with `prefect worker start --pool {pool}`")
                time.sleep(POLL_SECONDS)
        except BaseException as e:  # interrupted (Ctrl-C, SIGTERM) or failed: the stage's run ends too
            if not isinstance(e, PoolError):
                try:
                    client.set_flow_run_state(fr.id, Cancelling(message="the recipe flow ended"), force=True)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            raise
    wall = time.perf_counter() - t0
    if st.type != StateType.COMPLETED:
        raise PoolError(f"{what} ended {st.type.value} ({st.name}): {st.message or 'no message'}")
    out = state_paths(ctx.state_dir)["root"] / "stage-runs" / f"{fr.id}.json"
    if not out.exists():
        raise PoolError(f"{what} completed but wrote no result at {out}: does the worker see the same state dir?")
    got = json.loads(out.read_text())
    res = StageResult.model_validate(got["result"])
    row = dict(got["row"], work_pool=pool, stage_flow_run_id=str(fr.id), dispatch_seconds=round(wall, 3))
    reporter().stage_finished(node.name, row["cached"], wall)
    return res, row


@flow(name=STAGE_FLOW)
def posttrain_stage(node: str, recipe: str, overrides: list[str], smoke: bool, ctx: dict[str, Any],
                    data: dict[str, Any], upstream: dict[str, Any], problems: dict[str, Any], cache_key: str,
                    parent_flow_run_id: str, work_pool: str) -> dict[str, Any]:
    """One node of a recipe flow run, on a worker of a work pool (see the module docstring)."""
    from prefect.runtime import flow_run

    from flows.state import configure_state_dir, prepare_environment

    prepare_environment(ctx["state_dir"])  # what `posttrain run` sets (ops cache, telemetry off); never overrides
    from data_contracts.artifacts import ArtifactRef
    from flows.post_train import NodeRunner
    from models.config import load_recipe
    from tasks.common import RunContext, state_paths

    cfg = load_recipe(recipe, overrides, smoke=smoke)
    run_ctx = RunContext.model_validate(ctx)
    paths = state_paths(configure_state_dir(run_ctx.state_dir))
    refs = lambda d: {k: ArtifactRef.model_validate(v) for k, v in d.items()}  # noqa: E731
    runner = NodeRunner(cfg, run_ctx, paths, ArtifactRef.model_validate(problems))
    res, row = runner.run(cfg.node(node), refs(data), refs(upstream), expect_key=cache_key)
    me = str(flow_run.id or "")
    tags = {"posttrain.prefect_flow_run_id": parent_flow_run_id, "posttrain.prefect_stage_flow_run_id": me,
            "posttrain.work_pool": work_pool}
    for run_id in (res.mlflow_run_id, row.get("eval_mlflow_run_id")):
        if run_id:  # lineage names the recipe's flow run, as when the stage runs in its process
            runner.tracker.set_tags(run_id, tags)
    got = {"result": res.model_dump(mode="json"), "row": row}
    out = paths["root"] / "stage-runs" / f"{me}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(got))
    os.replace(tmp, out)
    return {"stage": node, "output_digest": res.output.digest, "cached": row["cached"]}


def deploy(pool: str, repo: str | None = None, create_pool: bool = True) -> dict[str, Any]:
    """Create the process work pool (when missing and `create_pool`) and upsert the pool's
    `posttrain-stage/<pool>` deployment, run from `repo` (default: this checkout)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    if not _api_url():
        raise PoolError("work pools live on a Prefect server: set PREFECT_API_URL=http://HOST:4200/api first")
    repo = str(Path(repo or REPO_ROOT).resolve())
    with get_client(sync_client=True) as client:
        created = False
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            if not create_pool:
                raise PoolError(f"work pool {pool!r} does not exist (create it: prefect work-pool create {pool} "
                                "--type process)") from None
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            created = True
        flow_id = client.create_flow_from_name(STAGE_FLOW)
        dep_id = client.create_deployment(
            flow_id=flow_id, name=pool, work_pool_name=pool, entrypoint=ENTRYPOINT,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": repo}}],
            parameter_openapi_schema=parameter_schema(posttrain_stage.fn).model_dump_for_openapi(),
            description=f"one posttrain stage on work pool {pool} (flows/pools.py)", tags=["posttrain", "stage"],
        )
    return {"pool": pool, "pool_created": created, "deployment": deployment_name(pool), "deployment_id": str(dep_id),
            "repo": repo}
