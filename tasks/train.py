"""train_stage: one Prefect task for every stage that trains a checkpoint on the DeepSpeed loop.

The stage's kind picks the recipe function in models/recipes; the task only resolves inputs, opens
the MLflow stage run, launches the recipe (in-process or with torchrun), and records the output ref.
A killed stage rerun with the same cache key finds its work dir and resumes from the newest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task

from data_contracts.artifacts import ArtifactRef, digest_path
from models.training.engine import read_metrics
from models.training.launch import run_training
from models.algorithms.reasoning import aha_step
from models.modeling.lora import ADAPTER_DIR
from models.stages import KINDS
from tasks.common import RunContext, StageResult, StageRun, state_paths, workdir_for
from tasks.progress import reporter

# stage kind -> its recipe function (from the stage registry)
RECIPES = {kind: k.recipe for kind, k in KINDS.items() if k.recipe}


def build_spec(kind: str, config: dict, inputs: dict[str, ArtifactRef], workdir: str) -> dict:
    spec = {"config": config, "workdir": workdir, "base_path": inputs["model"].path}
    if "dataset" in inputs:
        spec["dataset_path"] = inputs["dataset"].path
    if "prompts" in inputs:
        spec["prompts_path"] = inputs["prompts"].path
    if "reward_model" in inputs:
        spec["reward_model_path"] = inputs["reward_model"].path
    return spec


def find_aha(rows: list[dict], rollouts: list[dict], config: dict) -> dict | None:
    """The RL stage's "aha" step (models.algorithms.reasoning.aha_step on its `aha_marker`'s rate) and the
    completions of the first logged rollout batch at or after it (the last one before, if none)."""
    marker = config.get("aha_marker")
    if not marker:
        return None
    step = aha_step(rows, f"marker/{marker}", config["aha_threshold"], config["aha_window"])
    if step is None:
        return None
    logged = sorted({r["step"] for r in rollouts})
    at = next((s for s in logged if s >= step), logged[-1] if logged else None)
    return {"step": step, "completions": [r for r in rollouts if r["step"] == at]}


@task(name="train")
def train_stage(stage: str, kind: str, cache_key: str, config: dict, inputs: dict[str, ArtifactRef],
                ctx: RunContext) -> StageResult:
    workdir = workdir_for(ctx, stage, cache_key)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(state_paths(ctx.state_dir)["ops"]))
    with StageRun(ctx, stage, cache_key, config, inputs) as run:
        rep = reporter()
        rep.stage_started(stage, config["max_steps"])
        res = run_training(RECIPES[kind], build_spec(kind, config, inputs, str(workdir)), config["world_size"],
                           workdir, on_log=lambda m: rep.update(stage, m))
        rows = read_metrics(res["metrics_path"])
        run.tracker.log_metrics(run.run_id, rows, prefix="train/")
        resumed = res.get("resumed_from_step")
        tags = {"posttrain.final_step": res["final_step"]}
        if resumed is not None:
            tags["posttrain.resumed_from_step"] = resumed
        run.tracker.set_tags(run.run_id, tags)
        output = ArtifactRef(kind="reward_model" if kind == "reward_model" else "model", path=res["output_dir"], digest=digest_path(res["output_dir"]),
                             run_id=run.run_id, stage=stage)
        run.finish_output(output)
        adapter = Path(output.path) / ADAPTER_DIR  # a LoRA stage's adapter alone, beside the merged model
        if adapter.is_dir():
            run.tracker.log_artifacts(run.run_id, str(adapter), ADAPTER_DIR)
        final = {f"train/{k}": v for k, v in (rows[-1] if rows else {}).items() if k != "step"}
        extra = {k: res[k] for k in ("num_examples", "dropped_examples", "truncated_examples", "unk_examples", "format",
                                  "num_problems", "metrics_path")
                 if k in res}
        if res.get("rollouts_path"):
            rollouts = read_metrics(res["rollouts_path"])  # JSONL rows, one per logged rollout
            run.tracker.log_table(run.run_id, rollouts, "rollouts.json")
            aha = find_aha(rows, rollouts, config)
            if aha is not None:
                extra["aha_step"] = aha["step"]
                run.tracker.set_tags(run.run_id, {"posttrain.aha_step": aha["step"]})
                run.tracker.log_table(run.run_id, aha["completions"], "aha_completions.json")
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=final, resumed_from_step=resumed, wall_seconds=run.elapsed, extra=extra)
