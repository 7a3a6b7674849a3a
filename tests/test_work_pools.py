"""Stages on work pools (flows/pools.py): a node's `work_pool` is parsed out of its settings and never
reaches a cache key; a recipe naming a pool fails before any stage without a server, a pool or its
deployment; and, slow, on loopback: one `prefect server start`, two process pools ("cpu", "gpu") with
one worker each, r1 at (shrunk) smoke size with its training stages on "gpu" and sample/filter on
"cpu": the stage flow runs land on both pools' workers, and the summary and lineage are those of the
same recipe run in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, kill_group, mlflow_runs, poll, run_cli
from helpers import sets as cli_sets

from data_contracts.artifacts import ArtifactRef
from flows.pools import PoolError, check_pools
from flows.post_train import plan_node
from models.config import RecipeError, load_recipe, resolved
from test_operations import prefect_server  # noqa: F401 - the fixture: a real server on loopback

REPO = Path(__file__).resolve().parent.parent

POOLS = ["sft.work_pool=gpu", "grpo.work_pool=gpu", "refine.work_pool=gpu", "sample.work_pool=cpu",
         "filter.work_pool=cpu"]


# ---------------------------------------------------------------------------------------- fast


def test_work_pool_is_read_from_sections_nodes_and_overrides(tmp_path):
    cfg = load_recipe("r1", POOLS, smoke=True)
    assert cfg.work_pools == {"sft": "gpu", "grpo": "gpu", "refine": "gpu", "sample": "cpu", "filter": "cpu"}
    assert cfg.work_pool("fetch") is None and cfg.work_pool("sft") == "gpu"
    assert "work_pool" not in resolved(cfg.sft) and "work_pool" not in resolved(cfg.sample)
    assert load_recipe("r1", POOLS + ["sft.work_pool=null"]).work_pool("sft") is None
    # node form: in the node entry, or --set <node>.work_pool (not into its config)
    multi = load_recipe("r1-multi", ["sft_2.work_pool=gpu"], smoke=True)
    assert multi.work_pools == {"sft_2": "gpu"} and "work_pool" not in resolved(multi.node("sft_2").config)
    recipe = tmp_path / "two.yaml"
    recipe.write_text("name: two\nchat_template: never\nnodes:\n"
                      "  - {name: base, kind: fetch, config: {uri: builtin:tiny}}\n"
                      "  - {name: tune, kind: sft, from: base, work_pool: gpu, config: {max_steps: 3}}\n")
    assert load_recipe(str(recipe)).work_pools == {"tune": "gpu"}
    with pytest.raises(RecipeError, match="work_pools: unknown node 'nope'"):
        load_recipe("r1", ["work_pools.nope=cpu"])
    with pytest.raises(RecipeError, match="node 'sft': work_pool 'a b'"):
        load_recipe("r1", ["sft.work_pool=a b"])


def test_work_pool_enters_no_cache_key():
    """Where a stage runs does not change what it computes: every node's key is the same."""
    here, pooled = load_recipe("r1", [], smoke=True), load_recipe("r1", POOLS, smoke=True)
    fake = {n.name: ArtifactRef(kind="model" if n.spec.output == "checkpoint" else "dataset", path=f"/x/{n.name}",
                                digest=f"sha256:{n.name}") for n in here.graph()}
    for a, b in zip(here.graph(), pooled.graph()):
        up = {src: fake[src] for src in a.inputs.values()}
        ka, ca, _, kwa = plan_node(a, here, {}, up)
        kb, cb, _, kwb = plan_node(b, pooled, {}, up)
        assert (ka, ca, kwa) == (kb, cb, kwb), a.name


def test_no_server_fails_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(PoolError, match="work pools need a Prefect server .*sft, grpo, refine on 'gpu'"):
        check_pools(load_recipe("r1", POOLS, smoke=True))
    p = run_cli("run", "--smoke", "--no-progress", "--set", "sft.work_pool=gpu", state_dir=tmp_path / "s", check=False,
                env={"PREFECT_API_URL": ""})
    assert p.returncode == 2 and "error: work pools need a Prefect server (sft on 'gpu')" in p.stderr
    assert not (tmp_path / "s" / "work").exists() or not any((tmp_path / "s" / "work").iterdir())


