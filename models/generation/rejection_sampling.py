"""Rejection sampling, part 1: draw `num_samples` candidates per prompt and score each with every
named reward. The filter stage (`models/algorithms/filters.py`) then picks what the refine stage trains on.

A plain function of a model, a tokenizer and problems; it writes no files and validates nothing
(the task layer checks the frame against `data_contracts.samples` and writes it). Deterministic:
the same model, problems and config (seed and batch_size included) give the same frame, row for
row, so the written file has the same digest and the stage caches cleanly.
"""

from __future__ import annotations

import logging

import pandas as pd

from models.modeling.chat import encode_prompt, prompt_text
from models.rewards import combine_rewards
from models.generation.rollouts import SamplingParams, sample
from models.recipes.sample_filter_config import SampleConfig

logger = logging.getLogger(__name__)

REWARD_PREFIX = "reward/"  # as data_contracts.samples.REWARD_PREFIX; models/ does not import contracts


def reward_column(name: str) -> str:
    return REWARD_PREFIX + name


def generate_samples(model, tokenizer, problems: list[dict], cfg: SampleConfig) -> pd.DataFrame:
    """One row per candidate for the first `cfg.num_prompts` problems (dicts with id, prompt, answer).

    Columns, in this order: `prompt_id`, `sample_idx` (0..num_samples-1), `prompt` (as the problem
    has it: a string or a conversation, so refine renders the ids that were sampled), `reference` (the
    problem's answer), `completion` (decoded, stop string kept), `reward/<name>` for every reward in
    `cfg.rewards` (None = could not be judged), `total` (weighted sum, None parts counted as 0; 0.0 when
    no reward could judge the sample, since the contract needs a number), `length` (completion tokens,
    the stop/EOS token included) and `finish_reason` ("stop", "eos" or "length").

    Rows are in prompt order, then sample index. The model is put in eval mode.
    """
    chosen = list(problems[: cfg.num_prompts])
    if not chosen:
        raise ValueError("no problems to sample from")
    for i, p in enumerate(chosen):
        missing = [k for k in ("id", "prompt", "answer") if k not in p]
        if missing:
            raise ValueError(f"problem {i}: missing key(s) {missing}")
    score = combine_rewards(dict(cfg.rewards))  # unknown reward names fail here, before sampling
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_strings=tuple(cfg.stop_strings),
    )
    prompts = [encode_prompt(tokenizer, p["prompt"], cfg.chat_template) for p in chosen]
    rollouts = sample(model, tokenizer, prompts, cfg.num_samples, params, seed=cfg.seed, batch_size=cfg.batch_size)
    rollouts = sorted(rollouts, key=lambda r: (r.prompt_index, r.sample_index))  # already so; made explicit

    rows = []
    for r in rollouts:
        problem = chosen[r.prompt_index]
        reference = str(problem["answer"])
        total, parts = score(prompt_text(problem["prompt"]), r.completion_text, reference)
        row = {
            "prompt_id": str(problem["id"]),
            "sample_idx": int(r.sample_index),
            "prompt": problem["prompt"],
            "reference": reference,
            "completion": r.completion_text,
        }
        for name in cfg.rewards:
            row[reward_column(name)] = parts[name]
        row["total"] = 0.0 if total is None else float(total)
        row["length"] = len(r.completion_ids)
        row["finish_reason"] = r.finish_reason
        rows.append(row)
    # object dtype: cells stay the Python values above (None stays None, ints stay ints), as
    # data_contracts.io.read_table gives them back, so a frame and its file round-trip alike
    return pd.DataFrame(rows, dtype=object)


def samples_to_sft(df: pd.DataFrame) -> pd.DataFrame:
    """The refine stage's SFT data: a (prompt, completion) frame in TRL's prompt/completion format
    (a conversational prompt stays a conversation: TRL's conversational prompt/completion).

    The completion is the sampled text as it was generated (stop string included). Rows whose
    completion is empty or whitespace-only are dropped with a warning (they teach nothing, and the
    SFT contract refuses them). Row order is kept; the index is reset.
    """
    for col in ("prompt", "completion"):
        if col not in df.columns:
            raise ValueError(f"samples_to_sft: missing column {col!r} (have {list(df.columns)})")
    out = df[["prompt", "completion"]].astype(object)
    blank = out["completion"].map(lambda c: not isinstance(c, str) or not c.strip())
    if blank.any():
        logger.warning("samples_to_sft: dropping %d sample(s) with an empty completion", int(blank.sum()))
        out = out[~blank]
    return out.reset_index(drop=True)


__all__ = ["REWARD_PREFIX", "reward_column", "generate_samples", "samples_to_sft"]
