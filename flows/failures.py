"""Turn the failures an operator can fix into messages that say what to do.

Today: a full disk. A stage that hits ENOSPC (a checkpoint, a dataset, the MLflow store, Prefect's
results) fails like any error and Prefect's `retries` would only hit the wall again; what helps is
freeing space under the state dir and resuming the run, whose finished stages are cache hits and
whose training stage restarts from its newest complete checkpoint.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_DISK_FULL_TEXT = ("No space left on device", "[Errno 28]", "disk is full", "database or disk is full")


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or its text in a wrapped error (torch, sqlite)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
    return False


def disk_full_message(state_dir: str | Path, flow_run_id: str | None, stage: str | None = None) -> str:
    root = Path(state_dir)
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.1f} GiB free now"
    except OSError:
        free = "free space unknown"
    where = f" during stage '{stage}'" if stage else ""
    resume = f"posttrain resume {flow_run_id} --state-dir {root}" if flow_run_id else \
        f"posttrain runs --state-dir {root}   # then: posttrain resume <flow_run_id>"
    return (
        f"error: the disk is full{where} (No space left on device; {root}: {free}).\n"
        f"  Free space under the state dir {root}: old stage work dirs ({root / 'work'}), reports, or\n"
        f"  runs you no longer need; or move it with --state-dir / POSTTRAIN_HOME onto a larger disk.\n"
        f"  Finished stages are kept as cache hits and training resumes from its last checkpoint:\n"
        f"    {resume}"
    )


def explain(exc: BaseException, state_dir: str | Path, flow_run_id: str | None = None,
            stage: str | None = None) -> str | None:
    """What to tell the operator about `exc`, or None when it is not a failure we know how to explain."""
    if is_disk_full(exc):
        return disk_full_message(state_dir, flow_run_id, stage)
    return None


def retry_unless_disk_full(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`: retrying cannot free disk space, so a full disk fails at once."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_disk_full(exc))
