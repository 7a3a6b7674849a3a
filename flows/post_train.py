"""The post-train flow: a recipe becomes a DAG of cached Prefect tasks.

    fetch ─► evaluate ─► sft ─► evaluate ─► … (later: reward_model, grpo/ppo/dpo, sample, filter, refine)

Each stage's cache key = hash(stage, resolved config, input digests, stage code version); Prefect
persists the stage's small result (output refs) under `<state>/results`, so a rerun in any process
that shares the state dir takes finished stages as cache hits, and a killed training stage finds its
work dir (named by the same key) and resumes from its newest checkpoint.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from prefect import flow

from data_contracts.artifacts import ArtifactRef
from flows import runs
from flows.failures import explain, retry_unless_disk_full
from flows.state import configure_state_dir
from models.config import STAGE_KINDS, RecipeConfig, load_recipe, resolved
from models.engine import read_metrics
from models.faults import fault_point
from tasks.cache import git_code_version, stage_cache_key, stage_code_version
from tasks.common import RunContext, StageResult, default_tracking_uri, record_cache_hit, state_paths, tracker_for
from tasks.data import resolve_preferences, resolve_problems, resolve_sft_dataset
from tasks.evaluate import evaluate_checkpoint
from tasks.fetch import fetch_base
from tasks.progress import reporter
from tasks.samples import filter_stage, sample_stage
from tasks.train import train_stage
from tasks import evaluate as evaluate_mod
from tasks import fetch as fetch_mod
from tasks import samples as samples_mod
from tasks import train as train_mod


def _cache_key_fn(context, parameters: dict) -> str:
    return parameters["cache_key"]


def _cached(task_fn, *, results_dir: Path, retries: int):
    return task_fn.with_options(
        cache_key_fn=_cache_key_fn, persist_result=True, result_storage=Path(results_dir),
        retries=retries, retry_delay_seconds=5, retry_condition_fn=retry_unless_disk_full,
    )


def _call(task_fn, kwargs: dict, ctx: RunContext, config_for_run: dict, inputs: dict[str, ArtifactRef],
          run_name: str | None = None) -> tuple[StageResult, bool, float]:
    """Run a cached task; a cache hit whose output vanished from disk is recomputed."""
    t0 = time.perf_counter()
    state = task_fn(**kwargs, return_state=True)
    result: StageResult = state.result()  # raises the stage's error when it failed
    cached = state.name == "Cached"
    if cached and not result.output.verify():
        state = task_fn.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result, cached = state.result(), False
    wall = time.perf_counter() - t0
    if cached:
        run_id = record_cache_hit(ctx, result, inputs, config_for_run, wall, run_name)
        result = result.model_copy(update={"mlflow_run_id": run_id})
    reporter().stage_finished(kwargs.get("stage") or run_name or "", cached, wall)
    return result, cached, wall


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
        resumed_from=resumed_from,
    )
    tracker = tracker_for(ctx)
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
    try:
        summary = _run_stages(cfg, ctx, paths)
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
    summary.update(flow_run_id=flow_run_id, mlflow_parent_run_id=parent, recipe=cfg.name, smoke=smoke)
    summary["registered_model"] = _register_final(cfg, ctx, summary, smoke)
    summary["tracking_errors"] = len(tracker.errors)
    tracker.log_json(parent, summary, "summary.json")
    tracker.end_run(parent, "FINISHED")
    return summary


def _stage_data(cfg: RecipeConfig, paths: dict[str, Path]) -> dict[str, dict[str, ArtifactRef]]:
    """Every dataset a stage reads, resolved and validated before any stage trains."""
    data: dict[str, dict[str, ArtifactRef]] = {}
    for stage in cfg.stages:
        if stage == "sft":
            data[stage] = {"dataset": resolve_sft_dataset(cfg.sft.dataset, cfg.task, paths["datasets"], cfg.sft.split)}
        elif stage in ("grpo", "ppo", "sample"):
            prompts = cfg.stage_config(stage).prompts
            data[stage] = {"prompts": resolve_problems(prompts, cfg.task, paths["datasets"], split="train")}
        elif stage in ("dpo", "reward_model"):
            sc = cfg.stage_config(stage)
            data[stage] = ({"prompts": resolve_problems(sc.prompts, cfg.task, paths["datasets"], split="train")}
                           if sc.dataset == "onpolicy" else {"dataset": resolve_preferences(sc.dataset)})
    return data


def _run_stages(cfg: RecipeConfig, ctx: RunContext, paths: dict[str, Path]) -> dict[str, Any]:
    task_cfg = resolved(cfg.task)
    problems = resolve_problems(cfg.evaluate.dataset, cfg.task, paths["datasets"])
    data = _stage_data(cfg, paths)
    eval_cfg = resolved(cfg.evaluate)
    cached_task = functools.partial(_cached, results_dir=paths["results"], retries=cfg.retries)
    fetch_task, train_task = cached_task(fetch_base), cached_task(train_stage)
    eval_task, sample_task, filter_task = cached_task(evaluate_checkpoint), cached_task(sample_stage), cached_task(filter_stage)

    results: dict[str, StageResult] = {}
    rows: list[dict] = []
    model_ref: ArtifactRef | None = None
    flow_run_id = _flow_run_id()
    for stage in cfg.stages:
        runs.update(paths["root"], flow_run_id, current_stage=stage)
        fault_point("before-stage", stage)  # test-only (POSTTRAIN_FAULT): every earlier stage is persisted
        stage_cfg = resolved(cfg.stage_config(stage))
        if stage == "fetch":
            inputs: dict[str, ArtifactRef] = {}
            key_cfg = {"fetch": stage_cfg, "task": task_cfg if stage_cfg["uri"] == "builtin:tiny" else None}
            code = stage_code_version(fetch_mod.__name__, "models.recipes.pretrain")
            task_fn, kwargs = fetch_task, dict(config=stage_cfg, task_config=task_cfg)
            key_source = key_cfg
        elif stage in ("sample", "filter"):
            inputs = {"model": model_ref, **data[stage]} if stage == "sample" else {"samples": results["sample"].output}
            code = stage_code_version(samples_mod.__name__)
            task_fn, kwargs, key_source = (sample_task if stage == "sample" else filter_task), dict(config=stage_cfg), stage_cfg
        else:  # a training stage: sft, reward_model, dpo, grpo, ppo, refine (= sft on the filter's output)
            kind = "sft" if stage == "refine" else stage
            extra = {"dataset": results["filter"].output} if stage == "refine" else dict(data.get(stage, {}))
            if stage == "ppo" and "reward_model" in results:
                extra["reward_model"] = results["reward_model"].output
            inputs = {"model": model_ref, **extra}
            code = stage_code_version(train_mod.__name__, train_mod.RECIPES[kind].split(":")[0])
            task_fn, kwargs, key_source = train_task, dict(kind=kind, config=stage_cfg), stage_cfg
        key = stage_cache_key(stage, key_source, inputs, code)
        res, cached, wall = _call(task_fn, dict(stage=stage, cache_key=key, inputs=inputs, ctx=ctx, **kwargs),
                                  ctx, stage_cfg, inputs)
        results[stage] = res
        row = {"stage": stage, "cached": cached, "wall_seconds": round(wall, 3), "mlflow_run_id": res.mlflow_run_id,
               "output": {"path": res.output.path, "digest": res.output.digest}, "metrics": {},
               "train_metrics": res.metrics, "resumed_from_step": res.resumed_from_step, "cache_key": res.cache_key}
        if STAGE_KINDS[stage] == "checkpoint":
            model_ref = res.output
            ev, ev_cached, ev_wall = _evaluate(eval_task, stage, model_ref, problems, eval_cfg, ctx)
            row.update(cached=cached and ev_cached, wall_seconds=round(wall + ev_wall, 3), metrics=ev.metrics,
                       eval_mlflow_run_id=ev.mlflow_run_id)
        rows.append(row)
    summary = {"stages": rows, "final_model": {"path": model_ref.path, "digest": model_ref.digest,
                                               "mlflow_run_id": model_ref.run_id}}
    rl_curves = {s: read_metrics(r.extra["metrics_path"]) for s, r in results.items()
                 if s in ("grpo", "ppo") and r.extra.get("metrics_path")}
    summary["report_png"] = _report(summary, rl_curves, paths, ctx)
    return summary


def _register_final(cfg: RecipeConfig, ctx: RunContext, summary: dict, smoke: bool) -> str | None:
    """Register the recipe's final model (its stage run's `model` artifact) with lineage tags."""
    final = next((r for r in reversed(summary["stages"]) if STAGE_KINDS[r["stage"]] == "checkpoint"), None)
    producer = summary["final_model"].get("mlflow_run_id")
    if final is None or not producer:
        return None
    name = cfg.tracking.register_model or f"posttrain-{cfg.name}{'-smoke' if smoke else ''}"
    version = tracker_for(ctx).register_model(name, producer, "model", {
        "posttrain.stage": final["stage"], "posttrain.output_digest": summary["final_model"]["digest"],
        "posttrain.output_path": summary["final_model"]["path"], "posttrain.flow_run_id": summary["flow_run_id"],
        "posttrain.mlflow_parent_run_id": summary["mlflow_parent_run_id"], "posttrain.code_version": ctx.code_version,
        "posttrain.recipe": cfg.name,
    })
    return f"models:/{name}/{version}" if version else None


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
