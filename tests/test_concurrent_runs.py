"""Concurrent runs never duplicate or corrupt work (issue #19, part 2).

Runs that need the same stage (the same cache key) at the same time: one computes it, the others
wait and take the cache hit (tasks/locks.py, around the look-up → compute → publish of
flows/post_train.py:_call), whether they are threads of one process or processes sharing only the
state dir.

Fast tests: the lock itself, with threads and with processes; a holder that fails or is SIGKILLed;
the wait line; two flow branches (threads) calling the same cached Prefect task; the GGUF
conversion cache; MLflow calls on a locked SQLite store.
Slow tests: 2 and then 8 identical smoke runs of the default recipe started together on one state
dir, as CLI processes and as flow runs of a deployment on a real Prefect server picked up by 2
process workers (every one completes, each stage key has exactly one MLflow stage run that is not a
cache hit, identical outputs), and a holder SIGKILLed mid-stage while another run waits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import R1_STAGES, TINY, kill_group, mlflow_runs, poll, run_cli, sets
from test_operations import kill_recorded_flows, prefect, prefect_server  # noqa: F401 - the server fixture
from benchmarks.pool_throughput import prefect_api
from tasks.locks import lock_path, read_holder, stage_lock

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the lock, fast


def _compute_once(state: Path, key: str, result: Path, log: Path, seconds: float = 0.3, fail: bool = False,
                  waits: list | None = None) -> str:
    """What _call does under the lock: look up the result, else compute and publish it."""
    with stage_lock(state, "sft", key, on_wait=(waits.append if waits is not None else None)):
        if result.exists():
            return "hit"
        with open(log, "a") as f:
            f.write(f"{os.getpid()}-{threading.get_ident()}\n")
        time.sleep(seconds)
        if fail:
            raise RuntimeError("the stage failed")
        tmp = result.with_name(result.name + f".tmp-{threading.get_ident()}")
        tmp.write_text("done")
        os.replace(tmp, result)
        return "computed"


def test_threads_of_one_process_compute_a_key_once(tmp_path):
    result, log, waits = tmp_path / "result", tmp_path / "computed.log", []
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(_compute_once(tmp_path, "k" * 32, result, log,
                                                                              waits=waits)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["computed"] + ["hit"] * 5
    assert len(log.read_text().splitlines()) == 1
    assert waits and all(w.startswith(f"waiting for sft (cache key {'k' * 32}) computed by another run")
                         for w in waits)
    assert lock_path(tmp_path, "k" * 32) == tmp_path / "locks" / f"{'k' * 32}.lock"


def test_different_keys_do_not_wait_for_each_other(tmp_path):
    waits, t0 = [], time.monotonic()
    threads = [threading.Thread(target=_compute_once, args=(tmp_path, f"key{i}", tmp_path / f"r{i}",
                                                            tmp_path / "log", 1.0), kwargs={"waits": waits})
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert waits == [] and time.monotonic() - t0 < 2.5


_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tasks.locks import stage_lock
    state = Path(sys.argv[1])
    (state / f"ready-{{os.getpid()}}").touch()
    while not (state / "go").exists():
        time.sleep(0.01)
    with stage_lock(state, "sft", "p" * 32):
        if (state / "result").exists():
            print("hit")
        else:
            with open(state / "computed.log", "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(0.5)
            (state / "result.tmp").write_text("done")
            os.replace(state / "result.tmp", state / "result")
            print("computed")
""")


def test_processes_compute_a_key_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    poll(lambda: len(list(tmp_path.glob("ready-*"))) == 4, 60, "4 workers ready")
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert sorted(outs) == ["computed"] + ["hit"] * 3
    assert len((tmp_path / "computed.log").read_text().splitlines()) == 1


