"""SIGKILL a smoke run of r1 at each point where a kill can land (pretraining, mid-SFT, mid-GRPO,
sampling, between two stages, a checkpoint written but not committed), then `posttrain resume` it:
finished stages are cache hits, the killed stage goes on from its last committed checkpoint, and
everything equals an uninterrupted run (the session's `reference`, tests/conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import R1_STAGES, kill_group, mlflow_runs, poll, run_cli

cli = run_cli


def _workdir(state: Path, stage: str) -> Path | None:
    """<state>/work/<stage>-<cache key>/ (None before the stage has started)."""
    hits = sorted((state / "work").glob(f"{stage}-*")) if (state / "work").exists() else []
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def _steps_logged(state: Path, stage: str) -> int:
    wd = _workdir(state, stage)
    return len((wd / "metrics.jsonl").read_text().splitlines()) if wd and (wd / "metrics.jsonl").exists() else 0


def _committed_step(state: Path, stage: str) -> int | None:
    """The step of the stage's committed checkpoint (`checkpoints/latest`), None before the first."""
    wd = _workdir(state, stage)
    latest = wd / "checkpoints" / "latest" if wd else None
    tag = latest.read_text().strip() if latest and latest.exists() else ""
    return int(tag.removeprefix("step")) if tag.startswith("step") else None


def _train_rows(state: Path, stage: str) -> list[dict]:
    """A training stage's per-step metrics, timings left out."""
    rows = [json.loads(ln) for ln in (_workdir(state, stage) / "metrics.jsonl").read_text().splitlines() if ln]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def _kill_when(predicate, what: str):
    def kill(proc, state):
        try:
            poll(lambda: predicate(state), 900, what, every=0.1, alive=proc)
        finally:
            kill_group(proc, signal.SIGKILL)
    return kill


def _fault(pattern: str):
    """POSTTRAIN_FAULT: the run SIGKILLs its own process group at the named point (models/training/faults.py)."""
    def kill(proc, state):
        try:
            assert proc.wait(timeout=900) == -signal.SIGKILL, f"POSTTRAIN_FAULT={pattern} never fired"
        finally:
            kill_group(proc, signal.SIGKILL)
    kill.env = {"POSTTRAIN_FAULT": pattern}
    return kill


def _fetch_killed(state):  # pretrain: 30 steps, a checkpoint every 10
    assert _committed_step(state, "fetch") in (10, 20) and not (_workdir(state, "fetch") / "output").exists()


def _sft_killed(state):
    assert _committed_step(state, "sft") in (10, 20) and not (_workdir(state, "sft") / "output").exists()


def _grpo_killed(state):  # 3 steps, a checkpoint every step
    assert _committed_step(state, "grpo") in (1, 2) and not (_workdir(state, "grpo") / "output").exists()


def _sample_killed(state):
    assert not (_workdir(state, "sample") / "samples.jsonl").exists(), "the kill came after sample had finished"


def _nothing_of_filter(state):
    assert _committed_step(state, "sft") == 30 and (_workdir(state, "sample") / "samples.jsonl").exists()
    assert _workdir(state, "filter") is None, "filter had started"


def _checkpoint_half_written(state):
    """Step 20's files are on disk, `latest` still names step 10; cut one file short, as a kill in the
    middle of writing it would: resume must go on from step 10 and never read step 20."""
    ckpts = _workdir(state, "sft") / "checkpoints"
    assert _committed_step(state, "sft") == 10
    files = sorted(f for f in (ckpts / "step0000020").iterdir() if f.stat().st_size > 0)
    assert files, "no uncommitted step-20 files"
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])


# id: (how the run is killed, a check of what the kill left on disk, the failed_stage it shows, the
# steps that stage may resume from: None when it has no checkpoint to resume and starts afresh)
KILLS = {
    "during-fetch": (_kill_when(lambda st: _steps_logged(st, "fetch") >= 13, "pretrain step 13"), _fetch_killed,
                     "fetch", (10, 20)),
    "mid-sft": (_kill_when(lambda st: _steps_logged(st, "sft") >= 13, "SFT step 13"), _sft_killed, "sft", (10, 20)),
    "mid-rl": (_kill_when(lambda st: (_committed_step(st, "grpo") or 0) >= 1, "GRPO's step-1 checkpoint"),
               _grpo_killed, "grpo", (1, 2)),
    "during-sample": (_kill_when(lambda st: _workdir(st, "sample") is not None, "the sample stage"), _sample_killed,
                      "sample", None),
    "between-stages": (_fault("before-stage:filter"), _nothing_of_filter, "filter", None),
    "checkpoint-write": (_fault("checkpoint-uncommitted:sft-*:20"), _checkpoint_half_written, "sft", (10,)),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILLS))
def test_sigkilled_run_shows_crashed_and_resume_finishes_it(reference, tmp_path, point):
    """SIGKILL at `point`; `posttrain resume` finishes the run without recomputing a finished stage,
    the killed training stage goes on from its last committed checkpoint, and every stage's output,
    metrics and the final model equal those of the uninterrupted reference run."""
    kill, check_left, failed, resumed_steps = KILLS[point]
    state = tmp_path / "state"
    proc = cli("run", "--smoke", "--no-progress", state_dir=state, env=getattr(kill, "env", None),
               stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    kill(proc, state)
    check_left(state)
    (crashed,) = json.loads(cli("runs", "--json", state_dir=state).stdout)
    assert crashed["status"] == "CRASHED" and crashed["failed_stage"] == failed
    old = crashed["flow_run_id"]

    cli("resume", old, "--no-progress", "--summary-json", str(tmp_path / "s.json"), state_dir=state)
    s = json.loads((tmp_path / "s.json").read_text())
    by = {st["stage"]: st for st in s["stages"]}
    ref = {st["stage"]: st for st in reference["summary"]["stages"]}
    assert list(by) == list(ref) == R1_STAGES
    done_before = R1_STAGES[: R1_STAGES.index(failed)]
    for stage in R1_STAGES:  # finished before the kill: cache hits; the rest: run now
        assert by[stage]["cached"] is (stage in done_before), stage
    if resumed_steps:
        assert by[failed]["resumed_from_step"] in resumed_steps
    else:
        assert by[failed]["resumed_from_step"] is None
    for stage in R1_STAGES:
        assert by[stage]["cache_key"] == ref[stage]["cache_key"], f"{stage}: the code changed since the reference ran"
        assert by[stage]["output"]["digest"] == ref[stage]["output"]["digest"], stage
        assert by[stage]["metrics"] == ref[stage]["metrics"], stage
        assert _untimed(by[stage]["train_metrics"]) == _untimed(ref[stage]["train_metrics"]), stage
    for stage in ("fetch", "sft", "grpo", "refine"):  # every step's loss, not just the last
        assert _train_rows(state, stage) == _train_rows(reference["state"], stage), stage
    assert s["final_model"]["digest"] == reference["summary"]["final_model"]["digest"]
    client, _ = mlflow_runs(state)
    assert client.get_run(s["mlflow_parent_run_id"]).data.tags["posttrain.resumed_from_run"] == old
    records = {r["flow_run_id"]: r for r in json.loads(cli("runs", "--json", state_dir=state).stdout)}
    assert records[s["flow_run_id"]]["status"] == "COMPLETED" and records[old]["status"] == "CRASHED"
