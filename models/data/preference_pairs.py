"""Preference pairs, as the DPO and reward-model recipes read them: from a file in TRL's format or
built on-policy (a correct and an incorrect sample of one problem, judged by the verifier), written
once to the stage's work dir so that a resumed run and every rank train on the same pairs, then
tokenized with the prompt rendering every stage shares (models/modeling/chat.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.training.batching import EpochSampler, collate_completions
from models.modeling.chat import (
    ChatTemplate, completion_content, completion_end, encode_completion, encode_prompt, problem_prompt_ids, prompt_text,
)
from models.training.distributed import rank_world
from models.recipes.preference_config import PreferenceDataConfig
from models.data.problems import load_problems
from models.generation.rollouts import SamplingParams, sample

PAIRS_FILE = "pairs.jsonl"


RANK0_WAIT_SECONDS = 6 * 3600  # on-policy pair building on a big model can take hours


Verifier = Callable[[str, str, str], "float | None"]


def pair_seed(seed: int, chunk: int) -> int:
    """Sampling seed of one chunk of prompts: a pure function of (seed, chunk)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def build_onpolicy_pairs(
    model, tokenizer, problems: list[dict], verifier: Verifier, n_pairs: int, samples_per_prompt: int,
    params: SamplingParams, seed: int, batch_size: int = 128, chat_template: ChatTemplate | None = None,
) -> list[dict]:
    """Up to `n_pairs` pairs {prompt, chosen, rejected, prompt_id}: chosen a correct and rejected an
    incorrect sample of the same problem (the first of each in sample order).

    problems: [{"id", "prompt", "answer"}]. verifier(prompt, completion, answer) -> float | None;
    >= 1 is correct, < 1 incorrect, None (unjudged) neither. Problems are visited in a permutation
    seeded by `seed`, `batch_size // samples_per_prompt` at a time, chunk c sampled with
    `pair_seed(seed, c)`, until there are enough pairs; each problem gives at most one pair. The same
    (weights, problems, arguments) give the same pairs.
    """
    order = EpochSampler(len(problems), seed).indices(0, len(problems))
    per_chunk = max(1, batch_size // samples_per_prompt)
    prompt_ids = problem_prompt_ids(tokenizer, chat_template)
    pairs: list[dict] = []
    for c, start in enumerate(range(0, len(order), per_chunk)):
        if len(pairs) >= n_pairs:
            break
        picked = [problems[i] for i in order[start : start + per_chunk]]
        rollouts = sample(
            model, tokenizer, [prompt_ids(p) for p in picked], samples_per_prompt, params,
            seed=pair_seed(seed, c), batch_size=batch_size,
        )
        correct: dict[int, str] = {}
        wrong: dict[int, str] = {}
        for r in rollouts:
            p = picked[r.prompt_index]
            verdict = verifier(prompt_text(p["prompt"]), r.completion_text, p["answer"])
            if verdict is None:
                continue
            (correct if verdict >= 1.0 else wrong).setdefault(r.prompt_index, r.completion_text)
        for k, p in enumerate(picked):
            if k in correct and k in wrong and correct[k] != wrong[k] and len(pairs) < n_pairs:
                pairs.append({"prompt": p["prompt"], "chosen": correct[k], "rejected": wrong[k], "prompt_id": p["id"]})
    return pairs


def _safe_verifier(name: str) -> Verifier:
    """The named reward as a verifier that never raises (models.rewards.combine_rewards' guarantee)."""
    from models.rewards import combine_rewards

    combined = combine_rewards({name: 1.0})
    return lambda prompt, completion, answer: combined(prompt, completion, answer)[0]


def wait_for_rank0(ready: Callable[[], bool], what: Path) -> None:
    """Ranks > 0 wait for rank 0's file (the process group does not exist before run_loop), so
    that every rank trains on byte-identical pairs rather than on its own re-sampling of them."""
    deadline = time.monotonic() + RANK0_WAIT_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: rank 0 did not write it within {RANK0_WAIT_SECONDS} s")
        time.sleep(0.5)


def prepare_pairs(spec: dict, cfg: PreferenceDataConfig, model, tokenizer) -> list[dict]:
    """The stage's pairs: `workdir/pairs.jsonl` if a previous attempt wrote it, else built (on-policy,
    sampling `model`) or read from the preference file, validated, and written there by rank 0
    (other ranks wait for that file)."""
    import pandas as pd

    from data_contracts.io import read_table, write_jsonl_atomic
    from data_contracts.preferences import validate_preferences

    path = Path(spec["workdir"]) / PAIRS_FILE
    rank, world = rank_world()
    if rank > 0 and world > 1:
        wait_for_rank0(path.exists, path)
    if path.exists():
        return validate_preferences(read_table(path), str(path)).to_dict("records")
    if cfg.dataset == "onpolicy":
        prompts_path = spec.get("prompts_path") or (cfg.prompts if cfg.prompts != "builtin" else None)
        if prompts_path is None:
            raise ValueError("on-policy pairs need spec['prompts_path'] (the task layer resolves 'builtin')")
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
            stop_strings=tuple(cfg.stop_strings),
        )
        rows = build_onpolicy_pairs(
            model, tokenizer, load_problems(prompts_path), _safe_verifier(cfg.reward), cfg.num_pairs,
            cfg.samples_per_prompt, params, cfg.seed, cfg.rollout_batch_size, cfg.chat_template,
        )
        source = f"on-policy pairs from {prompts_path}"
        if not rows:
            raise ValueError(f"{source}: no prompt had both a correct and an incorrect sample")
        validate_preferences(pd.DataFrame(rows, dtype=object), source)
    else:
        source = spec.get("dataset_path") or cfg.dataset
        rows = validate_preferences(read_table(source), str(source)).to_dict("records")
        if not rows:
            raise ValueError(f"{source}: no preference pairs")
    write_jsonl_atomic(rows, path)  # only rank 0 gets here when there are several
    return rows


