"""DPO recipe: Direct Preference Optimization (Rafailov et al. 2023) or IPO (Azar et al. 2023) on the one
DeepSpeed engine loop. The pairs come from `models/data/preference_pairs.py`, which the reward-model
recipe shares.

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
   `models.algorithms.losses.dpo_loss` (with `rpo_alpha`, plus the chosen completion's per-token NLL: RPO).
   Each pair's loss is divided by the pairs of the *global* batch, so any
   split into micro-batches, accumulation steps or ranks gives the gradient of one batch.

What this does not do: a reference model other than the starting policy, reference-free variants,
re-building pairs from the improving policy during training (iterative / online DPO).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from models.training.batching import EpochSampler
from models.training.checkpoints import save_hf_dir
from models.modeling.device import device_of, to_device
from models.training.distributed import rank_world
from models.training.engine import StepContext, loop_result, run_loop
from models.algorithms.logprobs import token_logprobs
from models.modeling.lora import prepare_backbone
from models.algorithms.losses import dpo_loss, sequence_logps
from models.training.packing import packed_logits, verify as verify_packing
from models.recipes.preference_config import DPOConfig
from models.data.preference_pairs import PAIRS_FILE, wait_for_rank0, collate_sequences, prepare_pairs, tokenize_pairs

REF_FILE = "ref_logps.pt"


# ----------------------------------------------------------------------------- on-policy pairs


# ----------------------------------------------------------------------------- tokenization


def completion_token_logps(model, seqs: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (B, T-1) of each next token, completion mask (B, T-1) bool) of the sequences."""
    batch = to_device(collate_sequences(seqs, pad_id), device_of(model))
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

    rank, world = rank_world()
    if rank > 0 and world > 1:
        wait_for_rank0(lambda: cached() is not None, path)
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
        ref_c = torch.tensor([it[f"ref_chosen_{key}"] for it in chunk], dtype=seq.dtype, device=seq.device)
        ref_r = torch.tensor([it[f"ref_rejected_{key}"] for it in chunk], dtype=seq.dtype, device=seq.device)
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
    prepare_backbone(model, cfg)  # LoRA adapters (B = 0: still the start policy) / gradient checkpointing
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = prepare_pairs(spec, cfg, model, tokenizer)
    items, dropped = tokenize_pairs(rows, tokenizer, cfg.max_seq_len, cfg.chat_template)
    if not items:
        raise ValueError(f"no preference pair fits max_seq_len={cfg.max_seq_len}")
    verify_packing(model)  # padding-free forwards, checked before the engine wraps it (models/training/packing.py)
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


__all__ = ["train_dpo", "reference_logps", "dpo_step_fn"]