def test_a_holder_that_fails_lets_the_waiter_compute(tmp_path):
    """The holder's stage raises: the lock is released with the error and the waiter, finding no
    result, computes itself rather than hanging or taking a hit that does not exist."""
    result, log = tmp_path / "result", tmp_path / "log"
    errors, outcomes = [], []

    def holder():
        try:
            _compute_once(tmp_path, "f" * 32, result, log, 2.0, fail=True)
        except RuntimeError as e:
            errors.append(e)

    h = threading.Thread(target=holder)
    h.start()
    # the holder computes for 2 s: found within 20 ms, the waiter surely comes while it holds the lock
    poll(lambda: log.exists(), 10, "the holder computing", every=0.02)
    waits = []
    outcomes.append(_compute_once(tmp_path, "f" * 32, result, log, 0.1, waits=waits))
    h.join()
    assert len(errors) == 1 and outcomes == ["computed"] and len(waits) == 1
    assert len(log.read_text().splitlines()) == 2  # the failed attempt, then the waiter's


def test_a_sigkilled_holder_releases_the_lock(tmp_path):
    """flock is released by the kernel when its holder dies: SIGKILL one that holds the key for a
    minute, and a waiter gets the lock at once, computes and says whom it waited for."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tasks.locks import stage_lock
        with stage_lock({str(tmp_path)!r}, "grpo", "d" * 32, flow_run_id="flow-1"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert read_holder(tmp_path, "d" * 32)["pid"] == holder.pid
    waits: list[str] = []
    got: list[float | None] = []

    def waiter():
        with stage_lock(tmp_path, "grpo", "d" * 32, on_wait=waits.append) as waited:
            got.append(waited)

    w = threading.Thread(target=waiter)
    w.start()
    poll(lambda: waits, 10, "the waiter to wait")
    assert not got and w.is_alive()
    assert f"(flow run flow-1, pid {holder.pid})" in waits[0]
    t0 = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    w.join(timeout=10)
    assert not w.is_alive() and time.monotonic() - t0 < 5
    assert got and got[0] is not None and read_holder(tmp_path, "d" * 32)["pid"] == os.getpid()


def test_a_long_wait_says_so_again(tmp_path):
    waits: list[str] = []

    def waiter():
        with stage_lock(tmp_path, "fetch", "e" * 32, on_wait=waits.append, still_waiting_every=0.3):
            pass

    with stage_lock(tmp_path, "fetch", "e" * 32):
        t = threading.Thread(target=waiter)
        t.start()
        poll(lambda: len(waits) >= 3, 10, "repeated wait lines")
    t.join(timeout=5)
    assert not t.is_alive()
    assert waits[0].startswith("waiting for fetch") and waits[1].startswith("still waiting for fetch")


# ---------------------------------------------------------------- through Prefect, fast


def test_parallel_branches_call_a_cached_task_once(tmp_path):
    """Two branches (threads of one flow run, as flows/dag.py runs them) call the same cached
    Prefect task with the same cache key: one runs it; the other waits and gets Prefect's cache
    hit, with a cache-hit MLflow stage run of its own."""
    from prefect import flow, task

    from data_contracts.artifacts import ArtifactRef, digest_path
    from flows.dag import run_graph
    from flows.post_train import _cached, _call
    from tasks.common import RunContext, StageResult, default_tracking_uri

    out = tmp_path / "out.txt"
    out.write_text("the output")
    calls = tmp_path / "calls.log"

    @task(name="slow-stage")
    def slow_stage(stage: str, cache_key: str, ctx: RunContext) -> StageResult:
        with open(calls, "a") as f:
            f.write(stage + "\n")
        time.sleep(2.0)
        return StageResult(stage=stage, cache_key=cache_key,
                           output=ArtifactRef(kind="samples", path=str(out), digest=digest_path(out)))

    class Node:
        def __init__(self, name):
            self.name, self.inputs = name, {}

    state = tmp_path / "state"
    ctx = RunContext(state_dir=str(state), tracking_uri=default_tracking_uri(state), experiment="posttrain")

    @flow(name="two-branches")
    def two_branches():
        t = _cached(slow_stage, results_dir=state / "results", retries=0)
        return run_graph([Node("a"), Node("b")],
                         lambda node, up: _call(t, dict(stage=node.name, cache_key="c" * 32, ctx=ctx), ctx, {}, {}),
                         max_parallel=2)

    done = two_branches()
    assert len(calls.read_text().splitlines()) == 1
    assert sorted(cached for _, cached, _ in done.values()) == [False, True]
    client, exp = mlflow_runs(state)
    runs = client.search_runs([exp])
    assert sorted(r.data.tags["posttrain.cached"] for r in runs) == ["true"]  # the computed one: no StageRun here


# ---------------------------------------------------------------- shared caches in the state dir, fast


def test_gguf_conversion_runs_once_for_concurrent_callers(tmp_path, monkeypatch):
    from models.modeling import gguf
    calls = []

    def fake_convert(src, out, dtype, digest):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        tmp = out.parent / f".{out.name}.tmp-{threading.get_ident()}"
        tmp.mkdir()
        (tmp / gguf.COMPLETE).write_text("x\n")
        os.replace(tmp, out)
        return out

    monkeypatch.setattr(gguf, "require_gguf_support", lambda: None)
    monkeypatch.setattr(gguf, "_convert", fake_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(gguf.convert_gguf(tmp_path / "m.gguf",
                                                                            tmp_path / "models" / "gguf-1")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [tmp_path / "models" / "gguf-1"] * 4


def test_mlflow_calls_retry_while_the_sqlite_store_is_locked(tmp_path, monkeypatch):
    """A client call refused with 'database is locked' (another process holds the write lock past
    MLflow's 20 s busy timeout) is made again, and the tracker records no error."""
    import sqlite3

    from tasks import tracking

    t = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "posttrain", str(tmp_path / "art"))
    run = t.start_run("x")
    real, failures = t.client._client.log_batch, []

    def flaky(*a, **kw):
        if len(failures) < 2:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real(*a, **kw)

    monkeypatch.setattr(t.client._client, "log_batch", flaky)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    t.set_tags(run, {"a": "b"})
    assert len(failures) == 2 and t.errors == [] and t.client.get_run(run).data.tags["a"] == "b"
    monkeypatch.setattr(t.client._client, "log_batch", lambda *a, **kw: (_ for _ in ()).throw(ValueError("bad")))
    t.set_tags(run, {"c": "d"})  # any other error: not retried, logged as a tracking error as before
    assert len(t.errors) == 1 and "ValueError: bad" in t.errors[0]


