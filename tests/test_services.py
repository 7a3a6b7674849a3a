"""`posttrain services up|status|down`: a Prefect server and an MLflow server on PostgreSQL.

The tests that need PostgreSQL read `POSTTRAIN_TEST_DATABASE_URL` (a role with CREATEDB; `.ci/run`
starts a throw-away cluster and sets it) and skip without it. The slow one starts both servers, runs
the default recipe against them at a tiny size, killed before `filter` and resumed, reads it back
through `posttrain runs` and `posttrain lineage`, stops them, and starts them again on the same
databases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from helpers import R1_STAGES, run_cli, sets
from helpers import TINY as TINY_OVERRIDES

from flows import processes, services

PG_URL = os.environ.get("POSTTRAIN_TEST_DATABASE_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="POSTTRAIN_TEST_DATABASE_URL is unset (.ci/run starts PostgreSQL "
                                                 "and sets it): no PostgreSQL to start the services on")

TINY = sets(TINY_OVERRIDES)  # r1 at a size that runs in about a minute on 2 cores


@pytest.fixture(autouse=True)
def _no_callers_database(monkeypatch):
    """A developer's own POSTTRAIN_DATABASE_URL must not reach the commands under test."""
    monkeypatch.delenv("POSTTRAIN_DATABASE_URL", raising=False)


def cli(*args, tmp_path, check=True, env=None):
    """`posttrain ARGS --state-dir <tmp>/state` in a subprocess."""
    return run_cli(*args, state_dir=tmp_path / "state", check=check, env=env)


def drop_databases(base_url: str) -> None:
    """Remove `<db>_prefect` and `<db>_mlflow` (FORCE: a server's last connections may linger)."""
    from psycopg2 import sql

    base = services.parse_database_url(base_url)
    conn = services._connect(base, "postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for u in services.service_databases(base).values():
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(u.database)))
    conn.close()


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


# ---------------------------------------------------------------------------------------- fast


def test_a_database_that_cannot_be_reached_is_one_line_naming_it_without_its_password(tmp_path):
    port = processes.free_port("127.0.0.1")  # nothing listens there
    p = cli("services", "up", "--database-url", f"postgresql://bob:s3cret@127.0.0.1:{port}/team",
            "--services-dir", str(tmp_path / "svc"), tmp_path=tmp_path, check=False)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: cannot connect to PostgreSQL at postgresql://bob:***@127.0.0.1:{port}/team: ")
    assert p.stderr.count("\n") == 1 and "s3cret" not in p.stderr + p.stdout
    assert not (tmp_path / "svc" / services.RECORD).exists()


def test_a_url_that_is_not_postgresql_or_is_missing_says_what_to_give(tmp_path):
    p = cli("services", "up", "--database-url", "mysql://bob:s3cret@db/team", "--services-dir", str(tmp_path / "svc"),
            tmp_path=tmp_path, check=False)
    assert p.returncode == 2 and "mysql://bob:***@db/team" in p.stderr and "postgresql://user:password@host:port/db" in p.stderr
    assert "s3cret" not in p.stderr
    p = cli("services", "up", "--services-dir", str(tmp_path / "svc"), tmp_path=tmp_path, check=False)
    assert p.returncode == 2 and "--database-url" in p.stderr and "POSTTRAIN_DATABASE_URL" in p.stderr


def test_status_and_down_with_nothing_running(tmp_path):
    svc = tmp_path / "svc"
    p = cli("services", "status", "--services-dir", str(svc), tmp_path=tmp_path, check=False)
    assert p.returncode == 1 and f"no services running: no {svc / services.RECORD}" in p.stdout
    p = cli("services", "down", "--services-dir", str(svc), tmp_path=tmp_path)
    assert "no services running" in p.stdout
    # the default services dir is <state dir>/services
    p = cli("services", "status", tmp_path=tmp_path, check=False)
    assert p.returncode == 1 and str(tmp_path / "state" / "services" / services.RECORD) in p.stdout


def _record(pid: int, ticks) -> dict:
    return {"services_dir": "x", "services": {n: {"pid": pid, "start_ticks": ticks, "url": f"http://127.0.0.1:9/{n}",
                                                  "health": "http://127.0.0.1:9/health", "log": f"{n}.log"}
                                              for n in services.SERVICES}}


