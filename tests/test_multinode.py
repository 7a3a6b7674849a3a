"""Multi-node training stages on loopback: node 0 is run_training (the stage's own process), node 1 a
separate `posttrain node-agent` process, both meeting at a c10d rendezvous on 127.0.0.1."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from models.config import SFTConfig
from models.training.launch import RDZV_FILE, MultiNodeError, run_training

REPO = Path(__file__).resolve().parent.parent
TARGET = "models.recipes.sft:train_sft"
TWO_NODES = {"nnodes": 2, "nproc_per_node": 1, "micro_batch_size": 4, "deepspeed": "zero3.json",
             "rdzv_endpoint": "127.0.0.1", "num_threads": 1}


def test_node_layout_resolves_and_refuses_disagreeing_fields():
    from pydantic import ValidationError

    assert (SFTConfig().nnodes, SFTConfig().nproc_per_node, SFTConfig().world_size) == (1, 1, 1)
    assert SFTConfig(world_size=2, micro_batch_size=8).nproc_per_node == 2  # the single-machine form, unchanged
    assert SFTConfig(nnodes=2, micro_batch_size=8).world_size == 2
    assert SFTConfig(nnodes=2, nproc_per_node=2, micro_batch_size=4).world_size == 4
    assert SFTConfig(nnodes=2, world_size=4, micro_batch_size=4).nproc_per_node == 2
    for bad, why in [
        (dict(nnodes=2, world_size=3), "world_size (3) must be a multiple of nnodes (2)"),
        (dict(nnodes=2, nproc_per_node=2, world_size=2), "must equal nnodes × nproc_per_node (2 × 2 = 4)"),
        (dict(rdzv_endpoint="node0:29400"), "rdzv_endpoint is for a multi-node stage"),
        (dict(nnodes=2, micro_batch_size=8, rdzv_endpoint="node0:x"), "port must be a number"),
        (dict(nnodes=2, batch_size=16, micro_batch_size=16), "micro_batch_size × world_size (16 × 2)"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(why)):
            SFTConfig(**bad)
    from models.recipes.rl_config import GRPOConfig

    assert GRPOConfig(num_prompts=4, num_generations=4, nnodes=2).micro_batch_size == 8


def test_endpoint_forms():
    from models.recipes.train_config import parse_endpoint

    assert parse_endpoint("node0") == ("node0", None)
    assert parse_endpoint("10.0.0.1:29400") == ("10.0.0.1", 29400)
    assert parse_endpoint("[fd00::1]:29400") == ("fd00::1", 29400)
    assert parse_endpoint("fd00::1") == ("fd00::1", None)


def test_node_agent_without_a_rendezvous_says_what_it_needs(tmp_path):
    from flows.cli import main

    assert main(["node-agent", "--nnodes", "2"]) == 2
    assert main(["node-agent", "--workdir", str(tmp_path), "--wait", "0"]) == 1


def _spec(base, data, workdir, **over):
    cfg = SFTConfig(**{"max_steps": 4, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                       "save_every": 2, "max_seq_len": 64, **over})
    return {"config": cfg.model_dump(), "base_path": str(base), "dataset_path": str(data), "workdir": str(workdir)}


def _agent(argv: list[str], log: Path, **env) -> subprocess.Popen:
    """`posttrain node-agent ARGS` as another node would run it (its own session, like a separate machine)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "node-agent", *argv], cwd=REPO, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), **env), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )


