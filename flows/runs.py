"""Run records: one small JSON per flow run under `<state>/runs/`, written atomically.

They hold what `posttrain resume` needs (the original parameters), what `posttrain runs` lists,
and the pid/host of the process that runs the flow, so a run killed outright (SIGKILL, power loss)
shows as `CRASHED` instead of running forever.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

FINISHED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def runs_dir(state_dir: str | os.PathLike) -> Path:
    d = Path(state_dir) / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


# Branches of a graph run in threads of one process (max_parallel_stages) and each updates the record:
# one lock makes every read-modify-write whole, and a temp name per thread keeps writes apart.
_LOCK = threading.RLock()


def _write(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:  # a full disk mid-write: no half file is left beside the records
        tmp.unlink(missing_ok=True)
        raise


def record_start(state_dir, flow_run_id: str, parameters: dict[str, Any], mlflow_parent_run_id: str | None,
                 recipe: str, resumed_from: str | None = None) -> None:
    _write(runs_dir(state_dir) / f"{flow_run_id}.json", {
        "flow_run_id": flow_run_id, "mlflow_parent_run_id": mlflow_parent_run_id, "recipe": recipe,
        "parameters": parameters, "status": "RUNNING", "failed_stage": None, "current_stage": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ended": None, "pid": os.getpid(),
        "host": socket.gethostname(), "resumed_from": resumed_from, "error": None,
    })


def update(state_dir, flow_run_id: str, **fields) -> None:
    path = runs_dir(state_dir) / f"{flow_run_id}.json"
    with _LOCK:
        if not path.exists():
            return
        record = json.loads(path.read_text())
        record.update(fields)
        _write(path, record)


def translate_run_ids(state_dir, ids: dict[str, str]) -> int:
    """Replace the placeholder MLflow ids (`queued-…`, a run tracked while its store was down) that a
    replay gave real ids, in every run record; returns how many records changed."""
    changed = 0
    for path in sorted(runs_dir(state_dir).glob("*.json")):
        with _LOCK:
            rec = json.loads(path.read_text())
            parent = rec.get("mlflow_parent_run_id")
            if parent in ids:
                rec["mlflow_parent_run_id"] = ids[parent]
                _write(path, rec)
                changed += 1
    return changed


def record_end(state_dir, flow_run_id: str, status: str, error: str | None = None) -> None:
    fields: dict[str, Any] = {"status": status, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "error": error}
    if status == "FAILED":
        path = runs_dir(state_dir) / f"{flow_run_id}.json"
        if path.exists():
            fields["failed_stage"] = json.loads(path.read_text()).get("current_stage")
    update(state_dir, flow_run_id, **fields)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: Path) -> dict:
    """A record with a RUNNING status whose process is gone reads as CRASHED (failed at its stage)."""
    record = json.loads(path.read_text())
    if record["status"] == "RUNNING" and record.get("host") == socket.gethostname() and not _alive(record["pid"]):
        record["status"] = "CRASHED"
        record["failed_stage"] = record.get("current_stage")
    return record


def list_runs(state_dir, limit: int = 20) -> list[dict]:
    records = [load(p) for p in runs_dir(state_dir).glob("*.json")]
    records.sort(key=lambda r: r.get("started") or "", reverse=True)
    return records[:limit]


def find_run(state_dir, run_id: str) -> dict | None:
    """By Prefect flow-run id or MLflow parent run id."""
    for r in list_runs(state_dir, limit=10**6):
        if run_id in (r["flow_run_id"], r.get("mlflow_parent_run_id")):
            return r
    return None
