"""The real flow, end to end on the smoke size: Prefect caching, MLflow lineage, summary JSON,
kill -9 during SFT and resume, and contract errors before any training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import run_cli

from data_contracts.artifacts import digest_path
from models.config import load_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STAGES = ["fetch", "sft", "grpo", "sample", "filter", "refine"]
CHECKPOINT_STAGES = {"fetch", "sft", "grpo", "refine"}
TAGS = ["posttrain.stage", "posttrain.cache_key", "posttrain.inputs", "posttrain.output_digest",
        "posttrain.upstream_runs", "posttrain.code_version", "posttrain.prefect_flow_run_id",
        "posttrain.prefect_task_run_id", "posttrain.cached"]


cli = run_cli  # tests/helpers.py


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run of the default recipe, then a rerun of it."""
    state = tmp_path_factory.mktemp("state")
    t0 = time.perf_counter()
    first = cli("run", "--smoke", state_dir=state, summary=state / "first.json")
    t1 = time.perf_counter()
    cli("run", "--smoke", state_dir=state, summary=state / "second.json")
    t2 = time.perf_counter()
    yield {"state": state, "first": json.loads((state / "first.json").read_text()),
           "second": json.loads((state / "second.json").read_text()), "stdout": first.stdout,
           "first_seconds": t1 - t0, "second_seconds": t2 - t1}
    shutil.rmtree(state, ignore_errors=True)


def test_summary_has_the_contract_keys(smoke_run):
    s = smoke_run["first"]
    assert s["flow_run_id"] and s["mlflow_parent_run_id"]
    assert [st["stage"] for st in s["stages"]] == STAGES
    for st in s["stages"]:
        assert set(st) >= {"stage", "cached", "wall_seconds", "mlflow_run_id", "output", "metrics"}
        assert st["cached"] is False
        assert st["output"]["digest"] == digest_path(st["output"]["path"])
        if st["stage"] in CHECKPOINT_STAGES:
            assert 0.0 <= st["metrics"]["pass@1"] <= 1.0 and "pass@4" in st["metrics"] and "maj@4" in st["metrics"]
    assert Path(s["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["registered_model"] == "models:/posttrain-r1-smoke/1"
    assert "pass@1" in smoke_run["stdout"] and "sft" in smoke_run["stdout"]


def test_rerun_is_all_cache_hits(smoke_run):
    first, second = smoke_run["first"], smoke_run["second"]
    assert [st["cached"] for st in second["stages"]] == [True] * len(STAGES)
    for a, b in zip(first["stages"], second["stages"]):
        assert a["output"] == b["output"] and a["metrics"] == b["metrics"]
        assert a["mlflow_run_id"] != b["mlflow_run_id"]  # a cache hit still gets its own stage run
    assert sum(st["wall_seconds"] for st in second["stages"]) < 0.1 * sum(st["wall_seconds"] for st in first["stages"])


def test_mlflow_has_parent_children_tags_and_dataset_digest(smoke_run):
    from mlflow.tracking import MlflowClient

    state, first, second = smoke_run["state"], smoke_run["first"], smoke_run["second"]
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    parent = client.get_run(first["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags["posttrain.stage"]: c for c in children}
    assert set(STAGES) | {f"evaluate-{s}" for s in CHECKPOINT_STAGES} <= set(by_stage)
    for c in children:
        missing = [t for t in TAGS if t not in c.data.tags]
        assert not missing, (c.data.tags["posttrain.stage"], missing)
    sft = by_stage["sft"]
    assert sft.data.tags["posttrain.cached"] == "false"
    assert sft.data.tags["posttrain.output_digest"] == first["stages"][1]["output"]["digest"]
    inputs = json.loads(sft.data.tags["posttrain.inputs"])
    assert json.loads(sft.data.tags["posttrain.upstream_runs"]) == [first["stages"][0]["mlflow_run_id"]]
    data_in = next(i for i in inputs if i["kind"] == "dataset")
    file_digest = digest_path(data_in["path"])
    assert data_in["digest"] == file_digest
    (ds,) = [d.dataset for d in sft.inputs.dataset_inputs]
    assert ds.digest == file_digest.removeprefix("sha256:")[:32]
    assert "train/loss" in sft.data.metrics and "eval/pass_at_1" in sft.data.metrics
    assert sft.data.params["lr"] == str(load_recipe("r1", smoke=True).sft.lr)  # resolved config as params
    assert client.list_artifacts(sft.info.run_id, "model")
    # the rerun's stage runs are marked cached and name the run that produced the result
    cached = client.get_run(second["stages"][1]["mlflow_run_id"])
    assert cached.data.tags["posttrain.cached"] == "true"
    assert cached.data.tags["posttrain.cached_from_run"] == first["stages"][1]["mlflow_run_id"]


def test_changed_filter_setting_recomputes_only_filter_and_what_follows(smoke_run, tmp_path):
    cli("run", "--smoke", "--set", "filter.max_per_prompt=1", state_dir=smoke_run["state"], summary=tmp_path / "s.json")
    s = json.loads((tmp_path / "s.json").read_text())
    ran = [st["stage"] for st in s["stages"] if not st["cached"]]
    assert ran == ["filter", "refine"]


def _sft_workdir(state: Path) -> Path | None:
    hits = sorted((state / "work").glob("sft-*"))
    return hits[0] if hits else None


def test_sigkill_during_sft_then_rerun_resumes_and_matches(smoke_run, tmp_path):
    state = tmp_path / "state"
    proc = cli("run", "--smoke", "--no-progress", state_dir=state, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            wd = _sft_workdir(state)
            metrics = wd / "metrics.jsonl" if wd else None
            if metrics and metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
                break  # past the step-10 checkpoint, before the end
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("SFT never reached step 13")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (wd / "output" / ".complete").exists()
    summary = json.loads(cli("run", "--smoke", state_dir=state, summary=tmp_path / "s.json").stdout and
                         (tmp_path / "s.json").read_text())
    fetch, sft = summary["stages"][:2]
    assert fetch["cached"] is True
    assert sft["cached"] is False and sft["resumed_from_step"] > 0
    ref = smoke_run["first"]["stages"][1]
    assert sft["output"]["digest"] == ref["output"]["digest"]
    assert sft["metrics"] == ref["metrics"]
    assert sft["train_metrics"]["train/loss"] == ref["train_metrics"]["train/loss"]
    # and everything after it is what the uninterrupted run produced
    final, ref_final = summary["stages"][-1], smoke_run["first"]["stages"][-1]
    assert final["output"]["digest"] == ref_final["output"]["digest"] and final["metrics"] == ref_final["metrics"]


def test_bad_dataset_fails_before_training_naming_file_row_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1+1\\nA:", "completion": "<answer>2</answer>"}\n'
                   '{"prompt": "Q: 2+2\\nA:", "completion": "   "}\n')
    state = tmp_path / "state"
    p = cli("run", "--smoke", "--set", f"sft.dataset={bad}", state_dir=state, check=False)
    assert p.returncode != 0
    assert f"{bad}: row 2, field 'completion'" in p.stderr
    assert not list((state / "work").glob("*")) if (state / "work").exists() else True
