"""Tracking never fails a stage: a store that is down is logged and remembered, nothing raises."""

import logging

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
