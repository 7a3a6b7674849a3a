"""SFT recipe: supervised fine-tuning on prompt/completion or conversational data.

Wires the components: tokenize the validated dataset once, draw each step's global batch from a
seeded per-epoch permutation (a pure function of the step, so a resumed run sees exactly the data an
uninterrupted run would), and take the causal-LM loss on completion tokens only (TRL's
`completion_only_loss`), normalised by the completion tokens of the whole global batch so that any
split into micro-batches, accumulation steps or ranks gives the gradient of one big batch.
"""

from __future__ import annotations

import os
import sys

import torch

from models.modeling.chat import ChatTemplate, as_messages, completion_content, completion_end, encode_completion, encode_prompt
from models.config import SFTConfig
from models.training.batching import EpochSampler
from models.training.checkpoints import save_hf_dir
from models.training.engine import run_loop
from models.training.lm_loss import IGNORE, lm_step_fn
from models.modeling.lora import prepare_backbone
from models.training.packing import verify as verify_packing


# ----------------------------------------------------------------------------- data


def render_example(row: dict, fmt: str) -> tuple[object, str]:
    """(prompt, completion text) of one validated example in TRL's formats; the prompt is a string or
    a conversation, rendered by `models.modeling.chat` as every stage renders it."""
    if fmt == "prompt_completion":
        return row["prompt"], completion_content(row["completion"])
    messages = as_messages(row["messages"])
    return messages[:-1], messages[-1]["content"]


def tokenize_examples(
    rows: list[dict], fmt: str, tokenizer, max_seq_len: int, completion_only: bool,
    chat_template: ChatTemplate | None = None, stats: dict | None = None,
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """[(input_ids, labels)] and how many examples were dropped for having no completion room.

    The prompt ids are `models.modeling.chat.encode_prompt`'s, the ids the sampler is fed for the same prompt;
    the completion ends with the template's end-of-turn token for a templated prompt, else EOS.
    `stats`, when given, gets what a user should hear about their data: `truncated` (rows cut to
    max_seq_len, kept) and `unk` (rows with text the vocabulary reads as the unknown token), each a
    count and the first row number."""
    out, dropped = [], 0
    end = completion_end(tokenizer, chat_template)
    unk = getattr(tokenizer, "unk_token_id", None)
    for row_number, row in enumerate(rows, 1):
        prompt, completion = render_example(row, fmt)
        p = encode_prompt(tokenizer, prompt, chat_template)
        c = encode_completion(tokenizer, completion, end(prompt))
        if stats is not None:
            if len(p) + len(c) > max_seq_len:
                _count(stats, "truncated", row_number)
            if unk is not None and (unk in p or unk in c):
                _count(stats, "unk", row_number)
        ids = (p + c)[:max_seq_len]
        n_prompt = min(len(p), len(ids))
        if n_prompt >= len(ids):
            dropped += 1
            continue
        labels = ([IGNORE] * n_prompt + ids[n_prompt:]) if completion_only else list(ids)
        out.append((ids, labels))
    return out, dropped


def _count(stats: dict, key: str, row_number: int) -> None:
    entry = stats.setdefault(key, {"rows": 0, "first_row": row_number})
    entry["rows"] += 1


def data_warnings(stats: dict, dropped: int, total: int, max_seq_len: int, source: str) -> list[str]:
    """One line per thing about a user's SFT rows that changes what is trained, with counts."""
    lines = []
    if "truncated" in stats:
        t = stats["truncated"]
        lines.append(f"{source}: {t['rows']} of {total} examples are longer than max_seq_len={max_seq_len} and are "
                     f"cut (first: row {t['first_row']}); {dropped} of them left no completion and are dropped")
    if "unk" in stats:
        u = stats["unk"]
        lines.append(f"{source}: {u['rows']} of {total} examples hold text outside the tokenizer's vocabulary, "
                     f"read as its unknown token (first: row {u['first_row']}); the built-in model knows only "
                     "the built-in task's characters: bring a model with a BPE tokenizer for other text")
    return lines


# ----------------------------------------------------------------------------- loss


# ----------------------------------------------------------------------------- recipe


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
    stats: dict = {}
    examples, dropped = tokenize_examples(rows, fmt, tokenizer, cfg.max_seq_len, cfg.completion_only_loss,
                                          cfg.chat_template, stats)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in data_warnings(stats, dropped, len(rows), cfg.max_seq_len, spec["dataset_path"]):
            print(f"[posttrain] warning: {line}", file=sys.stderr, flush=True)
    if not examples:
        raise ValueError(f"{spec['dataset_path']}: no example fits max_seq_len={cfg.max_seq_len}")
    model = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    prepare_backbone(model, cfg)  # LoRA adapters / gradient checkpointing, as the config asks
    sampler = EpochSampler(len(examples), cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def global_batch(step: int):
        return [examples[i] for i in sampler.indices(step * cfg.batch_size, cfg.batch_size)]

    verify_packing(model)  # before the engine wraps it (see models/training/packing.py)
    res = run_loop(
        model, cfg, spec["workdir"], global_batch, lm_step_fn(pad_id),
        save_hf_dir(tokenizer, spec["base_path"]), on_log=on_log,
    )
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics,
        "num_examples": len(examples), "dropped_examples": dropped, "format": fmt,
        "truncated_examples": stats.get("truncated", {}).get("rows", 0),
        "unk_examples": stats.get("unk", {}).get("rows", 0),
    }