def _fake_prefect(monkeypatch, states: list[str], message: str = "boom"):
    """run_deployment and the client, faked: the stage's flow run goes through `states`."""
    import types
    import uuid

    import prefect.client.orchestration as orchestration
    import prefect.deployments as deployments
    from prefect.client.schemas.objects import StateType

    fr_id, seen, calls = uuid.uuid4(), iter(states), []

    def run(kind):
        st = types.SimpleNamespace(type=StateType[kind], name=kind.title(), message=message,
                                   is_final=lambda: kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"))
        return types.SimpleNamespace(id=fr_id, name="r1-sft", state=st)

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read_flow_run(self, _id):
            kind = next(seen)
            if kind == "INTERRUPT":  # Ctrl-C while the recipe flow waits
                raise KeyboardInterrupt
            return run(kind)

        def set_flow_run_state(self, _id, state, force=False):
            calls.append(state.type.value)

    monkeypatch.setattr(deployments, "run_deployment", lambda **kw: run("SCHEDULED"))
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client=False: Client())
    monkeypatch.setattr("flows.pools.POLL_SECONDS", 0.01)
    return fr_id, calls


def _dispatch_sft(tmp_path, **cfg_over):
    from flows.pools import dispatch
    from tasks.common import RunContext

    cfg = load_recipe("r1", ["sft.work_pool=gpu"] + [f"{k}={v}" for k, v in cfg_over.items()], smoke=True)
    ref = ArtifactRef(kind="model", path="/x", digest="sha256:x")
    ctx = RunContext(state_dir=str(tmp_path), tracking_uri="sqlite:///x", experiment="e", recipe="r1")
    return dispatch("gpu", cfg.node("sft"), cfg, ctx, {"recipe": "r1"}, {}, {"fetch": ref}, ref, "k", "parent")


def test_a_failed_stage_flow_run_fails_the_node_naming_pool_run_and_state(tmp_path, monkeypatch):
    fr_id, _ = _fake_prefect(monkeypatch, ["PENDING", "RUNNING", "FAILED"], "Flow run encountered an exception: OSError")
    with pytest.raises(PoolError) as e:
        _dispatch_sft(tmp_path)
    assert f"stage 'sft' on work pool 'gpu': flow run {fr_id} (r1-sft) ended FAILED" in str(e.value)
    assert "OSError" in str(e.value)


def test_a_stage_no_worker_starts_fails_after_the_start_timeout(tmp_path, monkeypatch):
    fr_id, calls = _fake_prefect(monkeypatch, ["SCHEDULED"] * 10_000)
    with pytest.raises(PoolError, match=f"flow run {fr_id} .*no worker of the pool started it within 0.05 s"):
        _dispatch_sft(tmp_path, work_pool_start_timeout_s=0.05)
    assert calls == ["CANCELLED"]


def test_an_interrupted_recipe_flow_cancels_the_stage_run_it_waits_for(tmp_path, monkeypatch):
    _, calls = _fake_prefect(monkeypatch, ["PENDING", "RUNNING", "INTERRUPT"])
    with pytest.raises(KeyboardInterrupt):
        _dispatch_sft(tmp_path)
    assert calls == ["CANCELLING"]


# ---------------------------------------------------------------------------------------- slow

def _api_json(url: str, body: dict | None = None):
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _kill_pid(pid) -> None:
    try:
        os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, ValueError, TypeError):
        pass


