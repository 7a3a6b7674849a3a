"""fetch_base: resolve a checkpoint URI into an HF directory + content digest.

- `builtin:tiny`: pretrain the built-in tiny Llama on the built-in corpus (a real training stage on
  the DeepSpeed loop: checkpoints, resume, metrics);
- a local HF directory (used in place);
- `hf://org/name@revision`: huggingface_hub snapshot (honours HF_HUB_OFFLINE and the local cache);
- `models:/name/version`: downloaded from the MLflow model registry into the stage's work dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import task

from data_contracts.artifacts import ArtifactRef, digest_path
from models.launch import run_training
from tasks.common import RunContext, StageResult, StageRun, state_paths, workdir_for
from tasks.progress import reporter
from tasks.tracking import download_model_version


def find_hf_dir(root: Path) -> Path:
    """The directory holding config.json (MLflow may nest the files one or two levels down)."""
    if (root / "config.json").exists():
        return root
    hits = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not hits:
        raise FileNotFoundError(f"{root}: no config.json: not a Hugging Face model directory")
    return hits[0].parent


def resolve_uri(uri: str, workdir: Path, ctx: RunContext) -> Path:
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, _, revision = uri.removeprefix("hf://").partition("@")
        return find_hf_dir(Path(snapshot_download(repo_id=repo, revision=revision or None)))
    if uri.startswith("models:/"):
        out = workdir / "output"
        if not (out / ".complete").exists():
            tmp = workdir / f"download.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            download_model_version(ctx.tracking_uri, uri, str(tmp))
            src = find_hf_dir(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(src, out)
            shutil.rmtree(tmp, ignore_errors=True)
            (out / ".complete").write_text("ok\n")
        return out
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"fetch.uri: {uri}: not a directory, builtin:tiny, hf://… or models:/…")
    return find_hf_dir(path)


@task(name="fetch")
def fetch_base(stage: str, cache_key: str, config: dict, task_config: dict, inputs: dict[str, ArtifactRef],
               ctx: RunContext) -> StageResult:
    workdir = workdir_for(ctx, stage, cache_key)
    uri = config["uri"]
    with StageRun(ctx, stage, cache_key, {"uri": uri, **({"pretrain": config["pretrain"], "task": task_config}
                                                         if uri == "builtin:tiny" else {})}, inputs) as run:
        metrics, resumed = {}, None
        if uri == "builtin:tiny":
            pre = config["pretrain"]
            rep = reporter()
            rep.stage_started(stage, pre["max_steps"])
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(state_paths(ctx.state_dir)["ops"]))
            res = run_training(
                "models.recipes.pretrain:train_pretrain",
                {"config": pre, "task": task_config, "workdir": str(workdir)},
                pre["world_size"], workdir, on_log=lambda m: rep.update(stage, m),
            )
            path, resumed = Path(res["output_dir"]), res["resumed_from_step"]
            from models.engine import read_metrics

            rows = read_metrics(res["metrics_path"])
            run.tracker.log_metrics(run.run_id, rows, prefix="train/")
            metrics = {f"train/{k}": v for k, v in (rows[-1] if rows else {}).items() if k != "step"}
            run.tracker.set_tags(run.run_id, {"posttrain.num_params": res.get("num_params", "")})
            if resumed is not None:
                run.tracker.set_tags(run.run_id, {"posttrain.resumed_from_step": resumed})
        else:
            path = resolve_uri(uri, workdir, ctx)
        output = ArtifactRef(kind="model", path=str(path), digest=digest_path(path), run_id=run.run_id, stage=stage)
        run.finish_output(output)
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=metrics, resumed_from_step=resumed, wall_seconds=run.elapsed)
