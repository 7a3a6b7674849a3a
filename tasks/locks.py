"""One computation per cache key, however many runs want it at once.

Runs that share a state dir (CLI processes, served or worker runs, parallel branches of one run in
threads) decide "cache hit or compute" for a stage under an exclusive lock on
`<state>/locks/<cache_key>.lock`, held around look up result → compute → publish result. The first
run computes; a second one waits, then finds the published result and takes the cache hit.

- The lock is an OS-level `flock` (the `filelock` package): a holder that dies, even by SIGKILL,
  releases it; a waiter then looks again, finds no result, and computes (a training stage resumes
  from the dead holder's last checkpoint in the shared work dir).
- A stage that fails in the holder releases the lock with the error; a waiter finds no result and
  computes it itself (and fails the same way, with its own error, when the failure is in the data).
- Threads of one process exclude each other too: each acquisition opens the lock file anew, and two
  open file descriptions of one file cannot both hold a `flock`.
- The holder writes who it is (stage, pid, host, flow run) beside the lock, so a waiter can say
  whom it waits for. Lock files stay (one small file per cache key): removing a lock file while
  another run waits on it would let a third run lock a new file of the same name.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

# How often a waiter says it is still waiting (a training stage may hold the lock for hours).
STILL_WAITING_EVERY_S = 600.0


def locks_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "locks"


def lock_path(state_dir: str | os.PathLike, cache_key: str) -> Path:
    return locks_dir(state_dir) / f"{cache_key}.lock"


def _holder_path(lock: Path) -> Path:
    return lock.with_suffix(".holder.json")


def read_holder(state_dir: str | os.PathLike, cache_key: str) -> dict | None:
    """Who holds (or last held) the lock of this cache key, as it wrote itself; None if unknown."""
    try:
        return json.loads(_holder_path(lock_path(state_dir, cache_key)).read_text())
    except (OSError, ValueError):
        return None


def _write_holder(path: Path, info: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    except OSError:  # who holds a lock is a courtesy to waiters: never fail a stage over it
        tmp.unlink(missing_ok=True)


def _describe(holder: dict | None) -> str:
    if not holder:
        return ""
    parts = [f"pid {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") != socket.gethostname() else "")]
    if holder.get("flow_run_id"):
        parts.insert(0, f"flow run {holder['flow_run_id']}")
    return f" ({', '.join(parts)})"


@contextlib.contextmanager
def stage_lock(state_dir: str | os.PathLike, stage: str, cache_key: str,
               on_wait: Callable[[str], None] | None = None, flow_run_id: str = "",
               still_waiting_every: float = STILL_WAITING_EVERY_S) -> Iterator[float | None]:
    """Hold the cache key's lock for the body; yields None when it was free, else the seconds waited.

    `on_wait` gets one line when the lock is taken by another run ("waiting for <stage> (cache key
    …) computed by another run"), and one every `still_waiting_every` seconds while that lasts."""
    path = lock_path(state_dir, cache_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    tell = on_wait or (lambda line: None)
    waited: float | None = None
    try:
        lock.acquire(timeout=0)
    except Timeout:
        t0 = time.monotonic()
        tell(f"waiting for {stage} (cache key {cache_key}) computed by another run"
             f"{_describe(read_holder(state_dir, cache_key))}")
        while True:
            try:
                lock.acquire(timeout=still_waiting_every)
                break
            except Timeout:
                tell(f"still waiting for {stage} (cache key {cache_key}) after {time.monotonic() - t0:.0f}s"
                     f"{_describe(read_holder(state_dir, cache_key))}")
        waited = time.monotonic() - t0
    try:
        _write_holder(_holder_path(path), {"stage": stage, "cache_key": cache_key, "pid": os.getpid(),
                                           "host": socket.gethostname(), "flow_run_id": flow_run_id,
                                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield waited
    finally:
        lock.release()
