"""Ctrl-C and SIGTERM for `posttrain run`/`resume`: leave within seconds, with one line saying what
happened and the exact `posttrain resume` command.

Prefect's flow engine installs its own SIGTERM handler and reports the crash to its API before the
process ends; when a terminal's Ctrl-C or a group-wide SIGTERM has already killed the temporary API
server, that report retries for about 90 s and prints pages of tracebacks. So the CLI blocks both
signals in every thread (`install`, before any thread starts) and one watcher thread takes them with
`sigwait`, whatever the main thread is doing: it records this process's run as CANCELLED at its
current stage, SIGKILLs every descendant process (torchrun and its ranks, the temporary API server),
prints one line and leaves with `os._exit(128 + signum)`, waiting on nothing.

Child processes inherit a blocked signal mask: start long-lived ones with `unblock_signals` as
(part of) their `preexec_fn` so that they still stop on SIGINT/SIGTERM of their own.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Target:
    state_dir: str | None = None  # the state dir the flow records its run in (set by `watch_run`)
    state_dir_flag: str | None = None  # `--state-dir` as the user gave it (None: the default)


def install(state_dir_flag: str | None) -> None:
    """Route SIGINT/SIGTERM of this process to `interrupted` (call first, from the main thread)."""
    _Target.state_dir_flag = state_dir_flag
    for sig in SIGNALS:  # a thread that unblocks them (the API server's starter) still lands here
        signal.signal(sig, lambda signum, frame: os._exit(interrupted(signum)))
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_watch, name="posttrain-interrupt", daemon=True).start()


def watch_run(state_dir: str) -> None:
    """The run that an interrupt must record is the one this process starts in `state_dir`."""
    _Target.state_dir = state_dir


def unblock_signals() -> None:
    """`preexec_fn` of a child process: the default signal mask back (SIGINT/SIGTERM stop it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _watch() -> None:
    signum = signal.sigwait(SIGNALS)
    os._exit(interrupted(signum))


def interrupted(signum: int) -> int:
    """Record, kill, tell: the exit status (130 for SIGINT, 143 for SIGTERM)."""
    name = signal.Signals(signum).name
    try:
        line = _record(name)
    except Exception as e:  # noqa: BLE001 - the process must still leave promptly
        line = f"the run record could not be updated ({type(e).__name__}: {e})"
    _kill_descendants()
    tty = "\x1b[?25h\n" if sys.stderr.isatty() else ""  # a live progress display hid the cursor mid-line
    print(f"{tty}posttrain: {name} received: {line}", file=sys.stderr, flush=True)
    return 128 + signum


def _record(name: str) -> str:
    if _Target.state_dir is None:
        return "stopped before the run started; nothing to resume"
    from flows import runs

    mine = [r for r in runs.list_runs(_Target.state_dir, limit=50)
            if r.get("pid") == os.getpid() and r.get("status") == "RUNNING"]
    if not mine:
        return "stopped before the run was recorded; nothing to resume"
    rec = mine[0]
    stage = rec.get("current_stage")
    runs.update(_Target.state_dir, rec["flow_run_id"], status="CANCELLED", failed_stage=stage,
                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), error=f"interrupted by {name}")
    _end_tracking(rec, _Target.state_dir, f"interrupted by {name}")
    where = f"at stage {stage}" if stage else "before its first stage"
    flag = f" --state-dir {shlex.quote(_Target.state_dir_flag)}" if _Target.state_dir_flag else ""
    return (f"run {rec['flow_run_id']} stopped {where}, recorded CANCELLED; "
            f"continue it with: posttrain resume {rec['flow_run_id']}{flag}")


def _end_tracking(rec: dict, state_dir: str, why: str, timeout_s: float = 5.0) -> None:
    """End the run's MLflow parent run and its unfinished stage runs as KILLED (as MLflow's own
    fluent API does for a run left open at exit), so the UI does not show them RUNNING forever.
    Bounded: a tracking server that does not answer within `timeout_s` is left as it is."""
    parent = rec.get("mlflow_parent_run_id")
    if not parent or parent.startswith("queued-"):  # none, or tracked offline (its journal says the rest)
        return

    def end() -> None:
        from tasks.common import default_tracking_uri
        from tasks.tracking import kill_runs

        kill_runs((rec.get("parameters") or {}).get("tracking_uri") or default_tracking_uri(state_dir), parent, why)

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down: no backoff
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    worker = threading.Thread(target=lambda: _quietly(end), name="posttrain-end-tracking", daemon=True)
    worker.start()
    worker.join(timeout_s)


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best effort: the run record already says CANCELLED
        pass


def _kill_descendants() -> None:
    """SIGKILL every process below this one (listed first, so grandchildren are not missed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (…) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
