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
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_uri(str(tmp_path / "missing"), tmp_path, _ctx(tmp_path))


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
