"""The project state dir (default `.posttrain/`, or `--state-dir`, or `POSTTRAIN_HOME`).

It holds Prefect's home and results, stage work dirs, datasets, the MLflow SQLite store and artifact
root, and compiled DeepSpeed ops. `prepare_environment` must run before Prefect is imported (Prefect
reads its settings at import time); it only sets variables the user has not set.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = ".posttrain"


def resolve_state_dir(state_dir: str | None = None) -> Path:
    return Path(state_dir or os.environ.get("POSTTRAIN_HOME") or DEFAULT_STATE_DIR).expanduser().resolve()


def prepare_environment(state_dir: str | None = None, quiet: bool = True) -> Path:
    root = resolve_state_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "POSTTRAIN_HOME": str(root),
        "PREFECT_HOME": str(root / "prefect"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the temporary local API server can take > 20 s to start on a loaded 2-core machine
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),  # torch_compile: compiled kernels kept per state dir
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
    }
    if quiet:
        env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return root


def configure_state_dir(state_dir: str | None) -> Path:
    """Inside the flow: make the layout; the environment may already point elsewhere (tests share ops)."""
    root = resolve_state_dir(state_dir)
    for sub in ("work", "results", "datasets", "mlartifacts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
    return root