@pytest.mark.slow
def test_one_recipe_on_two_pools_equals_one_process(prefect_server, tmp_path):
    api, env = prefect_server["api"], dict(prefect_server["env"])
    ref_state, pool_state = tmp_path / "ref", tmp_path / "pools"
    sets = cli_sets(TINY)
    # the same recipe in one process, meanwhile (no server: its own temporary API)
    ref = run_cli("run", "--smoke", "--no-progress", *sets, summary=tmp_path / "ref.json", state_dir=ref_state,
                  env={"PREFECT_API_URL": ""}, stdout=open(tmp_path / "ref.log", "w"), stderr=subprocess.STDOUT,
                  start_new_session=True)
    workers: list[subprocess.Popen] = []
    stage_runs: list[dict] = []
    try:
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "pools", "deploy", "cpu", "gpu"], cwd=REPO, env=dict(os.environ, **env),
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "created work pool cpu (process); deployment posttrain-stage/cpu" in out.stdout
        # a pool that does not exist: refused before any stage runs
        bad = run_cli("run", "--smoke", "--no-progress", *sets, "--set", "sft.work_pool=nopool",
                      state_dir=tmp_path / "bad", env=env, check=False)
        assert bad.returncode == 2 and "work pool 'nopool' (nodes sft) does not exist" in bad.stderr, bad.stderr[-3000:]
        assert "posttrain pools deploy nopool" in bad.stderr
        assert not any((tmp_path / "bad" / "work").glob("*/output"))
        for pool in ("cpu", "gpu"):
            log = open(tmp_path / f"worker-{pool}.log", "w")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], cwd=tmp_path,
                env=dict(os.environ, **env, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="INFO"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # INFO: the log names each flow run
        t0 = time.monotonic()
        run = run_cli("run", "--smoke", "--no-progress", *sets, *cli_sets(POOLS),
                      summary=tmp_path / "pools.json", state_dir=pool_state, env=env, check=False)
        pool_wall = time.monotonic() - t0
        stage_runs = _api_json(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["posttrain-stage"]}}})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:] + "".join(
            (tmp_path / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu", "gpu"))
        poll(lambda: ref.poll() is not None, 900, "the one-process run", every=2)
        assert ref.returncode == 0, (tmp_path / "ref.log").read_text()[-5000:]
    finally:
        for w in workers:
            kill_group(w)
        for fr in stage_runs:
            _kill_pid(fr.get("infrastructure_pid"))  # a stage process a worker left behind
        kill_group(ref)

    pooled = json.loads((tmp_path / "pools.json").read_text())
    single = json.loads((tmp_path / "ref.json").read_text())
    # the stage flow runs landed on both pools, each on that pool's worker
    by_pool = {}
    for fr in stage_runs:
        assert fr["state"]["type"] == "COMPLETED", fr["name"]
        by_pool.setdefault(fr["work_pool_name"], set()).add(fr["name"])
    assert by_pool == {"gpu": {"r1-sft", "r1-grpo", "r1-refine"}, "cpu": {"r1-sample", "r1-filter"}}
    rows = {r["stage"]: r for r in pooled["stages"]}
    for pool in ("cpu", "gpu"):
        log = (tmp_path / f"worker-{pool}.log").read_text()
        for fr in stage_runs:
            assert (fr["id"] in log) == (fr["work_pool_name"] == pool)
    assert {r["stage"]: r.get("work_pool") for r in pooled["stages"]} == {
        "fetch": None, "sft": "gpu", "grpo": "gpu", "sample": "cpu", "filter": "cpu", "refine": "gpu"}
    assert {rows[n]["stage_flow_run_id"] for n in rows if rows[n].get("work_pool")} == {fr["id"] for fr in stage_runs}
    # the summary is the one-process run's: same nodes, keys, output digests, held-out metrics
    def same(row):
        return {k: row[k] for k in ("stage", "kind", "cached", "cache_key", "inputs", "resumed_from_step", "metrics")} | {
            "digest": row["output"]["digest"],
            "train": {k: v for k, v in row["train_metrics"].items() if "seconds" not in k}}
    assert [same(r) for r in pooled["stages"]] == [same(r) for r in single["stages"]]
    assert pooled["final_model"]["digest"] == single["final_model"]["digest"]
    # lineage: the registered model walks back to fetch, every digest checks, every stage names the recipe's flow run
    chain = json.loads(run_cli("lineage", pooled["registered_model"], "--json", state_dir=pool_state).stdout)
    assert [s["stage"] for s in chain["stages"]] == ["fetch", "sft", "grpo", "sample", "filter", "refine"]
    assert all(s["prefect_flow_run_id"] == pooled["flow_run_id"] for s in chain["stages"])
    assert "all recorded digests match" in run_cli("lineage", pooled["registered_model"], state_dir=pool_state).stdout
    client, exp_id = mlflow_runs(pool_state)
    for name, row in rows.items():
        tags = client.get_run(row["mlflow_run_id"]).data.tags
        assert tags.get("posttrain.work_pool") == row.get("work_pool"), name
        assert tags["mlflow.parentRunId"] == pooled["mlflow_parent_run_id"]
        if row.get("work_pool"):
            assert tags["posttrain.prefect_stage_flow_run_id"] == row["stage_flow_run_id"]
    # what dispatching cost, per stage (README "Stages on work pools")
    print(f"\npool run {pool_wall:.1f} s wall; stage: in one process | on its pool, inside the stage flow | "
          "on its pool, as the recipe flow waited")
    ref_rows = {r["stage"]: r for r in single["stages"]}
    for name, row in rows.items():
        if row.get("work_pool"):
            print(f"  {name:7s} {row['work_pool']}: {ref_rows[name]['wall_seconds']:7.1f} | {row['wall_seconds']:7.1f} | "
                  f"{row['dispatch_seconds']:7.1f}  (+{row['dispatch_seconds'] - row['wall_seconds']:.1f} s)")
