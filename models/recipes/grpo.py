"""GRPO recipe: online RL with group-relative advantages on the one DeepSpeed engine loop.

Each optimizer step (DeepSeekMath GRPO, Shao et al. 2024, alg. 1, with μ = `num_iterations`
updates per rollout batch):

1. `global_batch(step)`: on a step that starts a batch (step % μ == 0), pick `num_prompts` problems
   with a seeded per-epoch permutation, sample `num_generations` (G) completions of each from the
   *current* policy with a seed derived from (config seed, step), score them with the configured
   rewards, and turn the scores into group-relative advantages; the next μ - 1 steps reuse that
   batch. Everything is a pure function of (weights at the batch's first step, step), and
   checkpoints fall on batch boundaries (`save_every` % μ == 0), so a run resumed from a checkpoint
   regenerates exactly the rollouts an uninterrupted run would have seen; every rank generates the
   whole global batch identically (same weights, same seed).
2. `step_fn`: one forward of the policy on prompt + completion, per-token log-probs of the
   completion under softmax(logits / temperature) (the distribution the sampler drew from), and the
   clipped surrogate of `models.algorithms.losses.grpo_loss` with the loss normaliser of the *global* batch,
   so any split into micro-batches, accumulation steps and ranks gives the gradient of one batch.

With μ = 1 the old policy is the current one (`old_logprobs = logprobs.detach()`, ratio 1, the clip
never bites); the behaviour log-probs the sampler recorded are only compared against it as a
sanity metric (`logprob_gap`, ~0 at top_p = 1). With μ > 1 the old log-probs are those behaviour
log-probs, the distribution the batch was actually drawn from (no extra forward pass), and the
clip bounds how far the later updates on the same batch move the policy.

Groups whose G rewards are all equal carry no signal. With `skip_zero_std_groups` their rows stay
in the batch (run_loop checks its length) but get weight 0: their tokens are left out of the loss
mask and of the normaliser, which is what dropping them would do (DAPO, Yu et al. 2025, sec. 3.2,
without re-sampling replacements). `frac_zero_std` reports how many there were.

What this does not do: shuffled mini-batches within the μ updates (each update takes the whole
batch, as TRL does), re-sampling to refill dropped groups, or generation with an inference server.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.algorithms.advantages import group_relative_advantages, soft_overlong_penalty
from models.training.batching import EpochSampler, collate_completions
from models.modeling.chat import problem_prompt_ids, prompt_text
from models.training.checkpoints import save_hf_dir
from models.modeling.device import device_of, to_device
from models.training.engine import StepContext, run_loop
from models.algorithms.logprobs import entropy_from_logits, masked_sum, token_logprobs
from models.modeling.lora import prepare_backbone
from models.algorithms.losses import grpo_loss
from models.training.packing import packed_logits, predicting, verify as verify_packing
from models.algorithms.reasoning import chunk_metrics, marker_flags
from models.recipes.rollout_common import (
    load_causal_lm,
    load_problems,
    logs_batch,
    pad_token_id,
    reference_policy,
    spec_problems,
    rollout_logger,
    rollout_result,
    reused_batches,
    rollout_seed,
    sampling_policy,
    truncate_rollout_log,
    zero3_shadow,
)
from models.rewards import combine_rewards
from models.rewards.format import has_think_answer_format
from models.recipes.rl_config import GRPOConfig
from models.generation.rollouts import SamplingParams, sample

BATCH_STATS = ("reward_std", "frac_zero_std", "frac_unjudged", "sampling_rounds")


# ----------------------------------------------------------------------------- batch building


def score_rollouts(rollouts, problems: list[dict], reward_fn, accuracy_key: str | None):
    """(rewards, correct): the combined reward of each rollout (None = unjudged) and whether it is
    correct (the `accuracy_key` part, or the total when there is none, is >= 1)."""
    rewards, correct = [], []
    for r in rollouts:
        p = problems[r.prompt_index]
        total, parts = reward_fn(prompt_text(p["prompt"]), r.completion_text, p["answer"])
        judged = parts.get(accuracy_key) if accuracy_key else total
        rewards.append(total)
        correct.append(judged is not None and judged >= 1.0)
    return rewards, correct


def make_items(rollouts, problems: list[dict], rewards: list, correct: list, cfg: GRPOConfig) -> list[dict]:
    """One training item per rollout, in the rollouts' group-contiguous order.

    rollouts: len n_prompts * G, rows [k*G, (k+1)*G) are prompt k's samples; problems[i] is the
    problem of prompt_index i. With `overlong_buffer_len` the soft overlong penalty is added to each
    judged reward; with `mask_truncated_completions` a truncated completion gets weight 0 (after it
    took part in its group's advantages). An unjudged reward (None) is left out of its group's baseline and
    gets advantage 0 (TRL's convention, see `group_relative_advantages`).
    Every item carries the batch statistics in `stats`; step_fn counts them once (from item 0).
    """
    g = cfg.num_generations
    if cfg.overlong_buffer_len:  # DAPO eq. 13, on judged rewards
        rewards = [
            None if r is None else r + soft_overlong_penalty(
                len(ro.completion_ids), cfg.max_new_tokens, cfg.overlong_buffer_len, cfg.overlong_penalty_factor)
            for r, ro in zip(rewards, rollouts)
        ]
    scores = torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32)
    adv, zero_std = group_relative_advantages(scores, g, cfg.scale_rewards)
    n = len(rollouts)
    judged = scores[~torch.isnan(scores)]
    stats = {
        "reward_std": float(judged.std()) if judged.numel() > 1 else 0.0,
        "frac_zero_std": float(zero_std.float().mean()),
        "frac_unjudged": sum(r is None for r in rewards) / n,
        "sampling_rounds": 1.0,  # dynamic sampling's rounds for this batch (set by make_global_batch)
    }
    items = []
    for i, ro in enumerate(rollouts):
        p = problems[ro.prompt_index]
        items.append({
            "index": i,
            "prompt_id": p["id"],
            "prompt": p["prompt"],
            "prompt_ids": list(ro.prompt_ids),
            "completion_ids": list(ro.completion_ids),
            "completion_text": ro.completion_text,
            "behaviour_logprobs": list(ro.logprobs),
            "finish_reason": ro.finish_reason,
            "reward": rewards[i],
            "correct": bool(correct[i]),
            "advantage": float(adv[i]),
            "formatted": has_think_answer_format(ro.completion_text),
            "markers": marker_flags(ro.completion_text, cfg.reasoning_markers),
            "weight": 0.0 if ((cfg.skip_zero_std_groups or cfg.dynamic_sampling) and bool(zero_std[i]))
            or (cfg.mask_truncated_completions and ro.finish_reason == "length") else 1.0,
            "stats": stats,
        })
    return items


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)


def refill_seed(seed: int, step: int, round_no: int) -> int:
    """Sampling seed of dynamic sampling's extra round `round_no` (>= 1) of a step; (seed, 0, 0)
    seeds the order of the extra prompts."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, round_no]).generate_state(1)[0])


def split_groups(picked: list[dict], rollouts, rewards: list, correct: list, g: int) -> list[tuple]:
    """[(problem, its G rollouts, their rewards, their correctness)] in prompt order."""
    return [(p, rollouts[k * g:(k + 1) * g], rewards[k * g:(k + 1) * g], correct[k * g:(k + 1) * g])
            for k, p in enumerate(picked)]


def informative(group: tuple) -> bool:
    """Whether a group's judged rewards differ (at least two judged, not all equal): it has signal."""
    judged = [r for r in group[2] if r is not None]
    return len(judged) > 1 and max(judged) > min(judged)


def fill_batch(groups: list[tuple], n: int) -> list[tuple]:
    """`n` groups: the informative ones in the order they were sampled, then, if too few, the first
    agreeing ones (they get weight 0 in make_items, as with skip_zero_std_groups)."""
    chosen = [grp for grp in groups if informative(grp)][:n]
    chosen += [grp for grp in groups if not informative(grp)][: n - len(chosen)]
    return chosen


def join_groups(groups: list[tuple]):
    """(picked, rollouts, rewards, correct) of the groups, rollouts re-indexed to their new prompt."""
    from dataclasses import replace

    picked, rollouts, rewards, correct = [], [], [], []
    for k, (p, ros, rs, cs) in enumerate(groups):
        picked.append(p)
        rollouts += [replace(r, prompt_index=k) for r in ros]
        rewards += rs
        correct += cs
    return picked, rollouts, rewards, correct


def make_global_batch(model, tokenizer, problems: list[dict], cfg: GRPOConfig, shadow=None, on_batch=None):
    """`global_batch(step)` for run_loop: sample, score and compute advantages for a step."""
    sampler = EpochSampler(len(problems), cfg.seed)
    reward_fn = combine_rewards(cfg.rewards)
    accuracy_key = "builtin_task" if "builtin_task" in cfg.rewards else None
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        stop_strings=tuple(cfg.stop_strings),
    )
    prompt_ids = problem_prompt_ids(tokenizer, cfg.chat_template)

    refill = EpochSampler(len(problems), refill_seed(cfg.seed, 0, 0))  # dynamic sampling's extra prompts
    g = cfg.num_generations

    def draw(picked: list[dict], seed: int):
        with sampling_policy(model, shadow) as policy:
            rollouts = sample(
                policy, tokenizer, [prompt_ids(p) for p in picked], g, params,
                seed=seed, batch_size=cfg.rollout_batch_size,
            )
        rewards, correct = score_rollouts(rollouts, picked, reward_fn, accuracy_key)
        return rollouts, rewards, correct

    def build(step: int, batch_no: int) -> list[dict]:  # prompts advance once per rollout batch
        picked = [problems[i] for i in sampler.indices(batch_no * cfg.num_prompts, cfg.num_prompts)]
        rollouts, rewards, correct = draw(picked, rollout_seed(cfg.seed, step))
        rounds = 1
        if cfg.dynamic_sampling:
            groups = split_groups(picked, rollouts, rewards, correct, g)
            extra = (batch_no * (cfg.max_sampling_rounds - 1)) * cfg.num_prompts
            while sum(informative(grp) for grp in groups) < cfg.num_prompts and rounds < cfg.max_sampling_rounds:
                more = [problems[i] for i in refill.indices(extra + (rounds - 1) * cfg.num_prompts, cfg.num_prompts)]
                groups += split_groups(more, *draw(more, refill_seed(cfg.seed, step, rounds)), g)
                rounds += 1
            picked, rollouts, rewards, correct = join_groups(fill_batch(groups, cfg.num_prompts))
        items = make_items(rollouts, picked, rewards, correct, cfg)
        items[0]["stats"]["sampling_rounds"] = float(rounds)
        if on_batch is not None:
            on_batch(step, items)
        return items

    global_batch = reused_batches(build, cfg.num_iterations, "num_iterations")
    return global_batch


# ----------------------------------------------------------------------------- loss


def collate_rollouts(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt + completion. Masks and behaviour log-probs are aligned with the *shifted*
    labels (input_ids[:, 1:]): completion token j of a P-token prompt sits at shifted index P-1+j."""
    out = collate_completions([it["prompt_ids"] for it in items], [it["completion_ids"] for it in items], pad_id,
                              {"behaviour": [it["behaviour_logprobs"] for it in items]})
    out["advantages"] = torch.tensor([it["advantage"] for it in items], dtype=torch.float32)
    out["weights"] = torch.tensor([it["weight"] for it in items], dtype=torch.float32)
    return out


def global_normalizer(items: list[dict], loss_type: str) -> float:
    """`models.algorithms.losses.loss_normalizer` of the whole global batch's loss mask, from lengths alone:
    completion tokens of weighted rows (token_mean), weighted non-empty rows (seq_mean_token_mean),
    or every row (seq_mean_token_sum_norm: Dr. GRPO's constant, whatever rows were dropped)."""
    if loss_type == "seq_mean_token_sum_norm":
        return float(len(items))
    kept = [len(it["completion_ids"]) for it in items if it["weight"] > 0]
    return float(sum(kept)) if loss_type == "token_mean" else float(sum(1 for c in kept if c > 0))


def completion_logprobs(model, batch: dict, temperature: float,
                        entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (b, n-1), entropy (b, n-1) or None) of the right-padded batch's completion tokens
    under softmax(logits / temperature), aligned with the shifted labels and 0 elsewhere. Only the
    positions that predict a completion token get logits (`packed_logits(keep=...)`): the prompt's
    positions never reach the LM head, and no (b, n, V) tensor is built."""
    cmask = batch["completion_mask"]
    logits = packed_logits(model, batch["input_ids"], batch["attention_mask"], keep=predicting(cmask)).float()  # (K, V)
    lp = token_logprobs(logits.unsqueeze(0), batch["input_ids"][:, 1:][cmask].unsqueeze(0), temperature)[0]
    ent = None
    if entropy:
        with torch.no_grad():  # of the sampled distribution, from the same forward
            ent = _on_positions(cmask, entropy_from_logits(logits.detach().unsqueeze(0) / temperature)[0])
    return _on_positions(cmask, lp), ent


def _on_positions(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(b, n-1) tensor holding `values` (K,) at `mask`'s True positions (row-major) and 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def _forward_counts_must_match(engine, ctx: StepContext) -> bool:
    """Under ZeRO-3 on several ranks every forward gathers parameters with collectives, so every rank
    must run the same number of forwards whatever its rows are."""
    module = getattr(engine, "module", engine)
    first = next(iter(module.parameters()), None)
    return ctx.world_size > 1 and first is not None and hasattr(first, "ds_id")


def grpo_step_fn(cfg: GRPOConfig, pad_id: int, ref_model=None):
    """step_fn for run_loop: the chunk's share of the global GRPO loss and additive metrics.

    Rows with weight 0 (zero-std groups with `skip_zero_std_groups`) are outside the loss mask and the
    normaliser: their gradient is exactly zero. So they get no backward (and no reference forward):
    they take one forward without autograd for the metrics that count every row (entropy,
    logprob_gap), and the loss and its gradient are those of the weighted rows alone, the same
    values as with every row in one batch (up to float rounding). A chunk with no weighted row, and
    ZeRO-3 on several ranks (where forwards are collective), keep the single forward of every row."""

    def step(engine, chunk: list[dict], ctx: StepContext):
        gb = ctx.global_batch
        n_seq = len(gb)
        n_judged = max(1, sum(it["reward"] is not None for it in gb))
        norm = global_normalizer(gb, cfg.loss_type)
        kept_tokens = max(1, sum(len(it["completion_ids"]) for it in gb if it["weight"] > 0))
        all_tokens = max(1, sum(len(it["completion_ids"]) for it in gb))

        live = [it for it in chunk if it["weight"] > 0]
        idle = [it for it in chunk if it["weight"] <= 0]
        if not live or not idle or _forward_counts_must_match(engine, ctx):
            live, idle = chunk, []
        batch = to_device(collate_rollouts(live, pad_id), device_of(engine))
        logprobs, token_entropy = completion_logprobs(engine, batch, cfg.temperature)
        cmask = batch["completion_mask"]
        loss_mask = cmask & (batch["weights"] > 0).unsqueeze(-1)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref, _ = completion_logprobs(ref_model, batch, cfg.temperature, entropy=False)
        # μ = 1: the old policy is this one (ratio 1). μ > 1: the sampled distribution's log-probs.
        old = logprobs.detach() if cfg.num_iterations == 1 else batch["behaviour"]
        loss, m = grpo_loss(
            logprobs, old, batch["advantages"], loss_mask,
            clip_low=cfg.epsilon, clip_high=cfg.epsilon_high, ref_logprobs=ref, beta=cfg.beta,
            aggregation=cfg.loss_type, constant_length=cfg.max_new_tokens, normalizer=norm,
            importance_sampling_level=cfg.importance_sampling_level, policy_loss=cfg.policy_loss,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
        )
        with torch.no_grad():
            # Entropy of the sampled distribution, from the same forward pass.
            entropy = masked_sum(token_entropy, cmask)
            gap = masked_sum((logprobs.detach() - batch["behaviour"]).abs(), cmask)
            if idle:
                ib = to_device(collate_rollouts(idle, pad_id), device_of(engine))
                ilp, ientropy = completion_logprobs(engine, ib, cfg.temperature)
                entropy = entropy + masked_sum(ientropy, ib["completion_mask"])
                gap = gap + masked_sum((ilp - ib["behaviour"]).abs(), ib["completion_mask"])
        share = float(loss_mask.sum()) / kept_tokens  # grpo_loss metrics are means over loss_mask
        metrics = {
            "loss": float(loss.detach()),
            "kl": float(m["kl"]) * share,
            "clip_fraction": float(m["clip_fraction"]) * share,
            "clip_low": float(m["clip_low_fraction"]) * share,
            "clip_high": float(m["clip_high_fraction"]) * share,
            "entropy": float(entropy) / all_tokens,
            "logprob_gap": float(gap) / all_tokens,
            "reward_mean": sum(it["reward"] for it in chunk if it["reward"] is not None) / n_judged,
            "accuracy": sum(it["correct"] for it in chunk) / n_seq,
            "completion_length": sum(len(it["completion_ids"]) for it in chunk) / n_seq,
            "frac_truncated": sum(it["finish_reason"] == "length" for it in chunk) / n_seq,
            **chunk_metrics(chunk, gb),
        }
        # Batch-level statistics once per step: from the chunk that holds item 0.
        first = chunk[0]["index"] == 0
        metrics.update({k: (chunk[0]["stats"][k] if first else 0.0) for k in BATCH_STATS})
        return loss * ctx.loss_scale, metrics

    return step


# ----------------------------------------------------------------------------- rollout log


def should_log_rollouts(step: int, cfg: GRPOConfig) -> bool:
    return logs_batch(step, cfg.num_iterations, cfg.save_every, cfg.log_rollouts)


def rollout_rows(step: int, items: list[dict], cfg: GRPOConfig) -> list[dict]:
    """Rows of the rollout sample (data_contracts.rollouts columns plus step and finish_reason);
    `step` is the 1-based optimizer step the batch fed, as in metrics.jsonl."""
    keep = items[: cfg.log_rollouts * cfg.num_generations]
    return [
        {
            "step": step + 1, "prompt_id": it["prompt_id"], "prompt": prompt_text(it["prompt"]),
            "completion": it["completion_text"],
            "reward": None if it["reward"] is None else float(it["reward"]),
            "advantage": it["advantage"], "length": len(it["completion_ids"]),
            "finish_reason": it["finish_reason"],
        }
        for it in keep
    ]


# ----------------------------------------------------------------------------- recipe


def train_grpo(spec: dict, on_log=None) -> dict:
    """spec: config (GRPOConfig dict), base_path (HF dir of the start policy), prompts_path
    (problems file: id, prompt, answer), workdir. Returns the loop result plus rollouts_path."""
    from transformers import AutoTokenizer

    cfg = GRPOConfig.model_validate(spec["config"])
    workdir = Path(spec["workdir"])
    problems = spec_problems(spec, cfg, "train_grpo")
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    model = prepare_backbone(load_causal_lm(spec["base_path"]), cfg)  # LoRA / gradient checkpointing
    pad_id = pad_token_id(tokenizer)

    shadow = zero3_shadow(model, cfg)
    # the frozen start policy (LoRA: the policy with adapters off); none for beta = 0
    ref_model = reference_policy(model, spec["base_path"], cfg) if cfg.beta > 0 else None

    rollouts_path, log_batch = rollout_logger(
        workdir, lambda step: should_log_rollouts(step, cfg), lambda step, items: rollout_rows(step, items, cfg)
    )
    global_batch = make_global_batch(model, tokenizer, problems, cfg, shadow=shadow, on_batch=log_batch)
    for m in (model, ref_model):  # padding-free forwards, checked before the engine wraps the policy
        if m is not None:
            verify_packing(m)
    res = run_loop(
        model, cfg, workdir, global_batch, grpo_step_fn(cfg, pad_id, ref_model),
        save_hf_dir(tokenizer, spec["base_path"]), on_log=on_log,
    )
    return rollout_result(res, rollouts_path, problems)


__all__ = [
    "train_grpo", "make_global_batch", "make_items", "grpo_step_fn", "rollout_seed", "load_problems",
    "sampling_policy", "truncate_rollout_log",
]
