"""Policy, value, preference and reward-model losses as pure functions of tensors.

Shapes: `B` sequences, `T` tokens. `mask: (B, T) bool` marks the tokens that count. Log-probs are
those of the sampled/labelled tokens (see `models/logprobs.token_logprobs`).

Gradient accumulation (micro-batching)
--------------------------------------
Token-level losses end in `aggregate_token_loss`, whose final step divides by a *count*: valid
tokens ("token_mean") or non-empty sequences (the two "seq_mean..." modes). A micro-batch only
sees its own count, so averaging micro-losses does not reproduce the big-batch loss when the
counts differ between micro-batches. The fix is the `normalizer` argument:

    normalizer = sum(loss_normalizer(mb.mask, aggregation) for mb in accumulation_window)
    for mb in accumulation_window:
        loss, metrics = grpo_loss(..., mb.mask, aggregation=aggregation, normalizer=normalizer)
        loss.backward()          # the micro-losses now SUM to the big-batch loss
    optimizer.step()

Counts are additive. Under data parallelism over R ranks, all-reduce (sum) `normalizer` across
ranks as well, then undo the framework's own averaging: DDP/DeepSpeed *average* gradients over
ranks, so multiply each micro-loss by R; DeepSpeed's `engine.backward` also divides by
`gradient_accumulation_steps` unless called with `scale_wrt_gas=False`. Rows dropped before the
loss (e.g. GRPO groups flagged by `zero_std_mask`) must be dropped before counting too.
Metrics are always means over the micro-batch alone (log their average).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from models.algorithms.kl import KLKind, kl_estimate
from models.algorithms.logprobs import masked_mean, masked_sum

# Canonical names, each the paper that uses it:
#   seq_mean_token_mean     mean over a sequence's tokens, then over sequences (DeepSeekMath GRPO,
#                           Shao et al. 2024, eq. 3). Long answers' tokens weigh less.
#   token_mean              mean over all valid tokens of the batch (DAPO, Yu et al. 2025, sec. 3.3).
#   seq_mean_token_sum_norm sum over a sequence's tokens / a constant length (e.g. the max
#                           completion length), then / the number of rows, empty or not: the constant
#                           G * L of Dr. GRPO (Liu et al. 2025, eq. 2; TRL `dr_grpo` divides by
#                           batch rows * max_completion_length).
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
AGGREGATION_ALIASES = {"seq_mean": "seq_mean_token_mean", "constant_length": "seq_mean_token_sum_norm"}
_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def _canonical_aggregation(mode: str) -> str:
    mode = AGGREGATION_ALIASES.get(mode, mode)
    if mode not in _AGGREGATIONS:
        expected = _AGGREGATIONS + tuple(AGGREGATION_ALIASES)
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {expected}")
    return mode


def loss_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The denominator `aggregate_token_loss` uses for this mask: the number of valid tokens
    ("token_mean"), of sequences with at least one valid token ("seq_mean_token_mean"), or of all
    rows, masked-out ones included ("seq_mean_token_sum_norm": Dr. GRPO's divisor is a constant,
    so rows dropped from the mask still count).

    Args:
        mask: (B, T) bool.
        mode: an aggregation name or alias.

    Returns:
        0-dim float tensor. Additive: the count of a big batch is the sum over its micro-batches.
    """
    mask = mask.bool()
    mode = _canonical_aggregation(mode)
    if mode == "token_mean":
        return mask.sum().float()
    if mode == "seq_mean_token_sum_norm":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    return mask.any(dim=-1).sum().float()


