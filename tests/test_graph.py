"""Recipe graphs: the list form resolves into the chain it always meant, named nodes resolve with
explicit edges, bad graphs fail before anything runs (naming the node), `--set` reaches a node's
settings, and the scheduler overlaps independent branches without changing their results."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.dag import run_graph
from models.config import RecipeError, load_recipe
from models.stages import KINDS, describe

REPO = Path(__file__).resolve().parent.parent

BASE = {"name": "g", "chat_template": "never"}


def _recipe(tmp_path: Path, nodes: list[dict], **extra) -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({**BASE, "nodes": nodes, **extra}, sort_keys=False))
    return p


CHAIN = [{"name": "base", "kind": "fetch"},
         {"name": "sft_1", "kind": "sft", "from": "base", "config": {"max_steps": 5}},
         {"name": "grpo_1", "kind": "grpo", "from": "sft_1"},
         {"name": "sample_1", "kind": "sample", "from": "grpo_1"},
         {"name": "filter_1", "kind": "filter", "samples": "sample_1"},
         {"name": "sft_2", "kind": "refine", "from": "base", "samples": "filter_1", "config": {"dataset": "samples"}},
         {"name": "grpo_2", "kind": "grpo", "from": "sft_2"}]


def test_list_form_is_the_chain_it_always_meant():
    r1 = load_recipe("r1")
    assert [(n.name, n.kind, n.inputs) for n in r1.graph()] == [
        ("fetch", "fetch", {}), ("sft", "sft", {"from": "fetch"}), ("grpo", "grpo", {"from": "sft"}),
        ("sample", "sample", {"from": "grpo"}), ("filter", "filter", {"samples": "sample"}),
        # refine starts from the newest checkpoint (grpo): sample and filter make data, not models
        ("refine", "refine", {"from": "grpo", "samples": "filter"})]
    rlhf = load_recipe("rlhf")
    assert rlhf.node("ppo").inputs == {"from": "sft", "reward_model": "reward_model"}
    assert rlhf.final_node().name == "ppo"


def test_named_nodes_repeat_kinds_and_sort_topologically(tmp_path):
    shuffled = [CHAIN[i] for i in (6, 5, 0, 4, 3, 2, 1)]  # declared out of order
    cfg = load_recipe(str(_recipe(tmp_path, shuffled)))
    order = [n.name for n in cfg.graph()]
    for n in cfg.graph():
        assert all(order.index(src) < order.index(n.name) for src in n.inputs.values())
    assert [n.kind for n in cfg.graph()].count("grpo") == 2
    assert cfg.node("sft_1").config.max_steps == 5 and cfg.node("grpo_2").config.lr == KINDS["grpo"].config_class()().lr
    assert cfg.final_node().name == "grpo_2" and cfg.stages == [n["name"] for n in shuffled]
    text = describe(cfg.graph())
    assert "sft_2" in text and "base → sft_2 (from)" in text and "filter_1 → sft_2 (samples)" in text


@pytest.mark.parametrize("change,error", [
    # a cycle: sft_1 starts from grpo_1, which starts from sft_1
    (lambda n: n[1].update({"from": "grpo_1"}), r"node 'sft_1': is in a cycle \(sft_1 → grpo_1 → sft_1\)"),
    (lambda n: n[2].update({"from": "sft_9"}), r"node 'grpo_1': from: unknown node 'sft_9'"),
    # refine fed a checkpoint on its data port
    (lambda n: n[5].update({"samples": "grpo_1"}),
     r"node 'sft_2': port 'samples' takes a dataset, but 'grpo_1' \(grpo\) makes a checkpoint"),
    (lambda n: n[3].update({"from": "filter_1"}),
     r"node 'sample_1': port 'from' takes a checkpoint, but 'filter_1' \(filter\) makes a dataset"),
    (lambda n: n.append({"name": "grpo_1", "kind": "ppo", "from": "sft_1"}), r"node 'grpo_1': duplicate name"),
    (lambda n: n[2].pop("from"), r"node 'grpo_1': grpo needs 'from:'"),
    (lambda n: n[2].update({"kind": "gpro"}), r"node 'grpo_1': unknown kind 'gpro'"),
    (lambda n: n[4].update({"teacher": "grpo_1"}), r"node 'filter_1': filter has no port 'teacher'"),
    (lambda n: n[1].update({"config": {"lrr": 1}}), r"node 'sft_1': config\.lrr: unknown key"),
])
def test_bad_graphs_fail_naming_the_node(tmp_path, change, error):
    nodes = [dict(n) for n in CHAIN]
    change(nodes)
    with pytest.raises(RecipeError, match=error) as e:
        load_recipe(str(_recipe(tmp_path, nodes)))
    assert "\n" not in str(e.value)


def test_node_form_refuses_stage_sections_and_stages(tmp_path):
    with pytest.raises(RecipeError, match=r"grpo: a recipe with nodes keeps each node's settings under its 'config:'"):
        load_recipe(str(_recipe(tmp_path, CHAIN, grpo={"lr": 1e-5})))
    with pytest.raises(RecipeError, match="stages and nodes: give one"):
        load_recipe(str(_recipe(tmp_path, CHAIN, stages=["fetch"])))
    with pytest.raises(RecipeError, match=r"final: 'filter_1' is not a checkpoint node"):
        load_recipe(str(_recipe(tmp_path, CHAIN, final="filter_1")))


def test_a_repeated_kind_in_the_list_form_asks_for_named_nodes():
    with pytest.raises(RecipeError, match=r"stages\[2\]: 'sft' is listed twice; a kind that repeats needs named nodes"):
        load_recipe("r1", ["stages=[fetch,sft,sft]"])


def test_set_reaches_a_nodes_settings_and_inputs(tmp_path):
    path = str(_recipe(tmp_path, CHAIN))
    cfg = load_recipe(path, ["sft_2.lr=1e-5", "grpo_2.from=sft_1", "base.pretrain.max_steps=7"])
    assert cfg.node("sft_2").config.lr == 1e-5 and cfg.node("sft_1").config.lr != 1e-5
    assert cfg.node("grpo_2").inputs == {"from": "sft_1"}
    assert cfg.node("base").config.pretrain.max_steps == 7
    with pytest.raises(RecipeError, match=r"--set sft\.lr=?.*has no node 'sft' \(nodes: base, sft_1"):
        load_recipe(path, ["sft.lr=1e-5"])
    with pytest.raises(RecipeError, match=r"node 'grpo_2': from: unknown node 'nope'"):
        load_recipe(path, ["grpo_2.from=nope"])


@pytest.mark.parametrize("bad,names", [
    ({"from": "grpo_1"}, "sft_1"),  # cycle
    ({"from": "sft_9"}, "grpo_1"),  # unknown from
    ({"samples": "grpo_1"}, "sft_2"),  # a port fed the wrong type
])
def test_cli_exits_nonzero_fast_with_one_line_naming_the_node(tmp_path, bad, names):
    nodes = [dict(n) for n in CHAIN]
    target = {"sft_1": 1, "grpo_1": 2, "sft_2": 5}[names]
    nodes[target].update(bad)
    path = _recipe(tmp_path, nodes)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--state-dir", str(tmp_path / "s")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"node '{names}'" in lines[0], p.stderr
    assert wall < 10, wall
    assert not (tmp_path / "s" / "work").exists()  # no stage ran


class _N:
    def __init__(self, name, inputs=()):
        self.name, self.inputs = name, {f"in{i}": s for i, s in enumerate(inputs)}


def test_two_branches_overlap_with_two_workers_and_give_the_sequential_results():
    # root → (a1 → a2) and (b1 → b2) → join: the a- and b-branches are independent
    nodes = [_N("root"), _N("a1", ["root"]), _N("b1", ["root"]), _N("a2", ["a1"]), _N("b2", ["b1"]),
             _N("join", ["a2", "b2"])]
    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def run(node, upstream):
        t0 = time.perf_counter()
        time.sleep(0.2)  # stands for a stage's work
        with lock:
            spans[node.name] = (t0, time.perf_counter())
        return node.name + "(" + ",".join(sorted(upstream.values())) + ")"

    seq = run_graph(nodes, run, max_parallel=1)
    seq_spans = dict(spans)
    par = run_graph(nodes, run, max_parallel=2)
    assert par == seq
    assert par["join"] == "join(a2(a1(root())),b2(b1(root())))"

    def overlap(x, y):
        return min(spans[x][1], spans[y][1]) - max(spans[x][0], spans[y][0])

    assert overlap("a1", "b1") > 0.1 and overlap("a2", "b2") > 0.1  # the branches ran at once
    assert all(min(s[1], t[1]) <= max(s[0], t[0]) for a, s in seq_spans.items() for b, t in seq_spans.items()
               if a != b)  # sequentially, no two nodes overlap


def test_a_failing_branch_fails_the_graph_after_the_running_one_ends():
    nodes = [_N("root"), _N("ok", ["root"]), _N("bad", ["root"]), _N("after", ["bad"])]
    ran = []

    def run(node, upstream):
        if node.name == "bad":
            raise RuntimeError("boom")
        time.sleep(0.05)
        ran.append(node.name)
        return node.name

    with pytest.raises(RuntimeError, match="boom"):
        run_graph(nodes, run, max_parallel=2)
    assert "after" not in ran and "ok" in ran


def test_graph_command_prints_nodes_kinds_and_edges():
    p = subprocess.run([sys.executable, "-m", "flows.cli", "graph", "distill"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("recipe distill: 8 nodes, final student")
    assert "student_base → student (from)" in p.stdout and "verified → student (samples)" in p.stdout
    assert [ln.split()[1] for ln in p.stdout.splitlines()[1:9]].count("fetch") == 2
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "graph", "r1-multi", "--set", "sft_2.samples=grpo"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "node 'sft_2': port 'samples' takes a dataset" in bad.stderr
