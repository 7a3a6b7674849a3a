"""sample_stage and filter_stage: rejection sampling as two cached stages of the DAG.

sample: N scored candidates per prompt from a checkpoint → a samples dataset (contract
`data_contracts/samples.py`) with its digest. filter: composable filters → the kept samples and the
SFT file the `refine` stage trains on, with the count each filter removed logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from data_contracts.artifacts import ArtifactRef, digest_path
from data_contracts.io import read_table, write_jsonl_atomic
from data_contracts.samples import validate_samples
from data_contracts.sft import validate_sft
from tasks.common import RunContext, StageResult, StageRun, workdir_for
from models.data.problems import load_problems
from tasks.progress import reporter


@task(name="sample")
def sample_stage(stage: str, cache_key: str, config: dict, inputs: dict[str, ArtifactRef],
                 ctx: RunContext) -> StageResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.recipes.sample_filter_config import SampleConfig
    from models.modeling.device import training_device
    from models.generation.rejection_sampling import generate_samples

    workdir = workdir_for(ctx, stage, cache_key)
    with StageRun(ctx, stage, cache_key, config, inputs) as run:
        reporter().stage_started(stage, None)
        cfg = SampleConfig.model_validate(config)
        path = inputs["model"].path
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(training_device())
        df = generate_samples(model, tokenizer, load_problems(inputs["prompts"].path), cfg)
        out = Path(workdir) / "samples.jsonl"
        validate_samples(df, str(out))
        write_jsonl_atomic(df, out)
        output = ArtifactRef(kind="dataset", path=str(out), digest=digest_path(out), run_id=run.run_id, stage=stage)
        reward_cols = [c for c in df.columns if c.startswith("reward/")]
        metrics = {"num_samples": float(len(df)), "total_mean": float(df["total"].mean()),
                   "length_mean": float(df["length"].mean()),
                   **{f"{c}_mean": float(df[c].astype(float).mean()) for c in reward_cols}}
        run.tracker.log_metrics(run.run_id, [metrics], prefix="sample/")
        run.tracker.log_dataset(run.run_id, str(out), "samples", output.digest, context="output")
        run.tracker.log_table(run.run_id, df.head(64).to_dict("records"), "samples_head.json")
        run.finish_output(output, artifact_path=None)
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=metrics, wall_seconds=run.elapsed)


@task(name="filter")
def filter_stage(stage: str, cache_key: str, config: dict, inputs: dict[str, ArtifactRef],
                 ctx: RunContext) -> StageResult:
    from models.algorithms.filters import apply_filters
    from models.recipes.sample_filter_config import FilterConfig
    from models.generation.rejection_sampling import samples_to_sft

    workdir = workdir_for(ctx, stage, cache_key)
    with StageRun(ctx, stage, cache_key, config, inputs) as run:
        reporter().stage_started(stage, None)
        src = inputs["samples"].path
        df = validate_samples(read_table(src), src)
        kept, report = apply_filters(df, FilterConfig.model_validate(config))  # NothingSurvivedError fails the stage
        for row in report:
            run.tracker.log_metrics(run.run_id, [{f"filter/{row['filter']}/removed": row["removed"],
                                                  f"filter/{row['filter']}/after": row["after"]}])
        kept_path = Path(workdir) / "kept_samples.jsonl"
        write_jsonl_atomic(kept, kept_path)
        sft = samples_to_sft(kept)
        sft_path = Path(workdir) / "refine_sft.jsonl"
        validate_sft(sft, str(sft_path))
        write_jsonl_atomic(sft, sft_path)
        output = ArtifactRef(kind="dataset", path=str(sft_path), digest=digest_path(sft_path), run_id=run.run_id,
                             stage=stage)
        metrics = {"kept": float(len(kept)), "input": float(len(df)),
                   "prompts_kept": float(kept["prompt_id"].nunique())}
        run.tracker.log_metrics(run.run_id, [metrics], prefix="filter/")
        run.tracker.log_json(run.run_id, report, "filter_report.json")
        run.tracker.log_dataset(run.run_id, str(sft_path), "refine_sft", output.digest, context="output")
        run.finish_output(output, artifact_path=None)
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=metrics, wall_seconds=run.elapsed,
                           extra={"report": report, "kept_samples": str(kept_path)})
