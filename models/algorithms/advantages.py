"""Advantage estimators: group-relative (GRPO family) and GAE (PPO).

Pure functions of tensors; no model, no trainer state.
"""

from __future__ import annotations

from typing import Literal

import torch

StdNormalization = Literal["group", "batch", "none"]


def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std_normalization: StdNormalization = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages relative to the other completions of the same prompt.

    A_i = (r_i - mean(group(i))) / (std + eps), where std is

    * "group": the std of the prompt's own group (GRPO, DeepSeekMath, Shao et al. 2024, sec. 4.1.2);
    * "batch": one std over the whole batch, keeping the per-group mean (a scale that does not
      up-weight near-uniform groups; the "batch" option of TRL's `scale_rewards`);
    * "none":  no division at all (Dr. GRPO, Liu et al. 2025, sec. 3.1: dividing by the group std
      biases updates towards questions that are too easy or too hard).

    The std is the *unbiased* one (divide by n - 1), like `torch.std` default and the common
    GRPO implementations. eps = 1e-4 follows TRL's GRPO default.

    A group whose rewards are all equal carries no learning signal: its advantages are exactly 0
    (never nan, even for group_size 1 or a zero batch std) and it is flagged in `zero_std_mask`,
    so a caller can drop those rows (DAPO's dynamic sampling, Yu et al. 2025, sec. 3.2).

    An unjudged reward is passed as NaN (a verifier's None): it is left out of its group's mean
    and std (and of the batch std) and gets advantage 0, as TRL's GRPOTrainer does with a
    completion no reward function could score (`nanmean`/`nanstd`, then `nan_to_num(0)`). A group
    with fewer than two judged rewards counts as flat.

    Args:
        rewards: (B,) float, group-contiguous: rows [k*G, (k+1)*G) are the G completions of
            prompt k, so B = n_prompts * group_size. NaN = unjudged.
        group_size: G, completions per prompt.
        std_normalization: "group", "batch" or "none".
        eps: added to the std before dividing.

    Returns:
        advantages: (B,) float, never NaN.
        zero_std_mask: (B,) bool, True for every row of a group whose rewards are all equal.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a multiple of group_size {group_size}")
    if std_normalization not in ("group", "batch", "none"):
        raise ValueError(f"unknown std_normalization {std_normalization!r}; expected 'group', 'batch' or 'none'")

    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = rewards.view(-1, group_size)  # (n_prompts, G)
    judged = ~torch.isnan(grouped)
    n_judged = judged.sum(dim=1, keepdim=True)  # (n_prompts, 1)
    values = grouped.masked_fill(~judged, 0.0)
    mean = values.sum(dim=1, keepdim=True) / n_judged.clamp(min=1)
    centred = (values - mean).masked_fill(~judged, 0.0)
    # Compared exactly (max == min), not via std < tol: a tiny real difference is still signal.
    # A group with fewer than two judged rewards has nothing to be relative to: flat too.
    hi = grouped.masked_fill(~judged, float("-inf")).amax(dim=1)
    lo = grouped.masked_fill(~judged, float("inf")).amin(dim=1)
    flat = (hi == lo) | (n_judged.squeeze(1) < 2)  # (n_prompts,)

    if std_normalization == "group":
        # unbiased; a group with < 2 judged rewards is flat and zeroed below anyway.
        var = centred.pow(2).sum(dim=1, keepdim=True) / (n_judged - 1).clamp(min=1)
        advantages = centred / (var.sqrt() + eps)
    elif std_normalization == "batch":
        kept = rewards[~torch.isnan(rewards)]
        std = kept.std() if kept.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        advantages = centred / (std + eps)
    else:
        advantages = centred

    advantages = advantages.masked_fill(flat.unsqueeze(1) | ~judged, 0.0)
    zero_std_mask = flat.unsqueeze(1).expand_as(grouped)
    return advantages.reshape(-1), zero_std_mask.reshape(-1)


def soft_overlong_penalty(length: int, max_length: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13), added to the reward:
    0 up to max_length - buffer_len tokens, then falling linearly to -penalty_factor at max_length
    (and below past it). verl's `overlong_buffer.len` / `penalty_factor`; TRL's
    `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)` is penalty_factor 1.

    Args:
        length: completion tokens.
        max_length: the completion budget L_max.
        buffer_len: L_cache, the tokens before L_max over which the penalty grows; 0 disables it.
        penalty_factor: the penalty at L_max.
    """
    if buffer_len <= 0:
        return 0.0
    expected = max_length - buffer_len
    if length <= expected:
        return 0.0
    if length > max_length:
        return -penalty_factor  # DAPO eq. 13: -1 past L_max
    return (expected - length) / buffer_len * penalty_factor


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    computed over the valid tokens only: masked-out positions are skipped (the "next" step of a
    valid token is the next *valid* token in its row), and the value after the last valid token
    is 0, i.e. the episode ends with the completion (no bootstrapping past EOS).

    Vectorised over B, a reverse loop over T.

    Args:
        rewards: (B, T) float, per-token rewards (e.g. from `kl_penalized_rewards`).
        values: (B, T) float, critic values V(s_t); treated as constants (detached).
        mask: (B, T) bool, valid (completion) tokens.
        gamma: discount.
        lam: GAE lambda; 1 gives Monte-Carlo returns minus V, 0 gives one-step TD.

    Returns:
        advantages: (B, T) float, 0 at masked-out positions.
        returns: (B, T) float, advantages + values (the critic's regression target), 0 at
            masked-out positions.
    """
    mask = mask.bool()
    values = values.detach()
    rewards = rewards.detach()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)  # V of the next valid token; 0 past the last one
    next_adv = rewards.new_zeros(B)
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        adv_t = torch.where(valid, adv_t, torch.zeros_like(adv_t))
        advantages[:, t] = adv_t
        # Invalid positions leave the carried state untouched, so gaps are skipped.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = (advantages + values).masked_fill(~mask, 0.0)
    return advantages, returns
