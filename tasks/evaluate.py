"""evaluate_checkpoint: held-out greedy pass@1, sampled pass@k and maj@k of one checkpoint.

Cached on (checkpoint digest, problems digest, eval config, code), so a checkpoint is evaluated once.
Per-sample results are written as a dataset under the contract `data_contracts/evals.py`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from data_contracts.artifacts import ArtifactRef, digest_path
from data_contracts.evals import validate_evals
from data_contracts.io import write_jsonl_atomic
from tasks.common import RunContext, StageResult, StageRun, workdir_for
from models.data.problems import load_problems
from tasks.progress import reporter


def run_evaluation(model_path: str, problems: list[dict], config: dict) -> tuple[dict, list[dict]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.data import builtin_task
    from models.modeling.device import training_device
    from models.generation.evaluation import evaluate
    from models.rewards import get_reward

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(training_device())
    extract = {"builtin_task": builtin_task.extract_answer,
               "builtin_task_lenient": builtin_task.extract_answer_lenient}.get(config["reward"])
    return evaluate(
        model, tokenizer, problems, get_reward(config["reward"]), extract,
        num_problems=config["num_problems"], k=config["k"], temperature=config["temperature"],
        max_new_tokens=config["max_new_tokens"], batch_size=config["batch_size"], seed=config["seed"],
        stop_strings=tuple(config.get("stop_strings", ("</answer>",))), chat_template=config.get("chat_template"),
    )


@task(name="evaluate")
def evaluate_checkpoint(of_stage: str, cache_key: str, config: dict, inputs: dict[str, ArtifactRef],
                        ctx: RunContext) -> StageResult:
    stage = f"evaluate-{of_stage}"
    workdir = workdir_for(ctx, stage, cache_key)
    with StageRun(ctx, stage, cache_key, config, inputs) as run:
        reporter().stage_started(stage, None)
        metrics, rows = run_evaluation(inputs["model"].path, load_problems(inputs["problems"].path), config)
        out = Path(workdir) / "eval_results.jsonl"
        validate_evals(_frame(rows), str(out))
        write_jsonl_atomic(rows, out)
        output = ArtifactRef(kind="eval", path=str(out), digest=digest_path(out), run_id=run.run_id, stage=stage)
        run.tracker.log_metrics(run.run_id, [metrics], prefix="eval/")
        run.tracker.log_table(run.run_id, [r for r in rows if r["greedy"]][:64], "eval_samples.json")
        run.finish_output(output, artifact_path=None)
        # also on the evaluated stage's own run, so `metrics.eval/pass@1` filters find it
        upstream = inputs["model"].run_id
        if upstream:
            run.tracker.log_metrics(upstream, [metrics], prefix="eval/")
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=metrics, wall_seconds=run.elapsed)


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows).astype(object)
