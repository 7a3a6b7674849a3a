"""Every shipped recipe runs end to end at its smoke size (r1 is covered by tests/test_flow.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# a recipe's own reasoning marker (any non-empty completion shows it) is logged like the built-in ones
MARKER_SETS = ["--set", 'grpo.reasoning_markers={"any": "."}']


@pytest.mark.slow
@pytest.mark.parametrize("recipe,stages,extra", [
    ("r1-zero", ["fetch", "grpo"], MARKER_SETS),
    ("tulu3", ["fetch", "sft", "dpo", "grpo"], []),
    ("rlhf", ["fetch", "sft", "reward_model", "ppo"], []),
])
def test_recipe_smoke_runs_end_to_end(recipe, stages, extra, tmp_path):
    summary = tmp_path / "summary.json"
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", recipe, "--smoke", "--state-dir", str(tmp_path / "state"),
                        "--summary-json", str(summary), *extra], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-5000:]
    s = json.loads(summary.read_text())
    assert [st["stage"] for st in s["stages"]] == stages
    for st in s["stages"]:
        if st["stage"] != "reward_model":  # a reward model is not a policy: it is not evaluated
            assert "pass@1" in st["metrics"], st
    assert s["registered_model"] == f"models:/posttrain-{recipe}-smoke/1"
    if recipe == "r1-zero":
        from mlflow.tracking import MlflowClient

        run = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}").get_run(s["stages"][1]["mlflow_run_id"])
        assert run.data.metrics["train/marker/any"] > 0 and "train/marker/self_check" not in run.data.metrics
        assert "train/length_correct" in run.data.metrics and "train/frac_zero_std" in run.data.metrics
        assert Path(s["report_png"]).stat().st_size > 0


def _run(args: list[str], tmp_path: Path) -> dict:
    summary = tmp_path / "summary.json"
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args, "--state-dir", str(tmp_path / "state"),
                        "--summary-json", str(summary)], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_smollm2_r1_smoke_runs_every_stage_on_the_real_model(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF file through every stage, prompts in its chat template."""
    s = _run(["smollm2-r1", "--smoke"], tmp_path)
    assert [st["stage"] for st in s["stages"]] == ["fetch", "sft", "grpo", "sample", "filter", "refine"]
    for st in s["stages"]:
        if st["stage"] not in ("sample", "filter"):
            assert "pass@1" in st["metrics"], st
    assert s["registered_model"] == "models:/posttrain-smollm2-r1-smoke/1"
    # the fetched base is a plain HF directory: SmolLM2's architecture, ChatML template, every
    # end-of-turn id in its generation config
    base = Path(s["stages"][0]["output"]["path"])
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    samples = [json.loads(x) for x in Path(s["stages"][3]["output"]["path"]).read_text().splitlines()]
    assert samples and all(isinstance(x["prompt"], str) and x["prompt"].startswith("Compute ") for x in samples)
    # tracking.log_models: final: MLflow holds a copy of the registered model only
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")
    copied = {st["stage"]: bool(client.list_artifacts(st["mlflow_run_id"], "model")) for st in s["stages"]}
    assert copied == {"fetch": False, "sft": False, "grpo": False, "sample": False, "filter": False, "refine": True}


@pytest.mark.slow
def test_smollm2_trains_and_evaluates_on_a_users_own_conversational_files(tmp_path):
    """A user's own word problems: SFT from `messages`, GRPO and evaluation from problems whose prompt
    is a conversation, judged by the math reward: `--set` only."""
    sft = tmp_path / "sft.jsonl"
    problems = tmp_path / "problems.jsonl"
    words = [("Ann has {a} pens and gets {b} more. How many pens does she have?", lambda a, b: a + b),
             ("A box holds {a} eggs; {b} break. How many are whole?", lambda a, b: a - b)]
    sft_rows, problem_rows = [], []
    for i in range(8):
        text, f = words[i % 2]
        a, b = 10 + i, 1 + i % 5
        question = text.format(a=a, b=b)
        messages = [{"role": "system", "content": "Give the answer in <answer></answer>."},
                    {"role": "user", "content": question}]
        sft_rows.append({"messages": messages + [{"role": "assistant", "content": f"<answer>{f(a, b)}</answer>"}]})
        problem_rows.append({"id": f"w{i}", "prompt": messages, "answer": str(f(a, b))})
    sft.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    problems.write_text("".join(json.dumps(r) + "\n" for r in problem_rows))
    s = _run(["smollm2-r1", "--smoke", "--set", "stages=[fetch,sft,grpo]", "--set", f"sft.dataset={sft}",
              "--set", f"grpo.prompts={problems}", "--set", "grpo.rewards={math: 1.0}",
              "--set", f"evaluate.dataset={problems}", "--set", "evaluate.reward=math"], tmp_path)
    assert [st["stage"] for st in s["stages"]] == ["fetch", "sft", "grpo"]
    assert all(st["metrics"]["num_problems"] == 4 for st in s["stages"])


