"""The post-train flow: a recipe becomes a DAG of cached Prefect tasks.

    fetch ─► evaluate ─► sft ─► evaluate ─► grpo ─► … (any graph of named nodes: models/stages.py)

The recipe resolves into nodes (name, kind, the upstream node on each port); `_run_graph` turns each
into one call of its kind's task from the registry, in a topological order, independent branches at
most `max_parallel_stages` at a time (flows/dag.py).

Each node's cache key = hash(kind, resolved config, input digests, stage code version); Prefect
persists the stage's small result (output refs) under `<state>/results`, so a rerun in any process
that shares the state dir takes finished stages as cache hits, and a killed training stage finds its
work dir (named by the same key) and resumes from its newest checkpoint.
"""

from __future__ import annotations

import functools
import importlib
import time
from pathlib import Path
from typing import Any

from prefect import flow

from data_contracts.artifacts import ArtifactRef
from flows import runs
from flows.dag import run_graph
from flows.failures import explain, retry_unless_disk_full
from flows.state import configure_state_dir
from models.config import KINDS, RecipeConfig, load_recipe, resolved
from models.training.engine import read_metrics
from models.training.faults import fault_point
from models.stages import Node
from tasks.cache import REPO_ROOT, git_code_version, stage_cache_key, stage_code_version
from tasks.common import (RunContext, StageResult, default_tracking_uri, record_cache_hit, start_tracking, state_paths,
                          tracker_for)
from tasks.data import MissingData, resolve_problems
from tasks.evaluate import evaluate_checkpoint
from tasks.locks import stage_lock
from tasks.progress import reporter
from tasks import evaluate as evaluate_mod


def _cache_key_fn(context, parameters: dict) -> str:
    return parameters["cache_key"]


def _cached(task_fn, *, results_dir: Path, retries: int):
    return task_fn.with_options(
        cache_key_fn=_cache_key_fn, persist_result=True, result_storage=Path(results_dir),
        retries=retries, retry_delay_seconds=5, retry_condition_fn=retry_unless_disk_full,
    )


def _call(task_fn, kwargs: dict, ctx: RunContext, config_for_run: dict, inputs: dict[str, ArtifactRef],
          run_name: str | None = None) -> tuple[StageResult, bool, float]:
    """Run a cached task; a cache hit whose output vanished from disk is recomputed.

    Look-up, computation and the publication of the result happen under the cache key's lock
    (tasks/locks.py): of the runs that need this key at once, one computes and the others wait and
    take the cache hit."""
    stage = kwargs.get("stage") or run_name or ""
    t0 = time.perf_counter()
    with stage_lock(ctx.state_dir, stage, kwargs["cache_key"], on_wait=lambda line: _tell(stage, line),
                    flow_run_id=_flow_run_id()) as waited:
        state = task_fn(**kwargs, return_state=True)
        result: StageResult = state.result()  # raises the stage's error when it failed
        cached = state.name == "Cached"
        if cached and not result.output.verify():
            state = task_fn.with_options(refresh_cache=True)(**kwargs, return_state=True)
            result, cached = state.result(), False
    wall = time.perf_counter() - t0
    if waited is not None and not cached:
        _tell(stage, f"{stage} was not finished by the run waited for (it failed or stopped): computed here")
    if cached:
        run_id = record_cache_hit(ctx, result, inputs, config_for_run, wall, run_name)
        result = result.model_copy(update={"mlflow_run_id": run_id})
    reporter().stage_finished(stage, cached, wall)
    return result, cached, wall


def _tell(stage: str, line: str) -> None:
    """A line for whoever watches: the CLI's progress display, and Prefect's log of the flow run
    (what a served or worker run shows)."""
    note = getattr(reporter(), "note", None)  # a reporter of an older interface has none
    if note is not None:
        note(stage, line)
    try:
        from prefect import get_run_logger

        get_run_logger().info(line)
    except Exception:  # noqa: BLE001 - outside a flow run: the reporter line is enough
        pass


