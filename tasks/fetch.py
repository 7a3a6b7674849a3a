"""fetch_base: resolve a checkpoint URI into an HF directory + content digest.

- `builtin:tiny`: pretrain the built-in tiny Llama on the built-in corpus (a real training stage on
  the DeepSpeed loop: checkpoints, resume, metrics);
- a local HF directory (used in place);
- `hf://org/name@revision`: huggingface_hub snapshot (honours HF_HUB_OFFLINE and the local cache);
- `models:/name/version`: downloaded from the MLflow model registry into the stage's work dir;
- a `.gguf` file (a path, `file://…`, or `pkg://<package>/<file>` inside an installed package):
  converted once into `<state>/models/gguf-<sha256[:16]>/` (see models/modeling/gguf.py). The file is the
  stage's `source` input, so its digest is in the cache key, the lineage tags and the run's inputs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import task

from data_contracts.artifacts import ArtifactRef, digest_path
from models.modeling.gguf import convert_gguf, gguf_path, is_gguf_uri
from models.training.launch import run_training
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


class FetchError(FileNotFoundError):
    """A fetch.uri that names no loadable model: one line naming fetch.uri, the file and the reason
    (a FileNotFoundError, so the CLI shows it as one `error:` line)."""


def _checked_loads(uri: str, path: Path) -> Path:
    """`path` (an HF dir) loads with AutoConfig, else a FetchError: a broken config.json would pass
    fetch and fail later in evaluate with a raw transformers error."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FetchError(f"fetch.uri {uri}: {path / 'config.json'} does not load: {reason}") from None
    return path


