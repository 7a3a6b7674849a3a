"""bf16 on the DeepSpeed engine: the optimizer's fp32 master weights are the model's fp32 weights,
not their bf16 casts, on every ZeRO stage (models/training/deepspeed_setup.py:seed_fp32_masters)."""

import pytest
import torch

from models.config import SFTConfig
from models.training.deepspeed_setup import deepspeed_config, hold_fp32_values, seed_fp32_masters
from models.training.distributed import ensure_distributed_env


def _masters(engine) -> list[torch.Tensor]:
    """The fp32 master of every trainable parameter, in model order."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    if isinstance(opt, FP16_UnfusedOptimizer):
        by_id = {id(lo): hi for g_lo, g_hi in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(g_lo, g_hi)}
        return [by_id[id(p)].detach().clone() for p in engine.module.parameters()]
    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def _engine(tiny_base, stage: int, seed: bool):
    import deepspeed
    from transformers import AutoModelForCausalLM

    ensure_distributed_env()
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    original = [p.detach().clone() for p in model.parameters()]
    cfg = SFTConfig(batch_size=2, micro_batch_size=2, precision="bf16", zero_stage=stage)
    held = hold_fp32_values(model) if seed else []
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config=deepspeed_config(cfg)
    )
    n = seed_fp32_masters(engine, held)
    return engine, original, n


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_masters_are_the_fp32_weights_on_every_zero_stage(tiny_base, stage):
    engine, original, n = _engine(tiny_base, stage, seed=True)
    assert n == len(original)
    masters = _masters(engine)
    for m, w in zip(masters, original):
        assert m.dtype == torch.float32
        assert torch.equal(m, w)  # bit for bit: the checkpoint's low bits are kept
    if stage == 0:  # the wrapper's step on zero gradients is forgotten: the first real step is AdamW's 1st
        assert not engine.optimizer.optimizer.state
    # the model itself runs on the bf16 casts of those weights
    for p, w in zip(engine.module.parameters(), original):
        if stage != 3:
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), w.to(torch.bfloat16))


def test_without_seeding_deepspeed_builds_the_masters_from_the_bf16_casts(tiny_base):
    """What seed_fp32_masters repairs (DeepSpeed 0.19.8): the masters hold bf16 values, so the
    tiny model's random fp32 weights lose their low bits before the first step."""
    engine, original, n = _engine(tiny_base, 2, seed=False)
    assert n == 0
    masters = _masters(engine)
    assert all(torch.equal(m, w.to(torch.bfloat16).float()) for m, w in zip(masters, original))
    assert not all(torch.equal(m, w) for m, w in zip(masters, original))


def test_fp32_training_holds_nothing(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    assert hold_fp32_values(model) == []  # a bf16 checkpoint has no fp32 values to keep
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.requires_grad_(False)
    assert hold_fp32_values(model) == []  # frozen weights get no masters


@pytest.mark.parametrize("precision,seeded", [("bf16", True), ("fp32", False)])
def test_the_engine_loop_seeds_the_masters_in_bf16_only(tiny_base, sft_file, tmp_path, monkeypatch, precision, seeded):
    import models.training.engine as engine_mod
    from models.recipes.sft import train_sft

    calls = []
    real = engine_mod.seed_fp32_masters

    def spy(engine, held):
        calls.append((real(engine, held), sum(1 for p in engine.module.parameters() if p.requires_grad)))
        return calls[-1][0]

    monkeypatch.setattr(engine_mod, "seed_fp32_masters", spy)
    cfg = SFTConfig(max_steps=1, batch_size=4, micro_batch_size=4, lr=1e-3, save_every=1, max_seq_len=64,
                    precision=precision)
    train_sft({"config": cfg.model_dump(), "base_path": str(tiny_base), "dataset_path": str(sft_file),
               "workdir": str(tmp_path / "w")})
    assert len(calls) == 1
    set_, trainable = calls[0]
    assert set_ == (trainable if seeded else 0) and trainable > 0