def _agent_from_printed_command(workdir: Path, log: Path, started: list, timeout=60.0) -> threading.Thread:
    """Start node 1 with the exact command node 0 announced, once node 0 has written it."""
    def go():
        deadline = time.monotonic() + timeout
        while not (workdir / RDZV_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        cmd = shlex.split(json.loads((workdir / RDZV_FILE).read_text())["agent_command"])
        assert cmd[:2] == ["posttrain", "node-agent"]
        started.append(_agent(cmd[2:], log))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _stop(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None


@pytest.fixture(scope="module")
def one_process(tiny_base, sft_file, tmp_path_factory):
    wd = tmp_path_factory.mktemp("one")
    return run_training(TARGET, _spec(tiny_base, sft_file, wd), 1, wd)


def _same_weights(a_dir, b_dir):
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(a_dir)
    m2 = AutoModelForCausalLM.from_pretrained(b_dir)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_zero3_two_nodes_matches_one_process(one_process, tiny_base, sft_file, tmp_path, capfd):
    from models.training.engine import read_metrics

    wd = tmp_path / "two-nodes"
    wd.mkdir()
    started: list = []
    t = _agent_from_printed_command(wd, tmp_path / "node1.log", started)
    two = run_training(TARGET, _spec(tiny_base, sft_file, wd, **TWO_NODES), 2, wd)
    t.join()
    assert _stop(started[0]) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    # node 0 printed the agent command for the other node, and cleared its announcement when done
    assert "posttrain node-agent --rdzv-endpoint 127.0.0.1:" in capfd.readouterr().err
    assert not (wd / RDZV_FILE).exists()
    l1 = [m["loss"] for m in read_metrics(one_process["metrics_path"])]
    l2 = [m["loss"] for m in read_metrics(two["metrics_path"])]
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-4)
    _same_weights(one_process["output_dir"], two["output_dir"])
    ckpts = sorted((wd / "checkpoints").glob("step*"))
    assert any("zero_pp_rank_1" in p.name for p in ckpts[-1].iterdir())


@pytest.mark.slow
def test_a_node_that_never_arrives_fails_the_stage_after_the_timeout(tiny_base, sft_file, tmp_path):
    wd = tmp_path / "alone"
    t0 = time.monotonic()
    with pytest.raises(MultiNodeError) as err:
        # no rdzv_endpoint: node 0's hostname and a free port
        run_training(TARGET, _spec(tiny_base, sft_file, wd, **{**TWO_NODES, "rdzv_endpoint": None}, rdzv_timeout_s=3),
                     2, wd)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    host = socket.gethostname()
    assert f"not all 2 nodes joined the rendezvous at {host}:" in msg and "rdzv_timeout_s=3s" in msg
    assert f"posttrain node-agent --rdzv-endpoint {host}:" in msg
    assert elapsed < 3 + 30, elapsed  # the timeout plus torchrun's start, not torchrun's default 600 s
    assert not (wd / RDZV_FILE).exists()


@pytest.mark.slow
def test_killed_node_fails_the_stage_and_a_rerun_resumes_it(one_process, tiny_base, sft_file, tmp_path):
    from models.training.engine import read_metrics

    wd = tmp_path / "work" / "sft-killed"  # a stage work dir in a state dir (tmp_path)
    spec = _spec(tiny_base, sft_file, wd, **TWO_NODES)
    # node 1's rank SIGKILLs itself once step 3 is done (step 2's checkpoint is committed)
    node1 = _agent(["--workdir", str(wd), "--wait", "60"], tmp_path / "node1.log", POSTTRAIN_FAULT="step-done:*:3:*")
    t0 = time.monotonic()
    with pytest.raises(MultiNodeError) as err:
        run_training(TARGET, spec, 2, wd)
    failed_after = time.monotonic() - t0
    msg = str(err.value)
    assert "on 2 nodes failed" in msg and "continues from its last checkpoint (step 2)" in msg, msg
    assert _stop(node1) not in (0, None), (tmp_path / "node1.log").read_text()[-3000:]
    assert failed_after < 120, failed_after
    assert max(m["step"] for m in read_metrics(wd / "metrics.jsonl")) == 3

    # the rerun (what `posttrain resume` does for the stage): both nodes again, from step 2's checkpoint;
    # node 1 finds the new rendezvous in the state dir, and leaves once no further stage is announced
    node1 = _agent(["--state-dir", str(tmp_path), "--stage", "sft", "--follow", "--wait", "3"],
                   tmp_path / "node1-again.log")
    again = run_training(TARGET, spec, 2, wd)
    assert _stop(node1) == 0, (tmp_path / "node1-again.log").read_text()[-3000:]
    assert again["resumed_from_step"] == 2
    assert [m["step"] for m in read_metrics(again["metrics_path"])] == [1, 2, 3, 4]
    _same_weights(one_process["output_dir"], again["output_dir"])