def _bounded_hub_client() -> None:
    """huggingface_hub's shared HTTP client has no timeout: a hub that accepts the connection and never
    answers hangs `snapshot_download` for ever. Give it HF_HUB_ETAG_TIMEOUT to connect and answer
    metadata calls and HF_HUB_DOWNLOAD_TIMEOUT between bytes of a download (10 s each by default)."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def bounded():
        client = default_client_factory()
        t = float(constants.HF_HUB_ETAG_TIMEOUT)
        client.timeout = httpx2.Timeout(t, connect=t, read=max(t, float(constants.HF_HUB_DOWNLOAD_TIMEOUT)))
        return client

    set_client_factory(bounded)


def _hub_snapshot(uri: str) -> Path:
    """The snapshot dir of `hf://org/name@revision`, from the hub or the offline cache; on failure
    one line naming fetch.uri, the repo and the cache looked in.

    huggingface_hub asks the hub for the revision's commit with no timeout at all, so that one call is
    made here, bounded by HF_HUB_ETAG_TIMEOUT; a hub that does not answer falls back to the cache."""
    from huggingface_hub import HfApi, constants, snapshot_download

    repo, _, revision = uri.removeprefix("hf://").partition("@")
    hub_error: Exception | None = None
    if not constants.HF_HUB_OFFLINE:
        _bounded_hub_client()
        try:
            timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
            revision = HfApi().repo_info(repo, revision=revision or None, timeout=timeout).sha
        except Exception as e:  # noqa: BLE001 - not found, timeout, refused: the cache may still hold it
            hub_error = e
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None,
                                      local_files_only=bool(hub_error or constants.HF_HUB_OFFLINE)))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; every one is this one line
        cause = hub_error or e.__cause__ or e
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        else:
            said = (str(cause).strip().splitlines() or ["no answer"])[0]
            why = f"the hub {constants.ENDPOINT} failed ({type(cause).__name__}: {said})"
        wanted = uri.removeprefix("hf://")
        raise FetchError(f"fetch.uri {uri}: {why}, and repo {wanted} is not in the offline cache "
                         f"{constants.HF_HUB_CACHE}") from None


def fetch_inputs(uri: str) -> dict[str, ArtifactRef]:
    """The files a fetch reads that no stage produced: {"source": the .gguf file} or {}.

    Raises FileNotFoundError (one line, naming fetch.uri) when the .gguf file is missing.
    """
    if not is_gguf_uri(uri):
        return {}
    try:
        path = gguf_path(uri)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"fetch.uri: {e}") from None
    return {"source": ArtifactRef(kind="source", path=str(path), digest=digest_path(path))}


def gguf_model_dir(ctx: RunContext, digest: str, dtype: str = "float32") -> Path:
    """Where the conversion of the .gguf file with this digest lives (shared by every run)."""
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return state_paths(ctx.state_dir)["models"] / f"gguf-{digest.removeprefix('sha256:')[:16]}{suffix}"


def resolve_uri(uri: str, workdir: Path, ctx: RunContext, gguf_dtype: str = "float32",
                source: ArtifactRef | None = None) -> Path:
    """The HF directory a fetch.uri names (`source`: the .gguf file's ref, when already digested)."""
    if is_gguf_uri(uri):
        src = source or fetch_inputs(uri)["source"]
        return convert_gguf(src.path, gguf_model_dir(ctx, src.digest, gguf_dtype), gguf_dtype, digest=src.digest)
    if uri.startswith("hf://"):
        return _checked_loads(uri, find_hf_dir(_hub_snapshot(uri)))
    if uri.startswith("models:/"):
        out = workdir / "output"
        if not (out / ".complete").exists():
            tmp = workdir / f"download.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                download_model_version(ctx.tracking_uri, uri, str(tmp))
            except Exception as e:  # noqa: BLE001 - MLflow's errors: one line naming the uri and the store
                shutil.rmtree(tmp, ignore_errors=True)
                raise FetchError(f"fetch.uri {uri}: not in the model registry of {ctx.tracking_uri} "
                                 f"({type(e).__name__}: {str(e)[:300]})") from e
            src = find_hf_dir(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(src, out)
            shutil.rmtree(tmp, ignore_errors=True)
            (out / ".complete").write_text("ok\n")
        return out
    return local_model_dir(uri)


def local_model_dir(uri: str) -> Path:
    """The HF directory a local `fetch.uri` (a path or file://…) names, checked to exist and load."""
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not path.exists():
        raise FetchError(f"fetch.uri {uri}: {path}: no such file or directory")
    if not path.is_dir():
        raise FetchError(f"fetch.uri: {uri}: not a directory, builtin:tiny, hf://…, models:/… or a .gguf file")
    return _checked_loads(uri, find_hf_dir(path))


def check_uri(uri: str) -> None:
    """What can be checked of a fetch.uri before the flow starts, without the network or the store:
    a local model dir exists and loads, a .gguf file is there (its digest is taken by the caller)."""
    if uri == "builtin:tiny" or uri.startswith(("hf://", "models:/")) or is_gguf_uri(uri):
        return
    local_model_dir(uri)


@task(name="fetch")
def fetch_base(stage: str, cache_key: str, config: dict, task_config: dict, inputs: dict[str, ArtifactRef],
               ctx: RunContext) -> StageResult:
    workdir = workdir_for(ctx, stage, cache_key)
    uri = config["uri"]
    inputs = inputs or fetch_inputs(uri)
    params = {"uri": uri, **({"pretrain": config["pretrain"], "task": task_config} if uri == "builtin:tiny" else {}),
              **({"gguf_dtype": config.get("gguf_dtype", "float32")} if "source" in inputs else {})}
    with StageRun(ctx, stage, cache_key, params, inputs) as run:
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
            from models.training.engine import read_metrics

            rows = read_metrics(res["metrics_path"])
            run.tracker.log_metrics(run.run_id, rows, prefix="train/")
            metrics = {f"train/{k}": v for k, v in (rows[-1] if rows else {}).items() if k != "step"}
            run.tracker.set_tags(run.run_id, {"posttrain.num_params": res.get("num_params", "")})
            if resumed is not None:
                run.tracker.set_tags(run.run_id, {"posttrain.resumed_from_step": resumed})
        else:
            source = inputs.get("source")
            if source is not None:
                run.tracker.set_tags(run.run_id, {"posttrain.source_digest": source.digest,
                                                  "posttrain.source_path": source.path})
            path = resolve_uri(uri, workdir, ctx, config.get("gguf_dtype", "float32"), source)
        output = ArtifactRef(kind="model", path=str(path), digest=digest_path(path), run_id=run.run_id, stage=stage)
        run.finish_output(output)
        return StageResult(stage=stage, output=output, mlflow_run_id=run.run_id, cache_key=cache_key,
                           metrics=metrics, resumed_from_step=resumed, wall_seconds=run.elapsed)
