"""SFT with ZeRO-3 on 2 processes (torchrun, gloo on CPU) against 1 process without ZeRO."""

import pytest
import torch

from models.config import SFTConfig
from models.engine import read_metrics
from models.launch import run_training

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
