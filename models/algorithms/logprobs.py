"""Token log-probabilities, entropy and masked reductions.

Pure tensor functions shared by every loss in `models/algorithms/losses.py`. Conventions:

* `B` is the batch (sequences), `T` the token axis, `V` the vocabulary.
* A `mask: (B, T) bool` marks the tokens that count (completion tokens, not prompt or padding).
  Values at masked-out positions are ignored, even when they are `inf` or `nan`: every reduction
  here fills them with 0 *before* multiplying, so padding garbage cannot leak into a mean.
* None of these functions shift logits against labels: the caller aligns `logits[:, t]` with
  the token it predicts.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) under softmax(logits / temperature).

    Args:
        logits: (B, T, V) float. Already aligned with `labels` (the caller shifts).
        labels: (B, T) long. Any in-range id at padding positions (mask them later).
        temperature: the sampling temperature the tokens were drawn with; dividing by it makes the
            log-probs those of the distribution that actually produced the rollout.

    Returns:
        (B, T) float32 (or float64 if the logits are float64).

    Memory: log p = z[label] - logsumexp(z). We gather one logit per token and reduce the
    vocabulary one row of the batch at a time, so the peak extra memory is one (T, V) temporary
    rather than a full (B, T, V) log_softmax copy. bf16/fp16 logits are upcast row by row, because
    logsumexp over 100k+ entries in bf16 loses most of its mantissa.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # (T, V), (T,)
        z = row_logits.to(out_dtype)
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    if not rows:
        return torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position.

    Args:
        logits: (B, T, V) float.

    Returns:
        (B, T) float32: H = logsumexp(z) - sum_v softmax(z)_v * z_v, which equals
        -sum_v p_v log p_v without materialising log p. Reduced one batch row at a time.
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = []
    for row_logits in logits:  # (T, V)
        z = row_logits.to(out_dtype)
        p = torch.softmax(z, dim=-1)
        rows.append(torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1))
    if not rows:
        return torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    return torch.stack(rows)


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # masked_fill rather than x * mask: inf * 0 = nan, and padding log-probs can be -inf.
    return x.masked_fill(~mask.bool(), 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is True.

    Args:
        x: (B, T) float (any shape broadcastable with `mask`).
        mask: (B, T) bool.
        dim: reduce over this axis, or over everything when None.

    Returns:
        0-dim tensor when `dim` is None, else `x` reduced over `dim`.
    """
    x = _zero_invalid(x, mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is True.

    Args:
        x: (B, T) float.
        mask: (B, T) bool.
        dim: reduce over this axis, or over everything when None.

    Returns:
        0-dim tensor (dim None) or the reduced tensor. Where there is no valid element the mean is
        defined as 0 (not nan), so a fully padded row contributes nothing.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of `x` (over all of them, not per row).

    Args:
        x: (B, T) float.
        mask: (B, T) bool.
        unbiased: divide by n - 1 (Bessel) rather than n.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: no valid element, or a single one with `unbiased=True` (n - 1 = 0): a silent 0
            or nan there would hide a masking bug upstream.
    """
    n = int(mask.sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid elements, got {n}")
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / n
    if unbiased:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the valid entries of `x` to unit variance (and zero mean if `shift_mean`).

    Used to whiten PPO advantages over a batch (Schulman et al. 2017 implementation detail;
    Huang et al. 2022, "The 37 implementation details of PPO", #7).

    Args:
        x: (B, T) float.
        mask: (B, T) bool.
        shift_mean: subtract the mean; with False the mean is kept (only the scale changes), which is
            how rewards are sometimes scaled without changing their sign.
        eps: added to the variance before the square root.

    Returns:
        (B, T) float; 0 at the masked-out positions.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_invalid(whitened, mask)