@flow(name="post-train")
def post_train(
    recipe: str = "r1",
    overrides: list[str] | None = None,
    smoke: bool = False,
    state_dir: str = ".posttrain",
    tracking_uri: str | None = None,
    resumed_from: str | None = None,
) -> dict[str, Any]:
    """Run a recipe end to end; returns the run summary (what `--summary-json` writes)."""
    from prefect.runtime import flow_run

    cfg: RecipeConfig = load_recipe(recipe, overrides or [], smoke=smoke)
    paths = state_paths(configure_state_dir(state_dir))
    ctx = RunContext(
        state_dir=str(paths["root"]), tracking_uri=tracking_uri or default_tracking_uri(paths["root"]),
        experiment=cfg.tracking.experiment, code_version=git_code_version(), recipe=cfg.name,
        resumed_from=resumed_from, log_models=cfg.tracking.log_models,
    )
    tracker, replayed = start_tracking(ctx)  # first, what earlier runs queued while the store was down
    if replayed and replayed.get("journals"):
        runs.translate_run_ids(paths["root"], tracker.ids.ids)
    flow_run_id = str(flow_run.id or "")
    parent = tracker.start_run(
        f"{cfg.name}{'-smoke' if smoke else ''}", params={"recipe": cfg.name, "smoke": smoke, **resolved(cfg)},
        tags={"posttrain.recipe": cfg.name, "posttrain.smoke": str(smoke).lower(), "posttrain.kind": "flow",
              "posttrain.prefect_flow_run_id": flow_run_id, "posttrain.code_version": ctx.code_version,
              "posttrain.overrides": " ".join(overrides or []),
              **({"posttrain.resumed_from_run": resumed_from} if resumed_from else {})},
    )
    ctx = ctx.model_copy(update={"parent_run_id": parent})
    parameters = {"recipe": recipe, "overrides": list(overrides or []), "smoke": smoke,
                  "state_dir": str(paths["root"]), "tracking_uri": tracking_uri}
    runs.record_start(paths["root"], flow_run_id, parameters, parent, cfg.name, resumed_from)
    if resumed_from:
        _mark_crashed(resumed_from)
    try:
        summary = _run_graph(cfg, ctx, paths, source=parameters)
    except BaseException as e:
        advice = explain(e, paths["root"], flow_run_id)
        runs.record_end(paths["root"], flow_run_id, "FAILED", advice or f"{type(e).__name__}: {e}"[:2000])
        if advice:  # worker/served runs: the advice shows in Prefect's logs and on the parent run
            from prefect import get_run_logger

            get_run_logger().error(advice)
            tracker.set_tags(parent, {"posttrain.error": advice[:8000]})
        tracker.end_run(parent, "FAILED")
        raise
    runs.record_end(paths["root"], flow_run_id, "COMPLETED")
    summary.update(flow_run_id=flow_run_id, mlflow_parent_run_id=parent)  # recipe, smoke: _run_graph
    summary["registered_model"] = _register_final(cfg, ctx, summary, smoke)
    summary["tracking_errors"] = len(tracker.errors)
    summary["tracking_queued"] = tracker.queued  # calls waiting in the state dir for `posttrain sync`
    summary["tracking_queue"] = str(tracker.journal.path) if tracker.journal else None
    summary["tracking_replayed"] = replayed
    tracker.log_json(parent, summary, "summary.json")
    tracker.end_run(parent, "FINISHED")
    return summary


