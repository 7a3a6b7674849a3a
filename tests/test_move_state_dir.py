"""The disk-full advice (flows/failures.py) says: move the state dir to a bigger disk and resume with
`--state-dir NEW`. The copy's record names the old dir; resume must run in NEW and leave the old dir
untouched."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import kill_group, run_cli


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
def test_resume_with_a_moved_state_dir_runs_there(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    proc = run_cli("run", "--smoke", "--no-progress", "--set", "stages=[fetch]", state_dir=old,
                   env={"POSTTRAIN_FAULT": "before-stage:fetch"}, stdout=open(tmp_path / "run.log", "w"),
                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_group(proc, signal.SIGKILL)
    shutil.copytree(old, new, symlinks=True)
    before = _tree(old)
    (rec,) = json.loads(run_cli("runs", "--json", state_dir=new).stdout)
    assert rec["status"] == "CRASHED" and rec["failed_stage"] == "fetch", rec

    run_cli("resume", rec["flow_run_id"], "--no-progress", "--summary-json", str(tmp_path / "s.json"),
            state_dir=new)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert Path(summary["final_model"]["path"]).is_relative_to(new), summary["final_model"]
    runs = {r["flow_run_id"]: r for r in json.loads(run_cli("runs", "--json", state_dir=new).stdout)}
    assert runs[summary["flow_run_id"]]["status"] == "COMPLETED"
    assert _tree(old) == before, "the resume wrote to the old state dir"
    assert len(list((old / "runs").glob("*.json"))) == 1
