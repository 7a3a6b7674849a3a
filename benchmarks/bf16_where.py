"""Where the bf16 gap of benchmarks/bf16_check.py comes from: the same 3 SFT steps of SmolLM2 (lr 1e-5,
batch 4, AdamW, clip 1.0, identical batches) in plain PyTorch and on a bare DeepSpeed engine, without
posttrain's engine loop.

    python -m benchmarks.bf16_where MODE [--zero-stage Z] [--no-clip]

MODE:
- `torch-fp32`: fp32 weights, torch AdamW.
- `torch-bf16`: bf16 weights, AdamW on an fp32 master copy (what mixed precision means).
- `ds-fp32`, `ds-bf16`: `deepspeed.initialize` with the same AdamW, `bf16.enabled` as named.
- `ds-bf16-seeded`: `ds-bf16` with the fp32 weights put back as the optimizer's masters
  (models/training/deepspeed_setup.py:seed_fp32_masters, what posttrain's engine does).

Prints the per-step loss (computed before that step's update) and DeepSpeed's optimizer wrapper.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def batches(model_dir: Path, steps: int = 3, batch: int = 4) -> list[dict]:
    from transformers import AutoTokenizer

    from benchmarks.bf16_check import sft_rows
    from models.training.lm_loss import collate
    from models.recipes.sft import tokenize_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex, _ = tokenize_examples(sft_rows(steps * batch), "messages", tok, 128, True, "auto")
    return [collate(ex[i * batch : (i + 1) * batch], tok.pad_token_id) for i in range(steps)]


def loss_of(model, b: dict):
    import torch.nn.functional as F

    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def run(mode: str, model_dir: Path, zero_stage: int = 0, clip: float = 1.0) -> tuple[list[float], str]:
    import torch
    from transformers import AutoModelForCausalLM

    data = batches(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses: list[float] = []
    if mode.startswith("torch"):
        params = list(model.parameters())
        master = [p.detach().clone() for p in params] if mode == "torch-bf16" else params
        if mode == "torch-bf16":
            model.to(torch.bfloat16)
        opt = torch.optim.AdamW(master, lr=1e-5)
        for b in data:
            loss = loss_of(model, b)
            loss.backward()
            if mode == "torch-bf16":
                for m, p in zip(master, params):
                    m.grad, p.grad = p.grad.float(), None
            if clip:
                torch.nn.utils.clip_grad_norm_(master, clip)
            opt.step()
            opt.zero_grad()
            if mode == "torch-bf16":
                with torch.no_grad():
                    for m, p in zip(master, params):
                        p.copy_(m)
            losses.append(loss.item())
        return losses, "torch.optim.AdamW"
    import deepspeed

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "gradient_clipping": clip, "zero_optimization": {"stage": zero_stage},
           "bf16": {"enabled": mode.startswith("ds-bf16")}}
    from models.training.deepspeed_setup import hold_fp32_values, seed_fp32_masters

    held = hold_fp32_values(model) if mode == "ds-bf16-seeded" else []
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                           config=cfg)
    seed_fp32_masters(engine, held)
    for b in data:
        loss = loss_of(engine, b)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, type(engine.optimizer).__name__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["torch-fp32", "torch-bf16", "ds-fp32", "ds-bf16", "ds-bf16-seeded"])
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path(".posttrain/bf16-where/smollm2"))
    args = ap.parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        from models.modeling.gguf import convert_gguf, smollm2_gguf

        convert_gguf(smollm2_gguf(), args.model_dir)
    losses, optimizer = run(args.mode, args.model_dir, args.zero_stage, 0.0 if args.no_clip else 1.0)
    print(f"{args.mode} zero{args.zero_stage} clip={not args.no_clip} optimizer={optimizer} "
          f"losses={[round(x, 4) for x in losses]}")


if __name__ == "__main__":
    main()