def test_a_second_up_is_refused_while_the_first_runs(tmp_path):
    svc = tmp_path / "svc"
    svc.mkdir()
    services.write_record(svc, _record(os.getpid(), processes.start_ticks(os.getpid())))  # this process: alive
    p = cli("services", "up", "--database-url", "postgresql://u:pw@127.0.0.1:9/db", "--services-dir", str(svc),
            tmp_path=tmp_path, check=False)
    assert p.returncode == 2 and "services already running" in p.stderr and f"prefect pid {os.getpid()}" in p.stderr
    assert "posttrain services down" in p.stderr


def test_a_stale_record_reads_not_running_and_a_reused_pid_is_not_taken_for_the_server(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    svc = tmp_path / "svc"
    svc.mkdir()
    services.write_record(svc, _record(dead.pid, 1))
    p = cli("services", "status", "--services-dir", str(svc), tmp_path=tmp_path, check=False)
    assert p.returncode == 1 and p.stdout.count("not running") == 2
    assert not processes.alive(os.getpid(), processes.start_ticks(os.getpid()) + 1)  # same pid, another start
    p = cli("services", "down", "--services-dir", str(svc), tmp_path=tmp_path)  # kills nothing, clears the record
    assert not (svc / services.RECORD).exists()


def test_a_server_that_exits_or_never_answers_fails_up_naming_its_log(tmp_path):
    log = tmp_path / "prefect.log"
    log.write_text("starting\nsqlalchemy.exc.OperationalError: the database said no\n")
    health = f"http://127.0.0.1:{processes.free_port('127.0.0.1')}/api/health"  # nothing answers
    exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(services.ServicesError, match=r"prefect server exited \(3\).*" + str(log) + ".*said no"):
        services._wait_healthy({"prefect": {"proc": exits, "health": health, "log": str(log)}}, timeout=30)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(services.ServicesError, match=r"did not answer .* within 1 s; see its log " + str(log)):
            services._wait_healthy({"prefect": {"proc": silent, "health": health, "log": str(log)}}, timeout=1)
    finally:
        silent.kill()
        silent.wait()


@needs_pg
def test_the_two_databases_are_created_once(pg_base):
    dbs = services.ensure_databases(pg_base)  # pg_base itself does not exist: created over `postgres`
    assert [u.database for u in dbs.values()] == [f"{pg_base.database}_prefect", f"{pg_base.database}_mlflow"]
    assert services.ensure_databases(pg_base) == dbs  # a second `up` finds them
    for u in dbs.values():
        services._connect(u, u.database).close()


# ---------------------------------------------------------------------------------------- slow


@needs_pg
@pytest.mark.slow
def test_services_up_a_killed_smoke_run_resumed_lineage_and_down(tmp_path, pg_base):
    base = pg_base
    url, password = base.render_as_string(hide_password=False), base.password
    svc, state = tmp_path / "svc", tmp_path / "state"
    try:
        up = cli("services", "up", "--database-url", url, "--services-dir", str(svc), tmp_path=tmp_path)
        record = json.loads((svc / services.RECORD).read_text())
        prefect, mlflow = record["services"]["prefect"], record["services"]["mlflow"]
        assert f"export PREFECT_API_URL={prefect['url']}" in up.stdout
        assert f"posttrain run --tracking-uri {mlflow['url']}" in up.stdout
        assert f":{password}@" not in up.stdout + (svc / services.RECORD).read_text()
        assert prefect["url"].startswith("http://127.0.0.1:") and mlflow["url"].startswith("http://127.0.0.1:")
        print(f"services up: {record['startup_seconds']} s")

        # a run killed before `filter` (its own process group: the fault kills the group), then resumed
        t0, env = time.monotonic(), {"PREFECT_API_URL": prefect["url"]}
        with open(tmp_path / "killed.log", "w") as log:
            killed = run_cli("run", "--smoke", "--no-progress", *TINY, "--tracking-uri", mlflow["url"],
                             state_dir=state, env=dict(env, POSTTRAIN_FAULT="before-stage:filter"),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            assert killed.wait(timeout=600) == -9, (tmp_path / "killed.log").read_text()[-3000:]
        (crashed,) = json.loads(cli("runs", "--json", tmp_path=tmp_path).stdout)
        assert crashed["status"] == "CRASHED" and crashed["failed_stage"] == "filter"
        cli("resume", crashed["flow_run_id"], "--no-progress", "--summary-json", str(tmp_path / "summary.json"),
            tmp_path=tmp_path, env=env)  # the recorded tracking URI: the services' MLflow
        print(f"killed smoke run and its resume against the services: {time.monotonic() - t0:.1f} s")
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert [(st["stage"], st["cached"]) for st in summary["stages"]] == \
            [(name, name not in ("filter", "refine")) for name in R1_STAGES]
        flow_run = json.loads(get(f"{prefect['url']}/flow_runs/{summary['flow_run_id']}"))
        assert flow_run["state"]["type"] == "COMPLETED"  # the flow ran on the services' Prefect server
        killed_run = json.loads(get(f"{prefect['url']}/flow_runs/{crashed['flow_run_id']}"))
        assert killed_run["state"]["type"] == "CRASHED"  # its resume said so: not RUNNING for good
        assert not (state / "mlflow.db").exists()  # nothing tracked in the embedded store

        records = {r["flow_run_id"]: r for r in json.loads(cli("runs", "--json", tmp_path=tmp_path).stdout)}
        assert records[summary["flow_run_id"]]["status"] == "COMPLETED"
        assert records[summary["flow_run_id"]]["mlflow_parent_run_id"] == summary["mlflow_parent_run_id"]

        chain = json.loads(cli("lineage", summary["registered_model"], "--json", "--tracking-uri", mlflow["url"],
                               tmp_path=tmp_path).stdout)
        assert chain["problems"] == [] and [s["stage"] for s in chain["stages"]] == R1_STAGES
        by_stage = {st["stage"]: st for st in summary["stages"]}
        for s in chain["stages"]:  # the chain lists producing runs: the killed run's up to `sample`
            mine = by_stage[s["stage"]]
            assert s["output_digest"] == mine["output"]["digest"] and s["cache_key"] == mine["cache_key"]
            assert mine["cached"] or s["mlflow_run_id"] == mine["mlflow_run_id"]
            produced_by = crashed["flow_run_id"] if mine["cached"] else summary["flow_run_id"]
            assert s["prefect_flow_run_id"] == produced_by and s["prefect_task_run_id"]

        from mlflow.tracking import MlflowClient

        parent = MlflowClient(mlflow["url"]).get_run(summary["mlflow_parent_run_id"])
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # served, under the shared root
        assert list((svc / "mlartifacts").rglob("model.safetensors"))
        assert b"<html" in get(mlflow["ui"]).lower()[:2000]  # the MLflow UI answers on the same server

        status = cli("services", "status", "--services-dir", str(svc), tmp_path=tmp_path)
        assert status.stdout.count("healthy") == 2
    finally:
        down = cli("services", "down", "--services-dir", str(svc), tmp_path=tmp_path, check=False)
    assert down.returncode == 0 and "stopped prefect" in down.stdout
    assert not any(processes.alive(s["pid"], s["start_ticks"]) for s in record["services"].values())
    assert not (svc / services.RECORD).exists()

    try:  # a second `up` on the same databases: migrated already, and the runs are still there
        cli("services", "up", "--database-url", url, "--services-dir", str(svc), tmp_path=tmp_path)
        again = json.loads((svc / services.RECORD).read_text())
        print(f"second services up: {again['startup_seconds']} s")
        from mlflow.tracking import MlflowClient

        run = MlflowClient(again["services"]["mlflow"]["url"]).get_run(summary["mlflow_parent_run_id"])
        assert run.info.status == "FINISHED"
    finally:
        cli("services", "down", "--services-dir", str(svc), tmp_path=tmp_path, check=False)


@pytest.fixture
def pg_base():
    """A database name of the test's own on the test server; its two service databases are dropped after."""
    base = services.parse_database_url(PG_URL).set(database=f"pt_{uuid.uuid4().hex[:8]}")
    yield base
    drop_databases(base.render_as_string(hide_password=False))