def encode_sequence(
    tokenizer, prompt, completion, max_seq_len: int, chat_template: ChatTemplate | None = None, end=None,
) -> tuple[list[int], int]:
    """(ids, n_prompt): the prompt as `models.modeling.chat.encode_prompt` renders it, then the completion and
    its end token (the template's end-of-turn for a templated prompt, else EOS; as SFT and TRL do),
    cut to max_seq_len. Completion tokens are ids[n_prompt:], empty when the prompt fills the budget.
    `end` is a `models.modeling.chat.completion_end` made once for many sequences."""
    end = end or completion_end(tokenizer, chat_template)
    p = encode_prompt(tokenizer, prompt, chat_template)
    c = encode_completion(tokenizer, completion_content(completion), end(prompt))
    ids = (p + c)[:max_seq_len]
    return ids, min(len(p), len(ids))


def _margin(row: dict) -> float | None:
    m = row.get("margin")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return None
    return float(m)


def tokenize_pairs(
    rows: list[dict], tokenizer, max_seq_len: int, chat_template: ChatTemplate | None = None
) -> tuple[list[dict], int]:
    """[{index, chosen: (ids, n_prompt), rejected: (ids, n_prompt), margin}] and how many pairs were
    dropped for a prompt that leaves no completion room."""
    items, dropped = [], 0
    end = completion_end(tokenizer, chat_template)
    for row in rows:
        ch = encode_sequence(tokenizer, row["prompt"], row["chosen"], max_seq_len, chat_template, end)
        rj = encode_sequence(tokenizer, row["prompt"], row["rejected"], max_seq_len, chat_template, end)
        if ch[1] >= len(ch[0]) or rj[1] >= len(rj[0]):
            dropped += 1
            continue
        items.append({"index": len(items), "chosen": ch, "rejected": rj, "margin": _margin(row)})
    return items, dropped


def collate_sequences(seqs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, n_prompt) rows. completion_mask (B, T-1) is aligned with the shifted labels
    input_ids[:, 1:]: completion token j of a P-token prompt sits at shifted index P-1+j."""
    return collate_completions([ids[:p] for ids, p in seqs], [ids[p:] for ids, p in seqs], pad_id)
