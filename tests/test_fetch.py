"""Checkpoint URIs and dataset URIs resolve offline: local dirs, the HF cache, the MLflow registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_contracts.artifacts import digest_path
from data_contracts.errors import ContractError
from models.config import TaskConfig
from tasks.common import RunContext
from tasks.data import resolve_problems, resolve_sft_dataset
from tasks.fetch import fetch_base, resolve_uri

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext(state_dir=str(tmp_path / "state"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      experiment="test-fetch")


def _hf_cache(tmp_path: Path, kind: str, repo: str, files_from: Path | None = None, files: dict | None = None) -> Path:
    """Lay out a Hugging Face hub cache as huggingface_hub writes it (refs/main -> snapshot)."""
    cache = tmp_path / "hf-cache"
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    if files_from:
        for f in files_from.iterdir():
            if f.is_file():
                shutil.copy2(f, snap / f.name)
    for name, text in (files or {}).items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline_cache(monkeypatch):
    from huggingface_hub import constants

    def use(cache: Path):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    return use


def test_local_dir_is_used_in_place(tiny_base, tmp_path):
    assert resolve_uri(str(tiny_base), tmp_path, _ctx(tmp_path)) == tiny_base.resolve()
    with pytest.raises(FileNotFoundError, match="missing: no such file or directory$"):
        resolve_uri(str(tmp_path / "missing"), tmp_path, _ctx(tmp_path))


def test_local_dir_whose_config_does_not_load_fails_in_fetch(tiny_base, tmp_path):
    """A broken config.json passed fetch and failed later, in evaluate, with a raw transformers error."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')  # cut short, as by a full disk
    with pytest.raises(FileNotFoundError) as e:
        fetch_base.fn(stage="fetch", cache_key="k" * 32, config={"uri": str(broken)}, task_config={}, inputs={},
                      ctx=_ctx(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"fetch.uri {broken}: {broken / 'config.json'} does not load: "), msg


def test_hf_uri_resolves_from_the_offline_cache(tiny_base, tmp_path, offline_cache):
    offline_cache(_hf_cache(tmp_path, "model", "acme/tiny", files_from=tiny_base))
    for uri in ("hf://acme/tiny@main", f"hf://acme/tiny@{COMMIT}", "hf://acme/tiny"):
        path = resolve_uri(uri, tmp_path, _ctx(tmp_path))
        assert path.name == COMMIT and digest_path(path) == digest_path(tiny_base)


def test_models_uri_downloads_a_registered_version(tiny_base, tmp_path):
    from tasks.tracking import Tracker

    ctx = _ctx(tmp_path)
    t = Tracker(ctx.tracking_uri, ctx.experiment, str(tmp_path / "art"))
    run = t.start_run("producer")
    t.log_artifacts(run, str(tiny_base), "model")
    assert t.register_model("tiny", run, "model", {"posttrain.stage": "sft"}) == "1"
    assert not t.errors
    out = resolve_uri("models:/tiny/1", tmp_path / "work", ctx)
    assert (out / ".complete").exists() and digest_path(out) == digest_path(tiny_base)
    # a second resolution reuses the completed download
    assert resolve_uri("models:/tiny/1", tmp_path / "work", ctx) == out


def test_fetch_task_records_a_ref_and_an_mlflow_run(tiny_base, tmp_path):
    ctx = _ctx(tmp_path)
    res = fetch_base.fn(stage="fetch", cache_key="k" * 32, config={"uri": str(tiny_base)}, task_config={},
                        inputs={}, ctx=ctx)
    assert res.output.digest == digest_path(tiny_base) and res.output.kind == "model"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(ctx.tracking_uri).get_run(res.mlflow_run_id)
    assert run.data.tags["posttrain.output_digest"] == res.output.digest
    assert run.data.tags["posttrain.stage"] == "fetch" and run.info.status == "FINISHED"


def test_hf_dataset_resolves_and_is_validated(tmp_path, offline_cache):
    good = '{"prompt": "Q: 1+1\\nA:", "completion": "<answer>2</answer>"}\n'
    offline_cache(_hf_cache(tmp_path, "dataset", "acme/arith", files={"data/train.jsonl": good,
                                                                      "data/test.jsonl": good + '{"prompt": 3}\n'}))
    ref = resolve_sft_dataset("hf://datasets/acme/arith@main", TaskConfig(), tmp_path)
    assert ref.path.endswith("data/train.jsonl") and ref.digest == digest_path(ref.path)
    with pytest.raises(ContractError, match=r"row 2, field 'prompt'"):
        resolve_sft_dataset("hf://datasets/acme/arith@main", TaskConfig(), tmp_path, split="test")


def test_builtin_datasets_are_deterministic_and_valid(tmp_path):
    task = TaskConfig(n_train=50, n_test=10, pretrain_docs=10)
    a = resolve_sft_dataset("builtin", task, tmp_path / "a")
    b = resolve_sft_dataset("builtin", task, tmp_path / "b")
    assert a.digest == b.digest
    p = resolve_problems("builtin", task, tmp_path / "a")
    assert p.path.endswith("test_problems.jsonl")
    assert resolve_problems("builtin", TaskConfig(n_train=60, n_test=10), tmp_path / "c").digest == p.digest


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """A loopback "hub" that accepts connections and never answers (it closes them after 30 s at most),
    with 1 s hub timeouts and an empty hub cache; yields the cache dir."""
    import socket
    import threading

    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop, held = threading.Event(), []

    def accept():
        deadline = threading.Timer(30, stop.set)
        deadline.start()
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # never read from nor written to
            except OSError:
                pass
        deadline.cancel()
        for conn in held:
            conn.close()
        listener.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    yield cache
    stop.set()
    thread.join(5)
    set_client_factory(default_client_factory)


def test_a_hub_that_never_answers_fails_fetch_in_seconds(tmp_path, silent_hub):
    import time

    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        resolve_uri("hf://acme/none@main", tmp_path, _ctx(tmp_path))
    assert time.monotonic() - t0 < 15  # 1 s timeouts; without them this hangs until the hub closes
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fetch.uri hf://acme/none@main: the hub http://127.0.0.1:"), msg
    assert "Timeout" in msg and msg.endswith(f"repo acme/none@main is not in the offline cache {silent_hub}"), msg


def test_offline_with_an_empty_cache_names_the_repo_and_the_cache(tmp_path, offline_cache):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    offline_cache(cache)
    with pytest.raises(FileNotFoundError) as e:
        resolve_uri("hf://acme/none", tmp_path, _ctx(tmp_path))
    assert str(e.value) == (f"fetch.uri hf://acme/none: HF_HUB_OFFLINE is set, and repo acme/none is not in the "
                            f"offline cache {cache}")
