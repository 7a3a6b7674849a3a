"""What a run logs while its MLflow store is unreachable: a journal in the state dir, replayed into the
store later (`posttrain sync`, or the next run's start).

A tracker that cannot reach its store stops trying for the rest of the process (one short timeout,
not one per stage) and appends every call it would have made to its own journal,
`<state>/tracking-queue/<time>-<pid>.jsonl`, which it holds under an exclusive `flock` while it
lives. Runs it starts get placeholder ids (`queued-<32 hex>`): they are what the run record, the
summary and cached stage results hold until a replay creates the real runs and writes the placeholder
→ run id map to `ids.json`; every later tracking call translates placeholders through that map.

A replay takes only journals no live process holds, oldest first, and records how many calls of
each it has applied (`<journal>.applied`), so a replay that fails midway goes on where it stopped
without creating a run twice. No MLflow import here: `tasks.tracking` owns the client.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

QUEUE_DIR = "tracking-queue"
PLACEHOLDER = re.compile(r"queued-[0-9a-f]{32}")
# the calls whose time matters for the store (run start/end, metric points): recorded, and replayed
TIMED_CALLS = frozenset({"start_run", "end_run", "log_metrics"})


def now_ms() -> int:
    return int(time.time() * 1000)


def new_placeholder() -> str:
    return f"queued-{uuid.uuid4().hex}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class IdMap:
    """Placeholder → MLflow run id, shared by every run of a state dir (`ids.json`)."""

    def __init__(self, queue_dir: Path | None):
        self.path = queue_dir / "ids.json" if queue_dir else None
        self.ids: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        if self.path is not None and self.path.exists():
            self.ids = json.loads(self.path.read_text())

    def add(self, placeholder: str, run_id: str) -> None:
        self.ids[placeholder] = run_id
        if self.path is not None:
            _atomic_write(self.path, json.dumps(self.ids, indent=1))

    def translate(self, obj: Any) -> Any:
        """`obj` with every placeholder that has a run id replaced by it (strings, in lists and dicts)."""
        if not self.ids:
            return obj
        if isinstance(obj, str):
            return PLACEHOLDER.sub(lambda m: self.ids.get(m.group(0), m.group(0)), obj) if "queued-" in obj else obj
        if isinstance(obj, dict):
            return {self.translate(k): self.translate(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.translate(v) for v in obj)
        return obj


class Journal:
    """One process's queued tracking calls, appended as JSON lines under an exclusive lock."""

    def __init__(self, queue_dir: Path, tracking_uri: str, experiment: str, artifact_root: str | None, reason: str):
        queue_dir.mkdir(parents=True, exist_ok=True)
        self.path = queue_dir / f"{time.time_ns()}-{os.getpid()}.jsonl"
        self._fh = open(self.path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)  # held until the process ends: a replay skips this file
        self._lock = threading.Lock()
        self.calls = 0
        self._write({"header": 1, "tracking_uri": tracking_uri, "experiment": experiment,
                     "artifact_root": artifact_root, "pid": os.getpid(), "reason": reason, "created_ms": now_ms()})

    def _write(self, record: dict) -> None:
        line = json.dumps(record, default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        """No more calls: the lock goes, and a replay may take the journal."""
        with self._lock:
            self._fh.close()

    def append(self, call: str, args: tuple, kwargs: dict, returns: str | None = None) -> None:
        record: dict[str, Any] = {"call": call, "args": list(args), "kwargs": kwargs}
        if call in TIMED_CALLS:
            record["at_ms"] = now_ms()
        if returns is not None:
            record["returns"] = returns
        self._write(record)
        self.calls += 1


def pending_journals(queue_dir: Path) -> list[Path]:
    """Journals on disk, oldest first (a live writer's included: `replay` skips those)."""
    return sorted(queue_dir.glob("*.jsonl"), key=lambda p: p.name) if queue_dir.is_dir() else []


def read_journal(path: Path) -> tuple[dict, list[dict]]:
    """The header and the calls; a last line torn by a kill mid-write is dropped."""
    lines = path.read_text().splitlines()
    header, calls = json.loads(lines[0]), []
    for i, line in enumerate(lines[1:], 2):
        try:
            calls.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):
                raise ValueError(f"{path}: line {i} is not JSON (the journal is damaged)") from None
    return header, calls


def replay(queue_dir: Path, open_tracker, only_uri: str | None = None, tracking_uri: str | None = None) -> dict:
    """Apply every journal no live process holds, oldest first.

    `open_tracker(uri, experiment, artifact_root)` gives a tracker that raises on errors;
    `only_uri` replays just the journals queued for that store (a run's start replays its own store's),
    `tracking_uri` sends them all to another store instead of the one they were queued for.
    Returns {"journals", "calls", "runs", "skipped": [why], "uris": [...]}; raises if the store fails
    (what was applied stays applied)."""
    ids = IdMap(queue_dir)
    report: dict[str, Any] = {"journals": 0, "calls": 0, "runs": 0, "skipped": [], "uris": []}
    for path in pending_journals(queue_dir):
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run still writes it
            if not path.exists():  # replayed by another process between the listing and the lock
                continue
            header, calls = read_journal(path)
            if only_uri is not None and header["tracking_uri"] != only_uri:
                continue
            uri = tracking_uri or header["tracking_uri"]
            tracker = open_tracker(uri, header["experiment"], header.get("artifact_root"))
            done_file = path.with_name(path.name + ".applied")
            start = int(done_file.read_text()) if done_file.exists() else 0
            for n, call in enumerate(calls[start:], start + 1):
                report["skipped"] += _apply(tracker, call, ids)
                report["runs"] += call["call"] == "start_run"
                _atomic_write(done_file, str(n))
            report["journals"] += 1
            report["calls"] += len(calls) - start
            if uri not in report["uris"]:
                report["uris"].append(uri)
            path.unlink()
            done_file.unlink(missing_ok=True)
    return report


def _apply(tracker, call: dict, ids: IdMap) -> list[str]:
    """One queued call against the store; the reasons it was skipped (a local file since removed)."""
    name, args, kwargs = call["call"], ids.translate(call["args"]), ids.translate(call["kwargs"])
    if name in ("log_artifacts", "log_artifact") and len(args) > 1 and not Path(args[1]).exists():
        return [f"{name} {args[1]}: no longer on disk"]
    if name in TIMED_CALLS:
        kwargs["at_ms"] = call["at_ms"]
    result = getattr(tracker, name)(*args, **kwargs)
    if name == "start_run":
        ids.add(call["returns"], result)
    return []


__all__ = ["IdMap", "Journal", "PLACEHOLDER", "QUEUE_DIR", "new_placeholder", "pending_journals", "replay"]
