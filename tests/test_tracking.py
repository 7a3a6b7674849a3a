"""Tracking never fails a stage: a store that is down is logged and remembered, nothing raises."""

import logging

import pytest

from tasks.tracking import Tracker, flatten, mlflow_digest


def test_unreachable_store_never_raises(caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with caplog.at_level(logging.WARNING, logger="posttrain.tracking"):
        t = Tracker("http://127.0.0.1:9/", "exp", str(tmp_path))
        run = t.start_run("stage", params={"a": 1}, tags={"x": "y"})
        t.log_metrics(run, [{"step": 1, "loss": 0.5}])
        t.log_dataset(run, __file__, "n", "sha256:" + "0" * 64)
        t.end_run(run)
    assert not t.ok and run is None
    assert t.errors and "tracking URI http://127.0.0.1:9/" in t.errors[0]


def test_values_over_mlflow_limits_are_cut_not_fatal(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", str(tmp_path / "art"))
    run = t.start_run("stage", params={"long": "x" * 10000, "nested": {"k": 1}}, tags={"t": "y" * 9000})
    t.log_metrics(run, [{"step": 0, "eval/pass@1": 0.5, "weird name!": 1.0}])
    t.end_run(run)
    assert t.errors == []
    r = t.client.get_run(run)
    assert r.data.params["nested.k"] == "1" and len(r.data.params["long"]) == 6000
    assert r.data.metrics["eval/pass_at_1"] == 0.5 and "weird name_" in r.data.metrics


def test_helpers():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert mlflow_digest("sha256:" + "ab" * 32) == "ab" * 16


def test_a_copied_state_dir_store_writes_artifacts_in_the_copy(tmp_path):
    """The disk-full advice copies the state dir; the copy's store must not send artifacts back."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    t = Tracker(f"sqlite:///{old / 'mlflow.db'}", "exp", str(old / "mlartifacts"))
    t.log_json(t.start_run("first"), {"a": 1}, "a.json")
    t.client._tracking_client.store.engine.dispose()  # SQLite files closed before the copy
    shutil.copytree(old, new)
    before = sorted(p for p in old.rglob("*") if p.is_file())
    t2 = Tracker(f"sqlite:///{new / 'mlflow.db'}", "exp", str(new / "mlartifacts"))
    run = t2.start_run("second")
    t2.log_json(run, {"b": 2}, "b.json")
    assert t2.errors == [] and list((new / "mlartifacts").rglob("b.json"))
    assert sorted(p for p in old.rglob("*") if p.is_file()) == before
    assert t2.client.get_run(run).info.artifact_uri.startswith((new / "mlartifacts").as_uri())


# ----------------------------------------------------------------------------- outage queue


def _offline_tracker(monkeypatch, tmp_path):
    from tasks.common import state_paths

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    paths = state_paths(tmp_path / "state")
    return Tracker("http://127.0.0.1:9/", "exp", str(paths["artifacts"]), queue_dir=paths["tracking_queue"]), paths


def _queue_a_run(t, model_dir):
    parent = t.start_run("flow", params={"recipe": "r1"}, tags={"posttrain.kind": "flow"})
    child = t.start_run("sft", params={"lr": 0.1}, tags={"posttrain.stage": "sft", "posttrain.parent": parent},
                        parent_run_id=parent)
    t.log_metrics(child, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}], prefix="train/")
    t.log_artifacts(child, str(model_dir), "model")
    t.end_run(child)
    t.log_json(parent, {"final_run": child}, "summary.json")
    t.end_run(parent, "FAILED")
    return parent, child


def test_an_unreachable_store_queues_every_call_after_one_failure_and_sync_replays_them(monkeypatch, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from tasks.common import replay_queued
    from tasks.tracking_queue import IdMap, now_ms

    t, paths = _offline_tracker(monkeypatch, tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    t0 = now_ms()
    parent, child = _queue_a_run(t, model)
    t1 = now_ms()
    assert t.offline and parent.startswith("queued-") and child.startswith("queued-") and parent != child
    assert len(t.errors) == 1 and str(t.journal.path) in t.errors[0]  # one failure, then no more waiting
    assert t.queued == 7  # 2 runs (params inside), metrics, artifacts, 2 ends, the JSON
    assert replay_queued(paths["root"]) == {"journals": 0, "calls": 0, "runs": 0, "skipped": [], "uris": []}

    t.journal.close()  # the run's process ended: its journal may be replayed
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = replay_queued(paths["root"], tracking_uri=db)
    assert report == {"journals": 1, "calls": 7, "runs": 2, "skipped": [], "uris": [db]}
    ids = IdMap(paths["tracking_queue"]).ids
    client = MlflowClient(db)
    p, c = client.get_run(ids[parent]), client.get_run(ids[child])
    assert (p.info.status, c.info.status) == ("FAILED", "FINISHED")
    assert c.data.tags["mlflow.parentRunId"] == ids[parent] and c.data.tags["posttrain.parent"] == ids[parent]
    assert c.data.params == {"lr": "0.1"} and c.data.tags["posttrain.replayed"] == "true"
    assert [(m.step, m.value) for m in client.get_metric_history(ids[child], "train/loss")] == [(1, 0.5), (2, 0.25)]
    assert t0 <= p.info.start_time <= c.info.start_time <= c.info.end_time <= t1  # when it ran, not the replay
    assert [a.path for a in client.list_artifacts(ids[child], "model")] == ["model/config.json"]
    summary = json.loads(open(client.download_artifacts(ids[parent], "summary.json", str(tmp_path))).read())
    assert summary == {"final_run": ids[child]}  # placeholders inside logged values are translated too
    assert replay_queued(paths["root"], tracking_uri=db) is None and not list(paths["tracking_queue"].glob("*.jsonl"))

    # a later run of the state dir that logs against a placeholder (a cached result) reaches the real run
    later = Tracker(db, "exp", str(paths["artifacts"]), queue_dir=paths["tracking_queue"])
    later.set_tags(child, {"posttrain.cached_by": "later"})
    assert client.get_run(ids[child]).data.tags["posttrain.cached_by"] == "later"


def test_a_replay_that_fails_midway_goes_on_where_it_stopped_without_a_second_run(monkeypatch, tmp_path):
    import pytest
    from mlflow.tracking import MlflowClient

    import tasks.tracking_queue as tq
    from tasks.common import replay_queued

    t, paths = _offline_tracker(monkeypatch, tmp_path)
    _queue_a_run(t, tmp_path / "gone")  # its artifact dir is not on disk at replay: skipped, said so
    t.journal.close()
    real_apply, calls = tq._apply, []

    def flaky(tracker, call, ids):
        calls.append(call["call"])
        if len(calls) == 4:
            raise ConnectionError("the store went away again")
        return real_apply(tracker, call, ids)

    monkeypatch.setattr(tq, "_apply", flaky)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConnectionError):
        replay_queued(paths["root"], tracking_uri=db)
    monkeypatch.setattr(tq, "_apply", real_apply)
    report = replay_queued(paths["root"], tracking_uri=db)
    assert report["calls"] == 4 and report["runs"] == 0  # calls 4-7; both runs were created before
    assert report["skipped"] == [f"log_artifacts {tmp_path / 'gone'}: no longer on disk"]
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["flow", "sft"]


def test_a_journal_torn_by_a_kill_mid_line_replays_its_whole_lines(tmp_path):
    from tasks.tracking_queue import read_journal

    j = tmp_path / "1-1.jsonl"
    j.write_text('{"header": 1}\n{"call": "end_run", "args": ["r"], "kwargs": {}, "at_ms": 1}\n{"call": "set_t')
    header, calls = read_journal(j)
    assert header == {"header": 1} and [c["call"] for c in calls] == ["end_run"]


@pytest.mark.slow
def test_a_run_whose_store_is_down_completes_and_sync_gives_it_full_lineage(tmp_path):
    """The CLI end to end: refused connections for the whole run (fetch + sft, smoke size), one plain
    line at the end, then `posttrain sync` into a store that answers and `lineage` of the model."""
    import json

    from helpers import run_cli

    state, down = tmp_path / "state", "http://127.0.0.1:9/"
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    p = run_cli("run", "--smoke", "--no-progress", "--set", "stages=[fetch, sft]", "--tracking-uri", down,
                state_dir=state, summary=tmp_path / "s.json", env=env)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["mlflow_parent_run_id"].startswith("queued-") and s["registered_model"] is None
    assert s["tracking_errors"] == 1 and s["tracking_queued"] > 10, s
    assert "Tracking: the MLflow store did not answer" in p.stdout and s["tracking_queue"] in p.stdout

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli("sync", "--tracking-uri", store, state_dir=state).stdout
    # the summary counts what was queued before it: its own logging and the parent's end follow it
    assert out.startswith(f"replayed {s['tracking_queued'] + 2} calls (5 runs) of 1 journal") and store in out, out
    (rec,) = json.loads(run_cli("runs", "--json", state_dir=state).stdout)
    assert not rec["mlflow_parent_run_id"].startswith("queued-")
    chain = json.loads(run_cli("lineage", "models:/posttrain-r1-smoke/1", "--json", "--tracking-uri", store,
                               state_dir=state).stdout)
    assert json.dumps(chain).count(s["stages"][-1]["output"]["digest"]) >= 1
    assert run_cli("sync", state_dir=state).stdout.startswith("nothing queued")


def test_the_next_run_of_the_store_replays_what_an_earlier_run_queued(tmp_path, monkeypatch):
    """A store that refused the first run queues it; the next flow start that reaches the store
    replays the journal before its own runs, and its tracker knows the real ids."""
    from mlflow.tracking import MlflowClient

    from tasks.common import RunContext, start_tracking, state_paths, tracker_for

    def refused(*a, **k):
        raise ConnectionRefusedError(111, "Connection refused")

    ctx = RunContext(state_dir=str(tmp_path / "state"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                     experiment="exp")
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", refused)
    first = tracker_for(ctx)
    assert first.offline and "Connection refused" in first.errors[0]
    run = first.start_run("flow", tags={"posttrain.kind": "flow"})
    first.end_run(run)
    monkeypatch.undo()

    tracker, replayed = start_tracking(ctx)
    assert tracker is not first and not tracker.offline and tracker.ok
    assert replayed["journals"] == 1 and replayed["runs"] == 1 and replayed["uris"] == [ctx.tracking_uri]
    real = tracker.ids.ids[run]
    assert tracker.client.get_run(real).info.status == "FINISHED"
    assert not list(state_paths(ctx.state_dir)["tracking_queue"].glob("*.jsonl"))
