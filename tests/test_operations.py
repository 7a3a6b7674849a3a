"""Operations: `posttrain serve` firing a schedule on a real Prefect server, `posttrain runs`,
`posttrain resume`'s refusals, `posttrain lineage` and its digest checks, and the disk-full message.
Fast tests first; the flow-running ones are `slow`. SIGKILL-and-resume at every kill point:
tests/test_kill_resume.py."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest
from helpers import R1_STAGES, kill_group, mlflow_runs, poll, run_cli

from flows import runs
from flows.failures import explain, is_disk_full
from flows.serve import load_deployments, schedule_kwargs, select

REPO = Path(__file__).resolve().parent.parent
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


cli = run_cli  # tests/helpers.py


def kill_recorded_flows(state_dir: Path) -> None:
    """Flow processes a server or worker started (recorded by pid in the run records) and left behind."""
    for r in runs.list_runs(state_dir, limit=1000) if (state_dir / "runs").exists() else []:
        if r["status"] == "RUNNING" and r.get("pid"):
            try:
                os.kill(r["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_record(state: Path, flow_run_id: str, status: str, pid: int, **extra) -> None:
    runs.record_start(state, flow_run_id, {"recipe": "r1", "overrides": [], "smoke": True, "state_dir": str(state),
                                           "tracking_uri": None}, "mlflow-" + flow_run_id, "r1")
    runs.update(state, flow_run_id, pid=pid, **extra)
    if status != "RUNNING":
        runs.update(state, flow_run_id, status=status)


# ---------------------------------------------------------------------------------------- fast


def test_prefect_yaml_names_every_recipe_and_the_nightly_cron():
    from models.config import RECIPES_DIR

    ds = {d["name"]: d for d in load_deployments()}
    recipes = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert {"r1", "r1-zero", "tulu3", "rlhf", "smollm2-r1", "r1-multi", "distill", "rl-ablation"} <= recipes
    assert set(ds) == recipes | {"r1-smoke", "r1-nightly"}
    assert all(ds[r]["parameters"] == {"recipe": r, "overrides": [], "smoke": False} for r in recipes)
    assert all(d["work_pool"]["name"] == "posttrain-process" for d in ds.values())
    assert ds["r1-smoke"]["parameters"] == {"recipe": "r1", "overrides": [], "smoke": True}
    assert ds["r1-nightly"]["schedules"][0]["cron"] == "0 3 * * *"
    assert schedule_kwargs(ds["r1"]) == {}
    assert schedule_kwargs(ds["r1-nightly"])["schedules"][0].cron == "0 3 * * *"
    assert schedule_kwargs(ds["r1-smoke"], interval=5)["interval"].total_seconds() == 5
    assert [d["name"] for d in select(list(ds.values()), ["r1-smoke"])] == ["r1-smoke"]
    with pytest.raises(ValueError, match="unknown deployment"):
        select(list(ds.values()), ["nope"])


def test_run_record_updates_from_parallel_branches_all_land(tmp_path):
    """Branches of a graph run (max_parallel_stages) update one record from threads of one process:
    every update lands whole, and no temp file is left."""
    import threading

    runs.record_start(tmp_path, "fr", {}, None, "r")
    names = [f"k{i}" for i in range(16)]
    threads = [threading.Thread(target=lambda n=n: [runs.update(tmp_path, "fr", **{n: j}) for j in range(20)])
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = json.loads((tmp_path / "runs" / "fr.json").read_text())
    assert {n: record.get(n) for n in names} == {n: 19 for n in names}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fr.json"]


def test_a_record_write_that_hits_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    runs.record_start(tmp_path, "f-1", {}, None, "r1")
    before = (tmp_path / "runs" / "f-1.json").read_text()

    def full(self, text, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        runs.update(tmp_path, "f-1", status="FAILED")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["f-1.json"]
    assert (tmp_path / "runs" / "f-1.json").read_text() == before


def test_runs_json_lists_records_and_a_dead_pid_reads_crashed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(tmp_path, "aaa", "RUNNING", dead.pid, current_stage="sft")
    write_record(tmp_path, "bbb", "COMPLETED", os.getpid())
    out = json.loads(cli("runs", "--json", state_dir=tmp_path).stdout)
    by_id = {r["flow_run_id"]: r for r in out}
    assert set(out[0]) == {"flow_run_id", "mlflow_parent_run_id", "recipe", "status", "failed_stage", "started"}
    assert by_id["aaa"]["status"] == "CRASHED" and by_id["aaa"]["failed_stage"] == "sft"
    assert by_id["bbb"]["status"] == "COMPLETED" and by_id["bbb"]["mlflow_parent_run_id"] == "mlflow-bbb"
    assert len(json.loads(cli("runs", "--json", "--limit", "1", state_dir=tmp_path).stdout)) == 1
    assert "aaa" in cli("runs", state_dir=tmp_path).stdout


def test_resume_refuses_running_completed_and_unknown_runs(tmp_path):
    write_record(tmp_path, "alive", "RUNNING", os.getpid())  # this very process: alive
    write_record(tmp_path, "done", "COMPLETED", os.getpid())
    p = cli("resume", "alive", state_dir=tmp_path, check=False)
    assert p.returncode == 2 and "still running" in p.stderr
    p = cli("resume", "mlflow-done", state_dir=tmp_path, check=False)  # by MLflow parent run id
    assert p.returncode == 2 and "COMPLETED" in p.stderr and "--force" in p.stderr
    p = cli("resume", "nope", state_dir=tmp_path, check=False)
    assert p.returncode == 2 and "no run 'nope'" in p.stderr


def test_disk_full_is_recognised_and_explained(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    msg = explain(OSError(errno.ENOSPC, "No space left on device"), tmp_path, "f-123", "sft")
    assert "stage 'sft'" in msg and f"posttrain resume f-123 --state-dir {tmp_path}" in msg and str(tmp_path) in msg


def test_cli_turns_enospc_in_the_flow_into_advice(tmp_path, monkeypatch, capsys):
    from flows import cli as cli_mod

    def post_train(**params):  # the flow records its start, then a stage hits a full disk
        runs.record_start(tmp_path, "flow-1", params, "parent-1", "r1")
        runs.record_end(tmp_path, "flow-1", "FAILED", "OSError: [Errno 28] No space left on device")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(sys.modules, "flows.post_train",
                        types.SimpleNamespace(post_train=post_train, preflight=lambda cfg, state_dir: None))
    monkeypatch.setitem(sys.modules, "flows.report", types.SimpleNamespace(print_table=print))
    rc = cli_mod.execute_flow({"recipe": "r1", "state_dir": str(tmp_path)}, None, None)
    err = capsys.readouterr().err
    assert rc == 3 and "disk is full" in err and "posttrain resume flow-1" in err


def test_sqlalchemy_is_one_prefects_scheduler_can_use():
    """Prefect 3.8.8's scheduler cannot insert scheduled runs with SQLAlchemy 2.1 (`InvalidRequestError:
    Can't evaluate bulk DML statement`): no cron or interval schedule ever fires. Pin sqlalchemy<2.1."""
    import sqlalchemy

    major, minor = (int(x) for x in sqlalchemy.__version__.split(".")[:2])
    assert (major, minor) < (2, 1), f"SQLAlchemy {sqlalchemy.__version__}: schedules never fire; pin sqlalchemy<2.1"