@pytest.mark.slow
def test_mlflow_waits_out_a_store_locked_past_the_busy_timeout(tmp_path):
    """The real thing: another connection holds the store's write lock for 23 s (past MLflow's 20 s
    busy timeout); a tag written meanwhile still lands, with no tracking error."""
    import sqlite3

    from tasks.tracking import Tracker

    db = tmp_path / "mlflow.db"
    t = Tracker(f"sqlite:///{db}", "posttrain", str(tmp_path / "art"))
    run = t.start_run("x")
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # released from a timer thread
    conn.execute("BEGIN EXCLUSIVE")
    threading.Timer(23.0, conn.rollback).start()
    t0 = time.monotonic()
    t.set_tags(run, {"a": "b"})
    assert time.monotonic() - t0 >= 20
    assert t.errors == [] and t.client.get_run(run).data.tags["a"] == "b"


# ---------------------------------------------------------------- concurrent CLI runs, slow

def _start(state: Path, i: int, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    return run_cli("run", "--smoke", "--no-progress", *sets(overrides), state_dir=state,
                   summary=state.parent / f"summary-{i}.json", env=env,
                   stdout=open(state.parent / f"run-{i}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stage_runs(state: Path) -> list[dict]:
    client, exp = mlflow_runs(state)
    return [{"status": r.info.status, **r.data.tags} for r in client.search_runs([exp], max_results=10000)
            if r.data.tags.get("posttrain.stage")]


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 8])
def test_identical_runs_started_together_train_each_stage_once(tmp_path, n):
    state = tmp_path / "state"
    procs = [_start(state, i, TINY) for i in range(n)]
    try:
        rcs = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in range(n)]
    assert rcs == [0] * n, "\n\n".join(log[-3000:] for log in logs)

    summaries = [json.loads((tmp_path / f"summary-{i}.json").read_text()) for i in range(n)]
    assert len({s["final_model"]["digest"] for s in summaries}) == 1
    for stage in R1_STAGES:  # every run reports the same output and cache key for every stage
        rows = [next(r for r in s["stages"] if r["stage"] == stage) for s in summaries]
        assert len({(r["output"]["digest"], r["cache_key"]) for r in rows}) == 1, stage
    keys = {r["cache_key"] for r in summaries[0]["stages"]}
    assert all(s["tracking_errors"] == 0 and s["registered_model"] for s in summaries)
    assert len({s["registered_model"] for s in summaries}) == n  # one model version per run

    runs = _stage_runs(state)
    computed = Counter(r["posttrain.cache_key"] for r in runs if r["posttrain.cached"] == "false")
    assert set(computed.values()) == {1}, computed  # no cache key computed twice
    assert keys <= set(computed)  # ... and every stage (and evaluation) once
    assert all(r["status"] == "FINISHED" for r in runs)
    per_run = Counter(r["posttrain.prefect_flow_run_id"] for r in runs)
    assert len(per_run) == n and len(set(per_run.values())) == 1  # each run recorded every stage run
    assert sum("computed by another run" in log for log in logs) >= 1


