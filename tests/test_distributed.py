"""SFT with ZeRO-3 on 2 processes (torchrun, gloo on CPU) against 1 process without ZeRO."""

import os
from pathlib import Path

import pytest
import torch

from models.config import SFTConfig
from models.training.engine import read_metrics
from models.training.launch import run_training

pytestmark = pytest.mark.slow


def _spec(base, data, workdir, **over):
    cfg = SFTConfig(**{"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                       "save_every": 2, "max_seq_len": 64, **over})
    return {"config": cfg.model_dump(), "base_path": str(base), "dataset_path": str(data), "workdir": str(workdir)}


def test_zero3_two_processes_matches_one_process(tiny_base, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    one = run_training("models.recipes.sft:train_sft", _spec(tiny_base, sft_file, tmp_path / "one"), 1, tmp_path / "one")
    two = run_training(
        "models.recipes.sft:train_sft",
        _spec(tiny_base, sft_file, tmp_path / "two", world_size=2, micro_batch_size=4, deepspeed="zero3.json"),
        2, tmp_path / "two",
    )
    l1 = [m["loss"] for m in read_metrics(one["metrics_path"])]
    l2 = [m["loss"] for m in read_metrics(two["metrics_path"])]
    assert len(l1) == len(l2) == 3
    assert l2 == pytest.approx(l1, rel=1e-4)
    # the consolidated ZeRO-3 checkpoint is a plain transformers directory
    m1 = AutoModelForCausalLM.from_pretrained(one["output_dir"])
    m2 = AutoModelForCausalLM.from_pretrained(two["output_dir"])
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # ZeRO-3 wrote partitioned optimizer state for each rank
    ckpts = sorted((tmp_path / "two" / "checkpoints").glob("step*"))
    assert any("zero_pp_rank_1" in p.name for p in ckpts[-1].iterdir())


def test_one_process_binds_no_port_for_its_process_group():
    """World size 1 meets in an in-memory store: no TCP port to lose to another process between
    picking it and binding it (two runs started together once failed with EADDRINUSE)."""
    import subprocess
    import sys

    code = (
        "import os, socket, torch.distributed as dist\n"
        "from models.training.distributed import ensure_distributed_env\n"
        "ensure_distributed_env()\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['MASTER_PORT']))); s.listen(1)\n"
        "print(dist.is_initialized(), dist.get_world_size())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True", "1"], out.stderr[-2000:]