def aggregate_token_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "seq_mean_token_mean",
    constant_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    Args:
        loss: (B, T) float.
        mask: (B, T) bool.
        mode: "seq_mean_token_mean" (alias "seq_mean"), "token_mean", or
            "seq_mean_token_sum_norm" (alias "constant_length"); see AGGREGATION_ALIASES above.
        constant_length: the divisor of "seq_mean_token_sum_norm" (required there, e.g. the max
            completion length; not the padded T of the batch, which changes between micro-batches).
        normalizer: the final denominator, default `loss_normalizer(mask, mode)`. Pass the count of
            the whole accumulation window to make micro-losses sum to the big-batch loss.

    Returns:
        0-dim tensor. A row with no valid token contributes 0 and is not counted in the
        "seq_mean_token_mean" mean (it is in "seq_mean_token_sum_norm"'s); an all-masked batch gives 0 (with a gradient of zeros), not nan.
    """
    mode = _canonical_aggregation(mode)
    mask = mask.bool()
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=loss.device, dtype=loss.dtype).clamp(min=1)
    else:
        normalizer = max(float(normalizer), 1.0)

    if mode == "token_mean":
        return masked_sum(loss, mask) / normalizer
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(loss, mask, dim=-1)  # (B,), 0 for an empty row
    else:
        if constant_length is None or constant_length <= 0:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs a positive constant_length")
        per_seq = masked_sum(loss, mask, dim=-1) / constant_length
    return per_seq.sum() / normalizer


def _clipped_surrogate(log_ratio, advantages, clip_low, clip_high):
    """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) per token (PPO, Schulman et
    al. 2017, eq. 7), plus the masks of tokens where the clip bites, i.e. where the min picks the
    clipped branch strictly and the gradient is 0, on each side: (low) A < 0 with ratio <
    1 - clip_low, (high) A > 0 with ratio > 1 + clip_high. Returns (per_token, low, high, ratio)."""
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    low = (advantages < 0) & (ratio < 1.0 - clip_low)
    high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return per_token, low, high, ratio


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
    constant_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    policy_loss: Literal["clip", "cispo"] = "clip",
    use_bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (DeepSeekMath, Shao et al. 2024, eq. 3), negated to be minimised.

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A) + beta * k3_t

    The asymmetric clip (clip_high > clip_low, e.g. 0.28 vs 0.2) is DAPO's "clip-higher" (Yu et al.
    2025, sec. 3.1). beta = 0 drops the KL term (DAPO, Dr. GRPO); the paper's GRPO used 0.04.

    Variants (each TRL GRPOConfig's option of the same name, `_compute_loss`):

    * importance_sampling_level="sequence": one ratio per sequence, s = exp(mean_t of the log-ratio
      over its valid tokens), clipped per sequence and shared by its tokens (GSPO, Zheng et al. 2025,
      eq. 5-7). The paper averages over sequences ("seq_mean_token_mean").
    * policy_loss="cispo": loss_t = -sg(min(ratio_t, clip_high)) * A * logprobs_t (MiniMax-M1, 2025,
      eq. 4): the IS weight is clipped and detached instead of the update, so every token keeps a
      gradient. `clip_high` is then the cap of the weight itself (TRL, after ScaleRL: 5.0), not 1 + it.
    * use_bias_correction_kl: the k3 term times the (differentiable) ratio, the importance-sampling
      correction of a KL estimated on samples of the old policy (DeepSeek-V3.2, 2025, sec. 3.1).

    Args:
        logprobs: (B, T) float, current policy, requires grad.
        old_logprobs: (B, T) float, the policy that sampled the rollouts (detached).
        advantages: (B,) float, one per sequence (`group_relative_advantages`); (B, T) also accepted.
        mask: (B, T) bool, completion tokens.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (CISPO: see above).
        ref_logprobs: (B, T) float, reference policy; needed when beta > 0.
        beta: weight of the per-token k3 KL penalty.
        aggregation, constant_length, normalizer: see `aggregate_token_loss`.
        importance_sampling_level: "token" or "sequence" (GSPO).
        policy_loss: "clip" (PPO/GRPO surrogate) or "cispo".
        use_bias_correction_kl: multiply k3 by the ratio.

    Returns:
        loss: 0-dim tensor.
        metrics: detached 0-dim tensors, means over this micro-batch's valid tokens:
            clip_fraction (tokens where the clip bites, see `_clipped_surrogate`, and its two sides
            clip_low_fraction (A < 0, ratio below 1 - clip_low) and clip_high_fraction (A > 0, ratio
            above 1 + clip_high), TRL's clip_ratio/low_mean and /high_mean; CISPO: where the
            weight is capped with A > 0, TRL's `cispo_clip_ratio`), kl (masked mean of k3; 0 without
            ref_logprobs), ratio_mean, pg_loss (the policy-gradient term alone, aggregated like the
            loss but with this micro-batch's own normaliser).
    """
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; expected 'token' or 'sequence'")
    if policy_loss not in ("clip", "cispo"):
        raise ValueError(f"unknown policy_loss {policy_loss!r}; expected 'clip' or 'cispo'")
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1) broadcasts over T
    # Padding can hold any log-prob; zero its log-ratio so exp() cannot overflow into nan grads.
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~mask, 0.0)
    if importance_sampling_level == "sequence":
        # GSPO eq. 7: the length-normalised sequence log-ratio, (B, 1)
        log_ratio = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    if policy_loss == "clip":
        pg, low, high, ratio = _clipped_surrogate(log_ratio, advantages, clip_low, clip_high)
    else:
        ratio = torch.exp(log_ratio)
        weight = torch.clamp(ratio, max=clip_high).detach()
        pg = -weight * advantages * logprobs.masked_fill(~mask, 0.0)
        high = (ratio > clip_high) & (advantages > 0)
        low = torch.zeros_like(high)
    pg, low, high, ratio = (x.expand(mask.shape) for x in torch.broadcast_tensors(pg, low, high, ratio))
    bites = low | high

    per_token = pg
    kl_mean = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        # Both sides 0 at padding: k3(0, 0) = 0 with a zero (not nan) gradient.
        kl = kl_estimate(logprobs.masked_fill(~mask, 0.0), ref_logprobs.detach().masked_fill(~mask, 0.0), "k3")
        kl_mean = masked_mean(kl.detach(), mask)
        if beta > 0:
            per_token = pg + beta * (kl * ratio if use_bias_correction_kl else kl)

    loss = aggregate_token_loss(per_token, mask, aggregation, constant_length, normalizer)
    metrics = {
        "clip_fraction": masked_mean(bites.float(), mask),
        "clip_low_fraction": masked_mean(low.float(), mask),
        "clip_high_fraction": masked_mean(high.float(), mask),
        "kl": kl_mean,
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "pg_loss": aggregate_token_loss(pg.detach(), mask, aggregation, constant_length),
    }
    return loss, metrics


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    aggregation: str = "token_mean",
    constant_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with per-token advantages (Schulman et al. 2017, eq. 7).

    Args:
        logprobs: (B, T) float, requires grad.
        old_logprobs: (B, T) float, detached.
        advantages: (B, T) float, e.g. from `gae` (whiten them first if you want).
        mask: (B, T) bool.
        clip_range: symmetric clip epsilon (0.2 in the paper).
        aggregation, constant_length, normalizer: see `aggregate_token_loss`.

    Returns:
        loss: 0-dim tensor.
        metrics: detached micro-batch means: clip_fraction (and its sides clip_low_fraction,
            clip_high_fraction), ratio_mean, pg_loss (= loss detached
            with the local normaliser), approx_kl (k3 of old vs new, a trust-region monitor).
    """
    mask = mask.bool()
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~mask, 0.0)
    pg, low, high, ratio = _clipped_surrogate(log_ratio, advantages.detach(), clip_range, clip_range)
    bites = low | high
    loss = aggregate_token_loss(pg, mask, aggregation, constant_length, normalizer)
    metrics = {
        "clip_fraction": masked_mean(bites.float(), mask),
        "clip_low_fraction": masked_mean(low.float(), mask),
        "clip_high_fraction": masked_mean(high.float(), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "pg_loss": aggregate_token_loss(pg.detach(), mask, aggregation, constant_length),
        "approx_kl": masked_mean(kl_estimate(logprobs.detach(), old_logprobs.detach(), "k3"), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over valid tokens of max((v - R)^2, (v_clip - R)^2),
    v_clip = old_v + clip(v - old_v, -c, c) (PPO2 baselines; Huang et al. 2022, "The 37
    implementation details of PPO", #9).

    Args:
        values: (B, T) float, current critic, requires grad.
        old_values: (B, T) float, critic at rollout time (detached).
        returns: (B, T) float, targets (from `gae`).
        mask: (B, T) bool.
        clip_range_value: c.
        normalizer: token count of the accumulation window (token_mean; see module docstring).

    Returns:
        loss: 0-dim tensor.
        metrics: detached: vf_clip_fraction (tokens where the clipped error is the larger, so the
            gradient is 0), value_mean.
    """
    mask = mask.bool()
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    worst = torch.maximum(err_unclipped, err_clipped)
    loss = 0.5 * aggregate_token_loss(worst, mask, "token_mean", normalizer=normalizer)
    metrics = {
        "vf_clip_fraction": masked_mean((err_clipped > err_unclipped).float(), mask),
        "value_mean": masked_mean(values.detach(), mask),
    }
    return loss, metrics


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool or 0/1 -> (B,) long: the last position where mask is set (0 for an empty row),
    under left or right padding alike (arange * mask peaks there): a sequence's last real token,
    where a reward model or a critic reads its score."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.bool().long() * positions).argmax(dim=-1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> torch.Tensor:
    """Per-token PPO-RLHF rewards: r_t = -kl_coef * KL_t, plus the sequence score at the last valid
    token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

    Args:
        scores: (B,) float, reward-model or verifier score per sequence.
        logprobs, ref_logprobs: (B, T) float, policy and reference log-probs (detached here).
        mask: (B, T) bool.
        kl_coef: weight of the KL penalty.
        kind: KL estimator, "k1" as in the papers above.

    Returns:
        (B, T) float, 0 at masked-out positions; a row with no valid token gets no score.
    """
    mask = mask.bool()
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), kind).masked_fill(~mask, 0.0)
    rewards = -kl_coef * kl
    last = last_valid_index(mask)  # (B,)
    bonus = torch.where(mask.any(dim=-1), scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last.unsqueeze(-1), bonus.unsqueeze(-1))


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B, T) token log-probs -> (B,) sequence log-prob: the masked sum, or with `average=True` the
    masked mean (IPO's length-normalised log-prob). An empty row gives 0."""
    return masked_mean(token_logps, mask, dim=-1) if average else masked_sum(token_logps, mask, dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    policy_chosen_mean_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference losses on sequence log-probs, one per pair.

    h = (pi_c - ref_c) - (pi_r - ref_r), the difference of implicit rewards over beta.

    * "sigmoid": -(1 - ls) * log sigma(beta * h) - ls * log sigma(-beta * h) (DPO, Rafailov et al.
      2023, eq. 7; ls > 0 is the conservative DPO of Mitchell 2023 for noisy labels).
    * "ipo": (h - 1 / (2 * beta))^2 (IPO, Azar et al. 2023, eq. 17). The paper uses length-*averaged*
      log-probs; this function does not care: pass `sequence_logps(..., average=True)` for IPO.
    * `rpo_alpha`: adds rpo_alpha * NLL of the chosen completion, length-normalised
      (-policy_chosen_mean_logps), to each pair's loss (Iterative RPO, Pang et al. 2024, eq. 3; TRL
      `rpo_alpha`). With pairs of a correct and an incorrect solution, plain DPO lowers the chosen
      log-prob along with the rejected one; the NLL term keeps the correct solutions likely.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) float, policy sequence log-probs.
        ref_chosen_logps, ref_rejected_logps: (B,) float, reference sequence log-probs.
        beta: DPO temperature (0.1 in the paper) or IPO's regularisation tau.
        loss_type: "sigmoid" or "ipo".
        label_smoothing: probability that a preference label is flipped (sigmoid only).
        rpo_alpha: weight of the chosen NLL term (None or 0: plain DPO/IPO).
        policy_chosen_mean_logps: (B,) float, the policy's *per-token mean* log-prob of each chosen
            completion (`sequence_logps(..., average=True)`); needed when rpo_alpha is set.

    Returns:
        losses: (B,) float (take `.mean()`).
        chosen_rewards, rejected_rewards: (B,) float, beta * (policy - ref), detached.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing is only defined for loss_type='sigmoid'")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    if rpo_alpha:
        if policy_chosen_mean_logps is None:
            raise ValueError("rpo_alpha needs policy_chosen_mean_logps (the chosen per-token mean log-probs)")
        losses = losses - rpo_alpha * policy_chosen_mean_logps
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model pairwise loss: mean of -log sigma(s_c - s_r - margin) (Bradley & Terry 1952;
    InstructGPT, Ouyang et al. 2022, eq. 1; the margin is Llama 2's, Touvron et al. 2023, eq. 2).

    Args:
        chosen_scores, rejected_scores: (B,) float.
        margin: (B,) float or None, how much better the chosen answer was rated.

    Returns:
        loss: 0-dim tensor.
        accuracy: 0-dim detached tensor, fraction of pairs with s_c > s_r (margin not applied).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen_scores.detach() > rejected_scores.detach()).float().mean()
    return loss, accuracy
