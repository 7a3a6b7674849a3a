"""On a CUDA GPU (skipped elsewhere): the engine and the forwards run on the accelerator, not on the
CPU that every other test uses. `make gpu-check` runs these, then the SmolLM2 smoke recipe in bf16."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_deepspeed_picks_the_cuda_accelerator():
    import os

    from models.training.distributed import ensure_distributed_env

    ensure_distributed_env()
    from deepspeed.accelerator import get_accelerator

    assert os.environ.get("DS_ACCELERATOR") != "cpu"
    assert get_accelerator().device_name() == "cuda"


def test_sft_on_the_engine_trains_on_the_gpu(tiny_base, sft_file, tmp_path, monkeypatch):
    """Two bf16 SFT steps: every forward the loss sees runs on CUDA tensors and the loss is finite."""
    import models.training.lm_loss as lm_loss
    import models.recipes.sft as sft
    from models.config import SFTConfig
    from models.training.engine import read_metrics

    devices = set()
    real = lm_loss.packed_logits

    def spy(model, input_ids, *a, **kw):
        devices.add(input_ids.device.type)
        devices.add(next(model.parameters()).device.type)
        return real(model, input_ids, *a, **kw)

    monkeypatch.setattr(lm_loss, "packed_logits", spy)
    cfg = SFTConfig(max_steps=2, batch_size=8, micro_batch_size=8, warmup_steps=0, save_every=10,
                    max_seq_len=64, precision="bf16")
    res = sft.train_sft({"config": cfg.model_dump(), "base_path": str(tiny_base), "dataset_path": str(sft_file),
                         "workdir": str(tmp_path)})
    rows = read_metrics(res["metrics_path"])
    assert devices == {"cuda"}
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_packing_layouts_hold_on_the_gpu(tiny_base):
    import models.training.packing as P
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).cuda().eval()
    assert P.verify(model) == {"packed": True, "tree": True, "segments": True}
