"""SFT recipe: supervised fine-tuning on prompt/completion or conversational data.

Wires the components: tokenize the validated dataset once, draw each step's global batch from a
seeded per-epoch permutation (a pure function of the step, so a resumed run sees exactly the data an
uninterrupted run would), and take the causal-LM loss on completion tokens only (TRL's
`completion_only_loss`), normalised by the completion tokens of the whole global batch so that any
split into micro-batches, accumulation steps or ranks gives the gradient of one big batch.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.config import SFTConfig
from models.engine import StepContext, run_loop
from models.packing import packed_logits, verify as verify_packing

IGNORE = -100


# ----------------------------------------------------------------------------- data


def render_example(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """(prompt text, completion text) of one validated example in TRL's formats."""
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    messages = list(row["messages"])
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, messages[-1]["content"]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's BOS exactly once (chat templates may already render it)."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def tokenize_examples(
    rows: list[dict], fmt: str, tokenizer, max_seq_len: int, completion_only: bool
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """[(input_ids, labels)] and how many examples were dropped for having no completion room."""
    out, dropped = [], 0
    eos = tokenizer.eos_token_id
    for row in rows:
        prompt, completion = render_example(row, fmt, tokenizer)
        p = encode_prompt(tokenizer, prompt)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + c)[:max_seq_len]
        n_prompt = min(len(p), len(ids))
        if n_prompt >= len(ids):
            dropped += 1
            continue
        labels = ([IGNORE] * n_prompt + ids[n_prompt:]) if completion_only else list(ids)
        out.append((ids, labels))
    return out, dropped


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are IGNORE on padding."""
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def n_label_tokens(examples) -> int:
    """Tokens that carry loss (the label at position t is predicted from t-1, so skip position 0)."""
    return sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in examples)


class EpochSampler:
    """Item p of the endless stream is perm(p // n)[p % n], perm(e) a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm = lru_cache(maxsize=4)(self._make)

    def _make(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


# ----------------------------------------------------------------------------- loss


def causal_lm_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over label positions that are not IGNORE, and their count."""
    logits = packed_logits(model, batch["input_ids"], batch["attention_mask"])  # padding-free, same logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return nll, int((shift_labels != IGNORE).sum())


def lm_step_fn(pad_id: int):
    """Token-mean NLL over the global batch (see models/engine.py for the loss_scale convention)."""

    def step(engine, chunk, ctx: StepContext):
        total = max(1, n_label_tokens(ctx.global_batch))
        nll, n = causal_lm_nll_sum(engine, collate(chunk, pad_id))
        contribution = nll / total
        return contribution * ctx.loss_scale, {"loss": contribution.item(), "tokens": n}

    return step


# ----------------------------------------------------------------------------- recipe


def save_hf_dir(tokenizer, base_dir: str | None):
    """A save_model callback: weights + tokenizer + the base's generation/prompt configs."""

    def save(module, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if base_dir:
            for name in ("generation_config.json", "posttrain.json"):
                src = Path(base_dir) / name
                if src.exists():
                    shutil.copy2(src, out / name)

    return save


def train_sft(spec: dict, on_log=None) -> dict:
    """spec: config (SFTConfig dict), base_path, dataset_path, workdir. Returns the loop result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts.sft import load_sft_dataset

    cfg = SFTConfig.model_validate(spec["config"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    df, fmt = load_sft_dataset(spec["dataset_path"])
    rows = df.to_dict("records")
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    examples, dropped = tokenize_examples(rows, fmt, tokenizer, cfg.max_seq_len, cfg.completion_only_loss)
    if not examples:
        raise ValueError(f"{spec['dataset_path']}: no example fits max_seq_len={cfg.max_seq_len}")
    model = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    sampler = EpochSampler(len(examples), cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def global_batch(step: int):
        return [examples[i] for i in sampler.indices(step * cfg.batch_size, cfg.batch_size)]

    verify_packing(model)  # before the engine wraps it (see models/packing.py)
    res = run_loop(
        model, cfg, spec["workdir"], global_batch, lm_step_fn(pad_id),
        save_hf_dir(tokenizer, spec["base_path"]), on_log=on_log,
    )
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics,
        "num_examples": len(examples), "dropped_examples": dropped, "format": fmt,
    }
