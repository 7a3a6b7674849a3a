"""Ctrl-C (SIGINT to the process group) and SIGTERM (to the CLI's pid) during a training stage, in
process and on 2 torchrun ranks: the CLI leaves within 10 s with one line naming the exact resume
command, the run shows CANCELLED at its stage, no rank or server is left, and `posttrain resume`
finishes the run (flows/interrupt.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import kill_group, poll, run_cli

# the fetch stage alone (pretraining the tiny base, 30 smoke steps): the shortest run that trains
ONLY_FETCH = ["--set", "stages=[fetch]"]
TWO_RANKS = ["--set", "fetch.pretrain.world_size=2", "--set", "fetch.pretrain.micro_batch_size=16"]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _steps_logged(state: Path) -> int:
    hits = list((state / "work").glob("fetch-*/metrics.jsonl")) if (state / "work").exists() else []
    return len(hits[0].read_text().splitlines()) if hits else 0


def _assert_mlflow_runs_killed(state: Path, parent: str) -> None:
    """The MLflow parent run and its unfinished stage run end KILLED, not RUNNING forever."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and run.data.tags["posttrain.error"].startswith("interrupted by SIG"), run
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.data.tags.get("posttrain.stage"): r.info.status for r in children} == {"fetch": "KILLED"}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["1rank", "2ranks"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_says_how_to_resume_and_resume_finishes_it(tmp_path, sig, ranks):
    state = tmp_path / "state"
    log = tmp_path / "run.log"
    proc = run_cli("run", "--smoke", "--no-progress", *ONLY_FETCH, *(TWO_RANKS if ranks == 2 else []),
                   state_dir=state, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(lambda: _steps_logged(state) >= 4, 300, "pretrain step 4", every=0.1, alive=proc)
        below = _descendants(proc.pid)
        assert len(below) >= (3 if ranks == 2 else 1), below  # (torchrun, 2 ranks,) the API server
        t0 = time.monotonic()
        # Ctrl-C reaches the terminal's whole process group; `kill PID` (a scheduler) only the CLI
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        kill_group(proc, signal.SIGKILL)
    out = log.read_text()
    assert took < 10, f"{took:.1f}s to exit\n{out[-3000:]}"
    assert rc == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "ConnectError" not in out, out[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("posttrain: ")]
    (rec,) = json.loads(run_cli("runs", "--json", state_dir=state).stdout)
    assert rec["status"] == "CANCELLED" and rec["failed_stage"] == "fetch", rec
    _assert_mlflow_runs_killed(state, rec["mlflow_parent_run_id"])
    command = f"posttrain resume {rec['flow_run_id']} --state-dir {state}"
    assert line.startswith(f"posttrain: {sig.name} received:") and line.endswith(command), line
    poll(lambda: not any(map(_running, below)), 10, "the ranks and the API server to end")

    run_cli("resume", rec["flow_run_id"], "--no-progress", "--summary-json", str(tmp_path / "s.json"),
            state_dir=state)
    summary = json.loads((tmp_path / "s.json").read_text())
    (fetch,) = summary["stages"]
    assert fetch["stage"] == "fetch" and fetch["cached"] is False and fetch["resumed_from_step"] in (None, 10, 20)
    statuses = {r["flow_run_id"]: r["status"] for r in json.loads(run_cli("runs", "--json", state_dir=state).stdout)}
    assert statuses[rec["flow_run_id"]] == "CANCELLED" and statuses[summary["flow_run_id"]] == "COMPLETED"
