"""DPO recipe: Direct Preference Optimization (Rafailov et al. 2023) or IPO (Azar et al. 2023) on the one
DeepSpeed engine loop, plus the preference-pair plumbing the reward-model recipe shares.

1. Pairs. Either a preference file in TRL's format (prompt, chosen, rejected) or pairs built
   on-policy: sample `samples_per_prompt` completions of each problem from the starting policy, judge
   them with the verifier, and pair one correct with one incorrect completion of the same prompt
   (prompts with only one kind give no pair). The pairs are written once to `workdir/pairs.jsonl`
   and read back on a restart, so a resumed run trains on exactly the same data.
2. Reference log-probs. The frozen reference is the starting policy, i.e. the very weights loaded
   before `run_loop` touches them: its completion log-probs are computed once per pair, cached in
   `workdir/ref_logps.pt`, and no reference model exists during training (no per-step reference
   forward, no second copy of the weights in memory).
3. Per step: one policy forward over the 2 x pairs sequences (chosen rows, then rejected rows),
   completion-only log-probs summed per sequence (averaged for IPO, as in its paper), and
   `models.losses.dpo_loss` (with `rpo_alpha`, plus the chosen completion's per-token NLL: RPO).
   Each pair's loss is divided by the pairs of the *global* batch, so any
   split into micro-batches, accumulation steps or ranks gives the gradient of one batch.

What this does not do: a reference model other than the starting policy, reference-free variants,
re-building pairs from the improving policy during training (iterative / online DPO).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.engine import StepContext, run_loop
from models.logprobs import token_logprobs
from models.losses import dpo_loss, sequence_logps
from models.packing import packed_logits, verify as verify_packing
from models.pref_config import DPOConfig, PreferenceDataConfig
from models.recipes.sft import EpochSampler, encode_prompt, save_hf_dir
from models.rollouts import SamplingParams, sample

PAIRS_FILE = "pairs.jsonl"
REF_FILE = "ref_logps.pt"
RANK0_WAIT_SECONDS = 6 * 3600  # on-policy pair building on a big model can take hours

Verifier = Callable[[str, str, str], "float | None"]


# ----------------------------------------------------------------------------- on-policy pairs


def pair_seed(seed: int, chunk: int) -> int:
    """Sampling seed of one chunk of prompts: a pure function of (seed, chunk)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def build_onpolicy_pairs(
    model, tokenizer, problems: list[dict], verifier: Verifier, n_pairs: int, samples_per_prompt: int,
    params: SamplingParams, seed: int, batch_size: int = 128,
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
    pairs: list[dict] = []
    for c, start in enumerate(range(0, len(order), per_chunk)):
        if len(pairs) >= n_pairs:
            break
        picked = [problems[i] for i in order[start : start + per_chunk]]
        rollouts = sample(
            model, tokenizer, [p["prompt"] for p in picked], samples_per_prompt, params,
            seed=pair_seed(seed, c), batch_size=batch_size,
        )
        correct: dict[int, str] = {}
        wrong: dict[int, str] = {}
        for r in rollouts:
            p = picked[r.prompt_index]
            verdict = verifier(p["prompt"], r.completion_text, p["answer"])
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


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _wait_for(ready: Callable[[], bool], what: Path) -> None:
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
    rank, world = _rank_world()
    if rank > 0 and world > 1:
        _wait_for(path.exists, path)
    if path.exists():
        return validate_preferences(read_table(path), str(path)).to_dict("records")
    if cfg.dataset == "onpolicy":
        from models.recipes.grpo import load_problems

        prompts_path = spec.get("prompts_path") or (cfg.prompts if cfg.prompts != "builtin" else None)
        if prompts_path is None:
            raise ValueError("on-policy pairs need spec['prompts_path'] (the task layer resolves 'builtin')")
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
            stop_strings=tuple(cfg.stop_strings),
        )
        rows = build_onpolicy_pairs(
            model, tokenizer, load_problems(prompts_path), _safe_verifier(cfg.reward), cfg.num_pairs,
            cfg.samples_per_prompt, params, cfg.seed, cfg.rollout_batch_size,
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


# ----------------------------------------------------------------------------- tokenization


def encode_sequence(tokenizer, prompt: str, completion: str, max_seq_len: int) -> tuple[list[int], int]:
    """(ids, n_prompt): BOS + prompt, then completion + EOS (as SFT and TRL do), cut to max_seq_len.
    Completion tokens are ids[n_prompt:], empty when the prompt fills the budget."""
    p = encode_prompt(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    ids = (p + c)[:max_seq_len]
    return ids, min(len(p), len(ids))


def _margin(row: dict) -> float | None:
    m = row.get("margin")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return None
    return float(m)


def tokenize_pairs(rows: list[dict], tokenizer, max_seq_len: int) -> tuple[list[dict], int]:
    """[{index, chosen: (ids, n_prompt), rejected: (ids, n_prompt), margin}] and how many pairs were
    dropped for a prompt that leaves no completion room."""
    items, dropped = [], 0
    for row in rows:
        ch = encode_sequence(tokenizer, row["prompt"], row["chosen"], max_seq_len)
        rj = encode_sequence(tokenizer, row["prompt"], row["rejected"], max_seq_len)
        if ch[1] >= len(ch[0]) or rj[1] >= len(rj[0]):
            dropped += 1
            continue
        items.append({"index": len(items), "chosen": ch, "rejected": rj, "margin": _margin(row)})
    return items, dropped


def collate_sequences(seqs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, n_prompt) rows. completion_mask (B, T-1) is aligned with the shifted labels
    input_ids[:, 1:]: completion token j of a P-token prompt sits at shifted index P-1+j."""
    n = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    cmask = torch.zeros((len(seqs), n - 1), dtype=torch.bool)
    for i, (ids, p) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        cmask[i, p - 1 : len(ids) - 1] = True
    return {"input_ids": input_ids, "attention_mask": attn, "completion_mask": cmask}


def completion_token_logps(model, seqs: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (B, T-1) of each next token, completion mask (B, T-1) bool) of the sequences."""
    batch = collate_sequences(seqs, pad_id)
    logits = packed_logits(model, batch["input_ids"], batch["attention_mask"])[:, :-1].float()  # padding-free
    return token_logprobs(logits, batch["input_ids"][:, 1:]), batch["completion_mask"]


# ----------------------------------------------------------------------------- reference log-probs


def reference_logps(model, items: list[dict], pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Sequence log-probs of every pair under `model` (the frozen reference), summed and averaged
    over completion tokens: {"chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean"}: (N,)."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            b = len(chunk)
            lp, mask = completion_token_logps(model, [it["chosen"] for it in chunk] + [it["rejected"] for it in chunk], pad_id)
            s, m = sequence_logps(lp, mask), sequence_logps(lp, mask, average=True)
            out["chosen_sum"].append(s[:b])
            out["rejected_sum"].append(s[b:])
            out["chosen_mean"].append(m[:b])
            out["rejected_mean"].append(m[b:])
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def pairs_fingerprint(items: list[dict]) -> str:
    """What the cached reference log-probs are of: the token ids of every pair."""
    blob = json.dumps([[it["chosen"], it["rejected"]] for it in items])
    return hashlib.sha256(blob.encode()).hexdigest()


def load_or_compute_reference(model, items: list[dict], pad_id: int, workdir: Path, batch_size: int) -> None:
    """Attach ref_{chosen,rejected}_{sum,mean} to every item, from `workdir/ref_logps.pt` when it is
    of these very pairs, else computed with `model` (the untrained start policy) and cached."""
    path = workdir / REF_FILE
    fp = pairs_fingerprint(items)

    def cached():
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        return saved["logps"] if saved.get("fingerprint") == fp else None

    rank, world = _rank_world()
    if rank > 0 and world > 1:
        _wait_for(lambda: cached() is not None, path)
    ref = cached()
    if ref is None:
        ref = reference_logps(model, items, pad_id, batch_size)
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{REF_FILE}.{os.getpid()}.tmp")
        torch.save({"fingerprint": fp, "logps": ref}, tmp)
        os.replace(tmp, path)
    for k, v in ref.items():
        vals = v.tolist()
        for it, x in zip(items, vals):
            it[f"ref_{k}"] = x


# ----------------------------------------------------------------------------- loss


def dpo_step_fn(cfg: DPOConfig, pad_id: int):
    """step_fn for run_loop: the chunk's share of the mean DPO/IPO loss over the global batch of pairs,
    and additive metrics (means over the global batch once summed over micro-steps and ranks)."""
    average = cfg.loss_type == "ipo"  # IPO, Azar et al. 2023: length-averaged log-probs
    key = "mean" if average else "sum"

    def step(engine, chunk: list[dict], ctx: StepContext):
        n_pairs = len(ctx.global_batch)
        b = len(chunk)
        lp, mask = completion_token_logps(engine, [it["chosen"] for it in chunk] + [it["rejected"] for it in chunk], pad_id)
        seq = sequence_logps(lp, mask, average=average)  # (2b,)
        ref_c = torch.tensor([it[f"ref_chosen_{key}"] for it in chunk], dtype=seq.dtype)
        ref_r = torch.tensor([it[f"ref_rejected_{key}"] for it in chunk], dtype=seq.dtype)
        chosen_mean = None
        if cfg.rpo_alpha:
            chosen_mean = seq[:b] if average else sequence_logps(lp[:b], mask[:b], average=True)
        losses, r_c, r_r = dpo_loss(seq[:b], seq[b:], ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                    rpo_alpha=cfg.rpo_alpha, policy_chosen_mean_logps=chosen_mean)
        contribution = losses.sum() / n_pairs
        metrics = {
            "loss": float(contribution.detach()),
            "rewards/chosen": float(r_c.sum()) / n_pairs,
            "rewards/rejected": float(r_r.sum()) / n_pairs,
            "rewards/accuracy": float((r_c > r_r).float().sum()) / n_pairs,
            "rewards/margin": float((r_c - r_r).sum()) / n_pairs,
        }
        if chosen_mean is not None:
            metrics["nll_loss"] = float(-chosen_mean.detach().sum()) / n_pairs
        return contribution * ctx.loss_scale, metrics

    return step


# ----------------------------------------------------------------------------- recipe


def loop_result(res, **extra) -> dict:
    """The recipe's return dict: the keys train_sft returns, plus stage-specific ones."""
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics, **extra,
    }


def train_dpo(spec: dict, on_log=None) -> dict:
    """spec: config (DPOConfig dict), base_path (HF dir of the start policy = the reference), workdir,
    and `dataset_path` (a preference file) or `prompts_path` (problems, for on-policy pairs).
    Returns the loop result plus num_examples (pairs trained on), dropped_examples, pairs_path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = DPOConfig.model_validate(spec["config"])
    workdir = Path(spec["workdir"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = prepare_pairs(spec, cfg, model, tokenizer)
    items, dropped = tokenize_pairs(rows, tokenizer, cfg.max_seq_len)
    if not items:
        raise ValueError(f"no preference pair fits max_seq_len={cfg.max_seq_len}")
    verify_packing(model)  # padding-free forwards, checked before the engine wraps it (models/packing.py)
    if not (workdir / "output" / ".complete").exists():
        # Before run_loop: `model` still holds the starting weights, i.e. it *is* the reference.
        load_or_compute_reference(model, items, pad_id, workdir, cfg.micro_batch_size)
    sampler = EpochSampler(len(items), cfg.seed)

    def global_batch(step: int) -> list[dict]:
        return [items[i] for i in sampler.indices(step * cfg.batch_size, cfg.batch_size)]

    res = run_loop(
        model, cfg, workdir, global_batch, dpo_step_fn(cfg, pad_id),
        save_hf_dir(tokenizer, spec["base_path"]), on_log=on_log,
    )
    return loop_result(res, num_examples=len(items), dropped_examples=dropped, format="preference",
                       pairs_path=str(workdir / PAIRS_FILE))


__all__ = [
    "train_dpo", "build_onpolicy_pairs", "prepare_pairs", "tokenize_pairs", "reference_logps",
    "dpo_step_fn", "encode_sequence", "collate_sequences",
]
