"""Inputs that used to break a run late or with a traceback now fail fast with one `error:` line
(the hardening issue), and a store that two runs create at once stays usable."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A Tracker on the store once the test touches `go` (so both processes connect at the same moment).
_CONNECT = """
import sys, time
from pathlib import Path
from tasks.tracking import Tracker
import mlflow.tracking  # imported before the start signal: the race is in the connection
print("ready", flush=True)
go = Path(sys.argv[2])
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
t = Tracker(sys.argv[1], "posttrain", sys.argv[3])
print("ERRORS" if t.errors else "OK", t.errors, flush=True)
sys.exit(0 if t.ok and not t.errors else 1)
"""


@pytest.mark.slow  # two MLflow imports and migrations on 2 cores: ~20 s
def test_two_trackers_creating_one_store_at_once_leave_it_usable(tmp_path):
    from tasks.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {"PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", _CONNECT, uri, str(go), str(tmp_path / "art")], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    tables = [r[0] for r in sqlite3.connect(tmp_path / "mlflow.db").execute(
        "select name from sqlite_master where type = 'table'")]
    assert "experiments" in tables and not [t for t in tables if t.startswith("_alembic_tmp_")], tables
    t = Tracker(uri, "posttrain", str(tmp_path / "art"))  # this test's process is the third
    run = t.start_run("stage", params={"a": 1})
    t.log_metrics(run, [{"step": 0, "loss": 0.5}])
    t.end_run(run)
    assert run and t.errors == [] and t.client.get_run(run).data.metrics["loss"] == 0.5


def one_error_line(capsys, *names: str) -> str:
    """stderr is exactly one `error:` line that names every one of `names`."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


def cli(*argv: str) -> tuple[int, float]:
    from flows.cli import main

    start = time.monotonic()
    return main(list(argv)), time.monotonic() - start


@pytest.mark.parametrize("command", [["run", "--smoke", "--no-progress"], ["resume", "some-run"]])
@pytest.mark.parametrize("case", ["file", "under_a_file", "proc"])
def test_unusable_state_dir_is_one_error_line_before_anything_starts(tmp_path, capsys, command, case):
    f = tmp_path / "state.txt"
    f.write_text("not a dir")
    state = {"file": f, "under_a_file": f / "state", "proc": Path("/proc/posttrain-state")}[case]
    rc, seconds = cli(*command, "--state-dir", str(state))
    assert rc != 0 and seconds < 5
    err = one_error_line(capsys, str(state), "--state-dir")
    assert {"file": "is a file", "under_a_file": f"{f} is a file", "proc": "cannot be created"}[case] in err
    assert not state.exists() or state == f


def test_read_only_state_dir_is_named(tmp_path, capsys, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    rc, seconds = cli("run", "--smoke", "--state-dir", str(tmp_path))
    assert rc == 2 and seconds < 5
    one_error_line(capsys, str(tmp_path), "not writable")
    assert list(tmp_path.iterdir()) == []  # nothing was started in it


def test_a_missing_state_dir_is_created_and_a_writable_one_passes(tmp_path):
    from flows.state import check_state_dir

    assert check_state_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert check_state_dir(str(tmp_path)) == tmp_path and list(tmp_path.iterdir()) == [tmp_path / "a"]


@pytest.fixture
def restore_env():
    """In-process CLI calls set the state dir's variables (os.environ.setdefault): undo them."""
    import os

    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def test_tag_values_with_quotes_reach_mlflow_intact(tmp_path):
    from tasks.tracking import RunReader, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "posttrain", str(tmp_path / "art"))
    values = ["/tmp/it's", 'a"b', "both ' and \" and \\", "plain", "50%_x"]
    ids = {v: t.start_run("s", tags={"posttrain.output_path": v}) for v in values}
    t.start_run("s", tags={"posttrain.output_path": "50%_y"})  # LIKE would match it; the exact check must not
    reader = RunReader(uri)
    for v in values:
        assert [r["run_id"] for r in reader.runs_tagged("posttrain.output_path", v)] == [ids[v]], v


def test_lineage_of_a_value_with_a_quote_is_one_error_line(tmp_path, capsys, restore_env):
    from tasks.tracking import Tracker

    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "posttrain", str(tmp_path / "art"))
    capsys.readouterr()  # MLflow's notes on creating the store
    for target in ["sha256:it's", 'sha256:a"b\'c']:
        rc, _ = cli("lineage", target, "--state-dir", str(tmp_path))
        assert rc == 2
        one_error_line(capsys, target, "no stage run recorded")


@pytest.mark.parametrize("command", [["run", "--smoke", "--no-progress"], ["resume", "some-run"]])
def test_summary_json_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, command):
    state = tmp_path / "state"
    (tmp_path / "f").write_text("")
    for target, reason in [(tmp_path, "is a directory"), (tmp_path / "f" / "s.json", f"{tmp_path / 'f'} is a file")]:
        rc, seconds = cli(*command, "--summary-json", str(target), "--state-dir", str(state))
        assert rc == 2 and seconds < 5
        one_error_line(capsys, f"--summary-json {target}", reason)
    assert not state.exists()  # refused before anything started