@pytest.mark.slow
def test_a_holder_killed_mid_stage_leaves_the_stage_to_the_waiter(tmp_path):
    """Two identical runs; once one waits for the other's SFT, SIGKILL the holder (its whole
    process group): the waiter gets the lock, finds no result, trains SFT itself (from the holder's
    checkpoints in the shared work dir) and finishes."""
    state = tmp_path / "state"
    longer = [o for o in TINY if not o.startswith("sft.")] + ["sft.max_steps=400", "sft.save_every=20",
                                                              "sft.batch_size=4", "sft.micro_batch_size=4"]
    procs = [_start(state, i, longer) for i in range(2)]
    try:
        logs = [tmp_path / f"run-{i}.log" for i in range(2)]
        waiter = poll(lambda: next((f"run {i}" for i in range(2) if "sft: waiting for sft" in logs[i].read_text()),
                                   None), 600, "a run waiting for the other's sft", every=0.2)
        waiter = int(waiter.split()[1])
        holder = 1 - waiter
        assert procs[holder].poll() is None, "the holder finished sft before it could be killed"
        os.killpg(procs[holder].pid, signal.SIGKILL)
        procs[holder].wait()
        assert procs[waiter].wait(timeout=900) == 0, logs[waiter].read_text()[-3000:]
    finally:
        for p in procs:
            kill_group(p)
    text = logs[waiter].read_text()
    assert "sft was not finished by the run waited for (it failed or stopped): computed here" in text
    sft = [r for r in _stage_runs(state) if r["posttrain.stage"] == "sft" and r["posttrain.cached"] == "false"]
    assert sorted(r["status"] for r in sft) == ["FINISHED", "RUNNING"]  # the killed holder's never ended
    summary = json.loads((tmp_path / f"summary-{waiter}.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == R1_STAGES


# ---------------------------------------------------------------- through a server and 2 workers, slow


def _worker_runs(logs: list[Path], ids: list[str]) -> dict[str, set[str]]:
    """The flow runs each worker took, from its log: "Worker 'w0' submitting flow run '<id>'" unless
    the server refused that submission ("Aborted submission of flow run '<id>'": the other worker
    had claimed it)."""
    took = {}
    for w, log in enumerate(logs):
        text = log.read_text()
        tried = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", text))
        aborted = set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))
        took[f"w{w}"] = (tried - aborted) & set(ids)
    return {w: got for w, got in took.items() if got}