def _task(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def preflight(cfg: RecipeConfig, state_dir: str | Path) -> None:
    """The checks that need no stage's output, run by the CLI before Prefect and MLflow start: every
    node's own datasets against their contracts, and a local fetch.uri (DeepSpeed JSONs are checked
    when the recipe loads). Raises what the flow would raise later (ContractError, FileNotFoundError)."""
    from tasks.fetch import check_uri

    for n in cfg.graph():
        if n.kind == "fetch":
            check_uri(n.config.uri)
    paths = state_paths(configure_state_dir(str(state_dir)))
    _node_data(cfg, paths)
    resolve_problems(cfg.evaluate.dataset, cfg.task, paths["datasets"], key="evaluate.dataset")


def _node_data(cfg: RecipeConfig, paths: dict[str, Path]) -> dict[str, dict[str, ArtifactRef]]:
    """Every dataset a node reads from its own settings, resolved and validated before any stage runs."""
    data = {}
    for n in cfg.graph():
        try:
            data[n.name] = _task(n.spec.data)(n.config, cfg.task, paths["datasets"]) if n.spec.data else {}
        except MissingData as e:
            raise e.at(n.name) from None
    return data


def plan_node(node: Node, cfg: RecipeConfig, data: dict[str, ArtifactRef],
              upstream: dict[str, ArtifactRef]) -> tuple[str, dict, dict[str, ArtifactRef], dict]:
    """(cache key, resolved settings, inputs, task kwargs) of a node, given its upstream nodes' outputs.

    The key hashes the node's kind (not its name), so the same node in two recipes is one result."""
    spec, stage_cfg = node.spec, resolved(node.config)
    ported = {spec.ports[port].input: upstream[src] for port, src in node.inputs.items()}
    start = {"model": ported.pop("model")} if "model" in ported else {}
    inputs = {**start, **data, **ported}  # the start checkpoint, own datasets, then data ports
    key_source, kwargs = stage_cfg, dict(config=stage_cfg)
    if spec.takes_task_config:  # fetch: the built-in model is pretrained on the built-in task's corpus
        task_cfg = resolved(cfg.task)
        key_source = {node.kind: stage_cfg, "task": task_cfg if stage_cfg["uri"] == "builtin:tiny" else None}
        kwargs["task_config"] = task_cfg
    if spec.recipe:
        kwargs["kind"] = node.kind
    key = stage_cache_key(node.kind, key_source, inputs, stage_code_version(*spec.code))
    return key, stage_cfg, inputs, kwargs


def _import_stage_code(cfg: RecipeConfig) -> None:
    """Import, in this thread, what the graph's stages import when they start. transformers resolves
    its names lazily and that is not thread-safe: two branches starting at once in worker threads
    have failed with `cannot import name 'AutoModelForCausalLM' from 'transformers'`."""
    import importlib

    import transformers

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast"):
        getattr(transformers, name)
    for module in ("deepspeed", "peft", "models.training.engine", "models.generation.rollouts"):
        importlib.import_module(module)
    for node in cfg.graph():
        if node.spec.recipe:
            importlib.import_module(node.spec.recipe.split(":")[0])


class NodeRunner:
    """Runs one node here: its kind's cached task, then its evaluation when it makes a checkpoint.

    The flow's process uses it for every node it runs itself; a node placed on a work pool runs it in
    a `posttrain-stage` flow run on a worker of that pool (flows/pools.py), with the same arguments,
    so the cache keys, cache hits, MLflow child runs and lineage tags are the same either way."""

    def __init__(self, cfg: RecipeConfig, ctx: RunContext, paths: dict[str, Path], problems: ArtifactRef):
        self.cfg, self.ctx, self.paths, self.problems = cfg, ctx, paths, problems
        self.eval_cfg = resolved(cfg.evaluate)
        cached_task = functools.partial(_cached, results_dir=paths["results"], retries=cfg.retries)
        self.eval_task = cached_task(evaluate_checkpoint)
        self.tasks = {kind: cached_task(_task(spec.task)) for kind, spec in KINDS.items()}
        self.tracker = tracker_for(ctx)

    def run(self, node: Node, data: dict[str, ArtifactRef], upstream: dict[str, ArtifactRef],
            expect_key: str | None = None) -> tuple[StageResult, dict]:
        key, stage_cfg, inputs, kwargs = plan_node(node, self.cfg, data, upstream)
        if expect_key is not None and key != expect_key:
            raise RuntimeError(
                f"stage {node.name!r}: this process computes cache key {key}, the flow that dispatched it "
                f"{expect_key}: the code or recipe here differs from the flow's (checkout {REPO_ROOT})")
        ctx = self.ctx
        res, cached, wall = _call(self.tasks[node.kind],
                                  dict(stage=node.name, cache_key=key, inputs=inputs, ctx=ctx, **kwargs),
                                  ctx, stage_cfg, inputs, run_name=node.name)
        self.tracker.set_tags(res.mlflow_run_id, {"posttrain.stage_kind": node.kind})
        row = stage_row(node, res, cached, wall)
        if node.spec.output == "checkpoint":
            ev, ev_cached, ev_wall = _evaluate(self.eval_task, node.name, res.output, self.problems, self.eval_cfg, ctx)
            row.update(cached=cached and ev_cached, wall_seconds=round(wall + ev_wall, 3), metrics=ev.metrics,
                       eval_mlflow_run_id=ev.mlflow_run_id)
        return res, row


def stage_row(node: Node, res: StageResult, cached: bool, wall: float) -> dict[str, Any]:
    """A node's row of the run summary (before its evaluation is added); an RL stage that found its
    "aha" step (tag `posttrain.aha_step` on its run) also has it here, for the report and the JSON."""
    row = {"stage": node.name, "kind": node.kind, "cached": cached, "wall_seconds": round(wall, 3),
           "mlflow_run_id": res.mlflow_run_id, "output": {"path": res.output.path, "digest": res.output.digest},
           "metrics": {}, "train_metrics": res.metrics, "resumed_from_step": res.resumed_from_step,
           "cache_key": res.cache_key, "inputs": dict(node.inputs)}
    if res.extra.get("aha_step") is not None:
        row["aha_step"] = res.extra["aha_step"]
    return row


def _run_graph(cfg: RecipeConfig, ctx: RunContext, paths: dict[str, Path],
               source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DAG: each node of the recipe becomes one cached task call (then an evaluation, when it
    makes a checkpoint), once the nodes feeding it are done; a node placed on a work pool runs as a
    flow run on a worker of that pool. `source`: the flow's recipe, overrides and smoke (what a
    worker loads the recipe from)."""
    if cfg.work_pools:  # before anything runs: every pool named exists and has the stage deployment
        from flows import pools

        pools.check_pools(cfg)
    problems = resolve_problems(cfg.evaluate.dataset, cfg.task, paths["datasets"], key="evaluate.dataset")
    data = _node_data(cfg, paths)
    runner = NodeRunner(cfg, ctx, paths, problems)
    flow_run_id = _flow_run_id()

    def run_node(node: Node, upstream: dict[str, StageResult]) -> tuple[StageResult, dict]:
        runs.update(paths["root"], flow_run_id, current_stage=node.name)
        fault_point("before-stage", node.name)  # test-only (POSTTRAIN_FAULT): every earlier stage is persisted
        refs = {n: r.output for n, r in upstream.items()}
        pool = cfg.work_pool(node.name)
        if pool is None:
            return runner.run(node, data[node.name], refs)
        from flows import pools

        key = plan_node(node, cfg, data[node.name], refs)[0]
        return pools.dispatch(pool, node, cfg, ctx, source or {"recipe": cfg.name}, data[node.name], refs, problems,
                              key, flow_run_id)

    if cfg.max_parallel_stages > 1:
        _import_stage_code(cfg)
    done = run_graph(cfg.graph(), lambda node, up: run_node(node, {n: r for n, (r, _) in up.items()}),
                     cfg.max_parallel_stages)
    rows = [done[n.name][1] for n in cfg.graph()]
    final = done[cfg.final_node().name][0].output
    summary = {"stages": rows, "final_model": {"path": final.path, "digest": final.digest, "mlflow_run_id": final.run_id,
                                               "stage": cfg.final_node().name},
               "recipe": cfg.name, "smoke": bool((source or {}).get("smoke", False))}  # the report's title
    rl_curves = {n.name: read_metrics(done[n.name][0].extra["metrics_path"]) for n in cfg.graph()
                 if n.spec.rl_curve and done[n.name][0].extra.get("metrics_path")}
    summary["report_png"] = _report(summary, rl_curves, paths, ctx)
    return summary


def _register_final(cfg: RecipeConfig, ctx: RunContext, summary: dict, smoke: bool) -> str | None:
    """Register the recipe's final model (its stage run's `model` artifact) with lineage tags."""
    producer = summary["final_model"].get("mlflow_run_id")
    if not producer:
        return None
    tracker_for(ctx).set_tags(ctx.parent_run_id, {"posttrain.final_run_id": producer})  # lineage of the flow run
    if cfg.tracking.log_models == "none":
        return None  # the registry points at a logged copy: nothing was copied
    if cfg.tracking.log_models == "final" and not tracker_for(ctx).has_artifact(producer, "model"):
        tracker_for(ctx).log_artifacts(producer, summary["final_model"]["path"], "model")
    name = cfg.tracking.register_model or f"posttrain-{cfg.name}{'-smoke' if smoke else ''}"
    version = tracker_for(ctx).register_model(name, producer, "model", {
        "posttrain.stage": summary["final_model"]["stage"], "posttrain.output_digest": summary["final_model"]["digest"],
        "posttrain.output_path": summary["final_model"]["path"], "posttrain.flow_run_id": summary["flow_run_id"],
        "posttrain.mlflow_parent_run_id": summary["mlflow_parent_run_id"], "posttrain.code_version": ctx.code_version,
        "posttrain.recipe": cfg.name,
    })
    return f"models:/{name}/{version}" if version else None


def _mark_crashed(flow_run_id: str) -> None:
    """A run killed outright (SIGKILL, Ctrl-C's fast exit) never told Prefect it ended: its flow run
    would stay RUNNING on the server for good. Its resume records it as CRASHED (best effort)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message="its process died; `posttrain resume` "
                                                               "continues it as a new flow run"), force=True)
    except Exception:  # noqa: BLE001 - another Prefect API (the old run's temporary one), or none: nothing to fix
        pass


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _report(summary: dict, rl_curves: dict, paths: dict[str, Path], ctx: RunContext) -> str | None:
    from prefect.runtime import flow_run

    from models.report import plot_report

    out = paths["root"] / "reports" / f"{flow_run.id or 'run'}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_report(summary, rl_curves, out)
    tracker_for(ctx).log_artifact(ctx.parent_run_id, str(out), "report")
    return str(out)


def _evaluate(eval_task, of_stage: str, model_ref: ArtifactRef, problems: ArtifactRef, eval_cfg: dict,
              ctx: RunContext):
    inputs = {"model": model_ref, "problems": problems}
    key = stage_cache_key("evaluate", eval_cfg, inputs, stage_code_version(evaluate_mod.__name__))
    return _call(eval_task, dict(of_stage=of_stage, cache_key=key, config=eval_cfg, inputs=inputs, ctx=ctx),
                 ctx, eval_cfg, inputs, run_name=f"evaluate-{of_stage}")