# ---------------------------------------------------------------------------------------- slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


@pytest.fixture
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback with its own home and database, one per test: a name
    deployed to a work pool and then served on the same server keeps the pool deployment's storage
    settings and its served runs crash (FileNotFoundError '<cwd>/None')."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL="", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        poll(lambda: _get_json(f"{api}/health") is True, 180, "the Prefect server's /api/health", alive=proc)
        client_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(home / "client"), "POSTTRAIN_REPO": str(REPO)}
        yield {"api": api, "env": client_env, "home": home}
    finally:
        kill_group(proc)
        log.close()


def prefect(*args, env, timeout=300):
    p = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


# A deployment of deployments/prefect.yaml run by process workers: tests/test_concurrent_runs.py
# (2 and then 8 identical runs through this server fixture and 2 workers).


@pytest.mark.slow
def test_serve_fires_a_scheduled_run(prefect_server, tmp_path):
    state = tmp_path / "state"
    proc = cli("serve", "--only", "r1-smoke", "--interval", "5", state_dir=state, env=prefect_server["env"],
               stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rec = poll(lambda: (runs.list_runs(state, 1) if (state / "runs").exists() else None), 240,
                   "a scheduled run's record", alive=proc)[0]
        assert rec["recipe"] == "r1" and rec["parameters"]["smoke"] is True
        assert rec["parameters"]["state_dir"] == str(state.resolve())
        fr = _get_json(f"{prefect_server['api']}/flow_runs/{rec['flow_run_id']}")
        assert fr["auto_scheduled"] is True  # fired by the schedule, not by hand
        client, exp_id = mlflow_runs(state)
        assert client.get_run(rec["mlflow_parent_run_id"]).data.tags["posttrain.kind"] == "flow"
    finally:
        kill_group(proc)
        kill_recorded_flows(state)


@pytest.mark.slow
def test_lineage_walks_the_final_model_back_to_fetch(reference):
    state, summary = reference["state"], reference["summary"]
    assert summary["registered_model"]
    text = cli("lineage", summary["registered_model"], state_dir=state).stdout
    for stage in R1_STAGES:
        assert f". {stage}  mlflow run" in text
    assert "all recorded digests match" in text
    chain = json.loads(cli("lineage", summary["registered_model"], "--json", state_dir=state).stdout)
    stages = [s["stage"] for s in chain["stages"]]
    assert stages[0] == "fetch" and stages[-1] == "refine" and sorted(stages) == sorted(R1_STAGES)
    ref = {st["stage"]: st for st in summary["stages"]}
    for s in chain["stages"]:
        assert s["output_digest"] == ref[s["stage"]]["output"]["digest"]
        assert s["mlflow_run_id"] == ref[s["stage"]]["mlflow_run_id"]
        assert s["cache_key"] == ref[s["stage"]]["cache_key"] and s["code_version"]
        assert s["prefect_flow_run_id"] == summary["flow_run_id"] and s["prefect_task_run_id"]
    sft = next(s for s in chain["stages"] if s["stage"] == "sft")
    assert any(i["kind"] == "dataset" and i["digest"].startswith("sha256:") for i in sft["inputs"])
    # every other way in reaches the same chain
    for start in (summary["final_model"]["path"], summary["final_model"]["digest"], summary["mlflow_parent_run_id"],
                  summary["flow_run_id"]):
        again = json.loads(cli("lineage", start, "--json", state_dir=state).stdout)
        assert [s["mlflow_run_id"] for s in again["stages"]] == [s["mlflow_run_id"] for s in chain["stages"]], start


@pytest.mark.slow
def test_lineage_fails_naming_the_stage_and_file_of_a_tampered_checkpoint(reference):
    state, summary = reference["state"], reference["summary"]
    sft_out = Path(next(st for st in summary["stages"] if st["stage"] == "sft")["output"]["path"])
    weights = sft_out / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        p = cli("lineage", summary["registered_model"], state_dir=state, check=False)
        assert p.returncode == 1
        assert "stage 'sft'" in p.stderr and str(weights) in p.stderr
        assert "stage 'refine'" not in p.stderr  # only the tampered link is reported
    finally:
        weights.write_bytes(original)