def test_runs_json_into_a_closed_pipe_exits_quietly(tmp_path):
    import os

    from flows import runs

    for i in range(3):
        runs.record_start(tmp_path, f"run-{i}", {"recipe": "r1"}, None, "r1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "flows.cli", "runs", "--json", "--state-dir", str(tmp_path)], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `| head` that has already gone: every write gets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and err == "", err


def test_the_math_reward_does_not_warn_that_math_verifys_timeout_is_off(caplog, capsys):
    import logging

    import math_verify.grader
    import math_verify.parser

    from models.rewards.math import math_reward

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = False  # warn-once flags
    with caplog.at_level(logging.WARNING):
        assert math_reward("Q", "<answer>1/2</answer>", "0.5") == 1.0
        assert math_reward("Q", "<answer>3</answer>", "4") == 0.0
    assert "Timeout is disabled" not in caplog.text + capsys.readouterr().err
    assert math_verify.parser.TIMEOUT_WARNING_SHOWN  # the warning was attempted, and filtered


@pytest.mark.parametrize("command", [["runs"], ["runs", "--json"], ["lineage", "sha256:00"]])
def test_read_only_commands_do_not_create_a_mistyped_state_dir(tmp_path, capsys, command):
    state = tmp_path / "mistyped"
    rc, seconds = cli(*command, "--state-dir", str(state))
    assert rc == 2 and seconds < 5
    one_error_line(capsys, f"state dir {state} does not exist", "--state-dir")
    assert not state.exists()


def test_lineage_in_a_state_dir_without_a_store_does_not_create_one(tmp_path, capsys):
    rc, _ = cli("lineage", "sha256:00", "--state-dir", str(tmp_path))
    assert rc == 2
    one_error_line(capsys, f"no MLflow store {tmp_path / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []


def test_runs_refuses_a_negative_limit(tmp_path, capsys):
    from flows import runs

    runs.record_start(tmp_path, "run-0", {"recipe": "r1"}, None, "r1")
    assert cli("runs", "--limit", "-1", "--state-dir", str(tmp_path))[0] == 2
    one_error_line(capsys, "--limit -1")
    assert cli("runs", "--json", "--limit", "0", "--state-dir", str(tmp_path))[0] == 0
    assert capsys.readouterr().out.strip() == "[]"


@pytest.mark.slow  # a CLI process each (~10 s of imports on 2 cores)
@pytest.mark.parametrize("case", ["empty_sft", "missing_prompts", "missing_eval", "missing_model_dir"])
def test_bad_data_and_uris_fail_before_prefect_or_mlflow_start(tmp_path, case):
    """Every node's own data, the evaluation set and a local fetch.uri are checked before the flow
    starts: one `error:` line naming the setting, no traceback, no run recorded, no store created."""
    from helpers import run_cli

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = tmp_path / "nope.jsonl"
    setting, expected = {
        "empty_sft": (f"sft.dataset={empty}", f"{empty}: no records: the file is empty"),
        "missing_prompts": (f"grpo.prompts={missing}", f"grpo.prompts: {missing}: no such file"),
        "missing_eval": (f"evaluate.dataset={missing}", f"evaluate.dataset: {missing}: no such file"),
        "missing_model_dir": (f"fetch.uri={tmp_path / 'model'}", f"fetch.uri {tmp_path / 'model'}: "),
    }[case]
    state = tmp_path / "state"
    p = run_cli("run", "--smoke", "--no-progress", "--set", setting, state_dir=state, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert expected in p.stderr, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not (state / "mlflow.db").exists() and not list((state / "runs").glob("*.json"))


def test_a_missing_deepspeed_json_fails_the_recipe_load_naming_the_stage_and_the_choices():
    from models.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"sft: deepspeed config nope\.json: not found \(looked in .*zero2\.json"):
        load_recipe("r1", ["sft.deepspeed=nope.json"])


@pytest.mark.slow  # one flow that fails in its fetch stage (~20 s)
def test_a_stage_failure_is_one_error_line_and_prefects_tracebacks_go_to_a_file(tmp_path):
    from helpers import run_cli

    state = tmp_path / "state"
    p = run_cli("run", "--smoke", "--no-progress", "--set", "stages=[fetch]", "--set", "fetch.uri=models:/nope/1",
                state_dir=state, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out, out
    assert p.stderr.splitlines()[-1].startswith("error: fetch.uri models:/nope/1: not in the model registry of sqlite:")
    log = (state / "logs" / "tracebacks.log").read_text()
    assert "Traceback (most recent call last)" in log and "Registered Model with name=nope not found" in log
    assert f"traceback in {state / 'logs' / 'tracebacks.log'}" in out