@pytest.mark.slow
def test_identical_runs_through_a_server_and_two_workers_train_each_stage_once(prefect_server, tmp_path):
    """The r1-smoke deployment of deployments/prefect.yaml on a process pool with 2 workers (2 flow
    runs each at most): 2 and then 8 identical (shrunk) smoke runs created together through the
    server's API, each batch on its own state dir. Every flow run completes on one of the workers,
    each stage key is computed once per state dir, and every run's summary is the same."""
    env, api = prefect_server["env"], prefect_server["api"]
    prefect("work-pool", "create", "posttrain-process", "--type", "process", env=env)
    prefect("--no-prompt", "deploy", "--name", "r1-smoke", "--prefect-file", "deployments/prefect.yaml", env=env)
    dep = prefect_api(api, "GET", "/deployments/name/post-train/r1-smoke")
    logs = [tmp_path / f"worker-{w}.log" for w in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "posttrain-process",
                                 "--name", f"w{w}", "--limit", "2"], cwd=tmp_path,
                                env=dict(os.environ, **env, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="INFO"),
                                stdout=open(logs[w], "w"), stderr=subprocess.STDOUT, start_new_session=True)
               for w in range(2)]
    try:
        for n in (2, 8):
            state = tmp_path / f"state-{n}"
            ids = [prefect_api(api, "POST", f"/deployments/{dep['id']}/create_flow_run",
                        {"parameters": {"state_dir": str(state), "overrides": TINY}})["id"] for _ in range(n)]

            def final_states():
                got = [prefect_api(api, "GET", f"/flow_runs/{i}")["state"]["type"] for i in ids]
                return got if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in got) else None

            states = poll(final_states, 900, f"{n} flow runs on the workers", every=2, alive=workers[0])
            assert states == ["COMPLETED"] * n, "\n\n".join(log.read_text()[-4000:] for log in logs)
            took = _worker_runs(logs, ids)
            assert sorted(i for got in took.values() for i in got) == sorted(ids), took  # each run on one worker
            if n == 8:  # more runs than one worker's limit: both workers took some
                assert sorted(took) == ["w0", "w1"], took
            _assert_trained_once(state, ids, n)
        assert sum("computed by another run" in log.read_text() for log in logs) >= 1
    finally:
        for w in workers:
            kill_group(w)
        for n in (2, 8):
            kill_recorded_flows(tmp_path / f"state-{n}")


def _assert_trained_once(state: Path, ids: list[str], n: int) -> None:
    from flows import runs

    client, exp = mlflow_runs(state)
    summaries = []
    for i in ids:
        assert runs.find_run(state, i)["status"] == "COMPLETED"
        (parent,) = client.search_runs([exp], f"tags.`posttrain.prefect_flow_run_id` = '{i}' "
                                              "and tags.`posttrain.kind` = 'flow'")
        assert parent.info.status == "FINISHED" and parent.data.tags["posttrain.smoke"] == "true"
        path = client.download_artifacts(parent.info.run_id, "summary.json", str(state.parent / f"dl-{i}"))
        summaries.append(json.loads(Path(path).read_text()))
    assert len({s["final_model"]["digest"] for s in summaries}) == 1
    for stage in R1_STAGES:
        rows = [next(r for r in s["stages"] if r["stage"] == stage) for s in summaries]
        assert len({(r["output"]["digest"], r["cache_key"]) for r in rows}) == 1, stage
    keys = {r["cache_key"] for r in summaries[0]["stages"]}
    runs_ = _stage_runs(state)
    computed = Counter(r["posttrain.cache_key"] for r in runs_ if r["posttrain.cached"] == "false")
    assert set(computed.values()) == {1}, computed
    assert keys <= set(computed)
    assert all(r["status"] == "FINISHED" for r in runs_)
    per_run = Counter(r["posttrain.prefect_flow_run_id"] for r in runs_)
    assert sorted(per_run) == sorted(ids) and len(set(per_run.values())) == 1
