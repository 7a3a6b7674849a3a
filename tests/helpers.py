"""Plain helpers shared by test modules: RL recipe set-ups (test_grpo.py, test_ppo.py), the CLI in a
subprocess, and process/run helpers of the operations tests (test_operations.py,
test_kill_resume.py). tests/ is on sys.path (pytest's rootdir conftest), so test modules import this
as `helpers`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


def build_half_solved_base(root: Path) -> dict:
    """A tiny base that already half-solves 2-3 operand chains, so verifier rewards vary.

    A random init never closes an <answer> block (reward always 0, loss 0): nothing to test. 150
    full-batch steps of plain-torch SFT (~1-2 s) give mixed rewards. Returns base_path (HF dir),
    prompts_path (its training problems) and root.
    """
    from models.data.builtin_task import make_problems
    from models.modeling.tiny_model import build_tiny_model, save_hf
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    train, _ = make_problems(0, 64, 8, 2, 3)
    enc = [tok(p.prompt + p.solution)["input_ids"] + [tok.eos_token_id] for p in train]
    ids = torch.full((len(enc), max(map(len, enc))), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)], attn[i, : len(e)] = torch.tensor(e), 1
    labels = ids.masked_fill(attn == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(150):
            model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    save_hf(model, tok, root / "base")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n" for p in train))
    return {"base_path": str(root / "base"), "prompts_path": str(problems), "root": root}


def rl_spec(base: dict, workdir, config: dict) -> dict:
    """A recipe spec over the fixture base's policy and problems."""
    return {"config": config, "base_path": base["base_path"], "prompts_path": base["prompts_path"],
            "workdir": str(workdir)}


def accumulated_grads(model, step, batch: list[dict], mbs: int):
    """(grads, summed metrics) of `batch` split into micro-batches of `mbs` and accumulated as the
    engine does (loss / gradient_accumulation_steps), with step = a recipe's step_fn."""
    from models.training.engine import StepContext

    model.zero_grad()
    ga = len(batch) // mbs
    total = {}
    for m in range(ga):
        ctx = StepContext(0, m, 0, 1, ga, batch, float(ga))
        loss, metrics = step(model, batch[m * mbs : (m + 1) * mbs], ctx)
        (loss / ga).backward()  # what engine.backward does with gradient_accumulation_steps = ga
        for k, v in metrics.items():
            total[k] = total.get(k, 0.0) + v
    return [p.grad.clone() for p in model.parameters()], total


def run_cli(*args, state_dir, summary=None, check=True, env=None, **popen):
    """`posttrain ARGS --state-dir DIR` in a subprocess from the repo root (Popen when popen kwargs
    are given); raises with the tail of its output when it fails and `check` is set."""
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "flows.cli", *args, "--state-dir", str(state_dir)]
    if summary:
        cmd += ["--summary-json", str(summary)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if popen:
        return subprocess.Popen(cmd, cwd=repo, env=full_env, **popen)
    p = subprocess.run(cmd, cwd=repo, env=full_env, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


R1_STAGES = ["fetch", "sft", "grpo", "sample", "filter", "refine"]

# The default recipe at its --smoke size, shrunk further for tests about where and how often stages
# run, not what they learn (concurrent runs, work pools, services): every stage still runs
# (pretraining, SFT, GRPO, sampling, filtering, refine, the evaluations) on a 1-layer base.
TINY = ["task.n_train=200", "task.n_test=16", "task.pretrain_docs=200",
        "fetch.pretrain.max_steps=4", "fetch.pretrain.save_every=2", "fetch.pretrain.hidden_size=32",
        "fetch.pretrain.num_layers=1", "fetch.pretrain.num_heads=2", "fetch.pretrain.intermediate_size=64",
        "fetch.pretrain.batch_size=8", "fetch.pretrain.micro_batch_size=8",
        "sft.max_steps=4", "sft.save_every=2", "sft.batch_size=4", "sft.micro_batch_size=4",
        "grpo.max_steps=1", "grpo.num_prompts=2", "grpo.num_generations=2", "grpo.max_new_tokens=8",
        "sample.num_prompts=4", "sample.num_samples=2", "sample.max_new_tokens=8",
        "refine.max_steps=2", "refine.save_every=1",
        "evaluate.num_problems=4", "evaluate.k=2", "evaluate.max_new_tokens=8"]


def sets(overrides: list[str]) -> list[str]:
    """["k=v", ...] as CLI arguments: ["--set", "k=v", ...]."""
    return [a for o in overrides for a in ("--set", o)]


def poll(predicate, deadline_s: float, what: str, every: float = 0.5, alive=None):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{what}: the process exited ({alive.returncode}) first")
        time.sleep(every)
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what}")


def kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def mlflow_runs(state: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    return client, exp.experiment_id


def off_by_one_pairs(problems) -> list[dict]:
    """Preference rows in TRL's format: each problem's worked solution against the same solution
    with the answer off by one."""
    return [{"prompt": p.prompt, "chosen": p.solution,
             "rejected": p.solution.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")}
            for p in problems]
