"""The project state dir (default `.posttrain/`, or `--state-dir`, or `POSTTRAIN_HOME`).

It holds Prefect's home and results, stage work dirs, datasets, the MLflow SQLite store and artifact
root, and compiled DeepSpeed ops. `prepare_environment` must run before Prefect is imported (Prefect
reads its settings at import time); it only sets variables the user has not set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DEFAULT_STATE_DIR = ".posttrain"


def resolve_state_dir(state_dir: str | None = None) -> Path:
    return Path(state_dir or os.environ.get("POSTTRAIN_HOME") or DEFAULT_STATE_DIR).expanduser().resolve()


class StateDirError(Exception):
    """The state dir cannot be created or written (checked before Prefect or MLflow start)."""


def check_state_dir(state_dir: str | None = None) -> Path:
    """Create the state dir if it is missing and prove that this process can write in it.

    Runs first in `posttrain run`/`resume`: a state dir that is a file, sits under a file, cannot be
    created (under /proc) or is read-only would otherwise fail minutes later, deep in Prefect or MLflow.
    """
    root = resolve_state_dir(state_dir)
    fix = "pass a writable directory with --state-dir (or POSTTRAIN_HOME)"
    if root.exists() and not root.is_dir():
        raise StateDirError(f"state dir {root} is a file, not a directory; {fix}")
    above = next((p for p in root.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise StateDirError(f"state dir {root}: {above} is a file, not a directory; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateDirError(f"state dir {root} cannot be created ({e.strerror or e}); {fix}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise StateDirError(f"state dir {root} is not writable by this user; {fix}")
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:  # a read-only file system, a full disk: what os.access cannot see
        raise StateDirError(f"state dir {root}: cannot write a file in it ({e.strerror or e}); {fix}") from None
    return root


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


class _TracebackToFile:
    """A logging filter for Prefect's run loggers: a record's traceback is appended to a file and the
    console keeps its one-line message, naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def filter(self, record) -> bool:
        import logging
        import time

        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as fh:
                    fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {record.name}: {record.getMessage()}\n{text}\n")
                where = f"traceback in {self.path}"
            except OSError:  # a full disk: the traceback is lost, the message is not
                where = "traceback not kept: the state dir is not writable"
            record.msg = f"{record.getMessage()} ({where})".replace("%", "%%")
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_run_tracebacks(state_dir: str | Path) -> Path:
    """Prefect logs every failed flow and task run with its whole traceback (30-400 lines on the
    console before posttrain's own `error:` line): keep those in `<state>/logs/tracebacks.log`
    instead (not under --verbose). Returns the file."""
    import logging

    path = Path(state_dir) / "logs" / "tracebacks.log"
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TracebackToFile) for f in logger.filters):
            logger.addFilter(_TracebackToFile(path))
    return path