def _cli(args: list[str], state: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--state-dir", str(state)], cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout)


def _children(state: Path, parent_run_id: str) -> dict[str, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags["posttrain.stage"]: r.data.tags for r in runs}


@pytest.fixture(scope="module")
def shared_state(tmp_path_factory):
    """One state dir for the named-node recipes: r1-multi, then rl-ablation reuses its fetch/sft/grpo."""
    state = tmp_path_factory.mktemp("dag")
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow
def test_r1_multi_smoke_runs_every_node_with_repeated_kinds(shared_state):
    """R1's order as named nodes: two SFTs and two GRPOs, the second SFT from the base on the kept
    samples; the summary lists every node with its kind; the parent MLflow run holds each node."""
    s = _run(["r1-multi", "--smoke"], shared_state)
    assert [st["stage"] for st in s["stages"]] == ["fetch", "sft", "grpo", "sample", "filter", "sft_2", "grpo_2"]
    assert [st["kind"] for st in s["stages"]] == ["fetch", "sft", "grpo", "sample", "filter", "refine", "grpo"]
    by = {st["stage"]: st for st in s["stages"]}
    assert by["sft_2"]["inputs"] == {"from": "fetch", "samples": "filter"}
    for st in s["stages"]:
        if st["kind"] not in ("sample", "filter"):
            assert "pass@1" in st["metrics"], st
    assert s["registered_model"] == "models:/posttrain-r1-multi-smoke/1"
    assert s["final_model"]["digest"] == by["grpo_2"]["output"]["digest"]
    children = _children(shared_state / "state", s["mlflow_parent_run_id"])
    assert set(by) <= set(children)
    assert children["sft_2"]["posttrain.stage_kind"] == "refine"
    # `posttrain graph` on the state dir: every node is now cached
    g = _cli(["graph", "r1-multi", "--smoke", "--json"], shared_state / "state", timeout=300)
    assert g.returncode == 0, g.stderr
    graph = json.loads(g.stdout)
    assert [n["name"] for n in graph["nodes"]] == list(by) and all(n["cached"] for n in graph["nodes"])
    assert {"from": "filter", "to": "sft_2", "port": "samples"} in graph["edges"]


@pytest.mark.slow
def test_rl_ablation_branches_share_the_sft_and_compare(shared_state):
    """Four methods from one SFT; the SFT (and fetch, grpo) are r1-multi's: computed once across recipes."""
    s = _run(["rl-ablation", "--smoke"], shared_state)
    assert [st["stage"] for st in s["stages"]] == ["fetch", "sft", "grpo", "dr_grpo", "dpo", "ppo"]
    by = {st["stage"]: st for st in s["stages"]}
    assert by["fetch"]["cached"] and by["sft"]["cached"] and by["grpo"]["cached"]
    assert not by["dr_grpo"]["cached"] and not by["ppo"]["cached"]
    assert all(by[b]["inputs"] == {"from": "sft"} for b in ("grpo", "dr_grpo", "dpo", "ppo"))
    assert all("pass@1" in st["metrics"] for st in s["stages"])
    assert Path(s["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["registered_model"] == "models:/posttrain-rl-ablation-smoke/1"


@pytest.mark.slow
def test_rl_ablation_branches_run_at_once_with_the_sequential_outputs(shared_state, tmp_path):
    """max_parallel_stages 2: dr_grpo and ppo (new settings, so not cached) run at the same time, and
    give the checkpoints and held-out metrics of a sequential run of the same recipe."""
    from mlflow.tracking import MlflowClient

    over = ["--set", "dr_grpo.max_steps=4", "--set", "ppo.max_steps=4"]
    shutil.copytree(shared_state / "state", tmp_path / "state")  # fetch/sft/grpo/dpo cached in both
    par = _run(["rl-ablation", "--smoke", *over, "--set", "max_parallel_stages=2"], shared_state)
    seq = _run(["rl-ablation", "--smoke", *over], tmp_path)
    ran = [st["stage"] for st in par["stages"] if not st["cached"]]
    assert ran == ["dr_grpo", "ppo"] and ran == [st["stage"] for st in seq["stages"] if not st["cached"]]
    for a, b in zip(par["stages"], seq["stages"]):
        assert a["output"]["digest"] == b["output"]["digest"] and a["metrics"] == b["metrics"], a["stage"]
    client = MlflowClient(f"sqlite:///{shared_state / 'state' / 'mlflow.db'}")
    runs = {st["stage"]: client.get_run(st["mlflow_run_id"]).info for st in par["stages"] if st["stage"] in ran}
    overlap = min(r.end_time for r in runs.values()) - max(r.start_time for r in runs.values())
    assert overlap > 0, runs  # ms: the two branches' stage runs were open at the same time


@pytest.mark.slow
def test_distill_smoke_and_the_students_lineage_reaches_the_teacher(tmp_path):
    s = _run(["distill", "--smoke"], tmp_path)
    names = ["teacher_base", "teacher", "teacher_samples", "verified", "student_base", "student", "student_sft",
             "student_grpo"]
    assert [st["stage"] for st in s["stages"]] == names
    assert [st["kind"] for st in s["stages"]].count("fetch") == 2
    by = {st["stage"]: st for st in s["stages"]}
    assert by["student"]["inputs"] == {"from": "student_base", "samples": "verified"}
    assert s["final_model"]["digest"] == by["student"]["output"]["digest"]
    assert s["registered_model"] == "models:/posttrain-distill-smoke/1"
    for st in ("student", "student_sft", "student_grpo", "teacher"):
        assert "pass@1" in by[st]["metrics"]
    p = _cli(["lineage", s["registered_model"], "--json"], tmp_path / "state", timeout=300)
    assert p.returncode == 0, p.stderr
    chain = json.loads(p.stdout)
    assert not chain["problems"]
    stages = {r["stage"]: r for r in chain["stages"]}
    # both parents: the student's own base, and the teacher's checkpoint through the samples
    assert {"student_base", "teacher_base", "teacher", "teacher_samples", "verified", "student"} <= set(stages)
    assert stages["teacher"]["output_digest"] == by["teacher"]["output"]["digest"]
    assert stages["student_base"]["output_digest"] == by["student_base"]["output"]["digest"]
    assert not {"student_sft", "student_grpo"} & set(stages)  # the comparison branch is not its parent
    text = _cli(["lineage", s["registered_model"]], tmp_path / "state", timeout=300).stdout
    assert "teacher (sft)" in text and by["teacher"]["output"]["digest"] in text
