"""Per-token estimators of KL(pi || pi_ref) from log-probs of sampled tokens.

The tokens were sampled from pi (the policy), so with r = pi_ref(x) / pi(x) (J. Schulman,
"Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

* k1 = -log r = logprobs - ref_logprobs. Unbiased, high variance, can be negative per token.
* k2 = 0.5 * (log r)^2. Biased, low variance, always >= 0.
* k3 = (r - 1) - log r. Unbiased and always >= 0 (log is concave, so log r <= r - 1);
  the estimator GRPO puts in its loss (DeepSeekMath, Shao et al. 2024, eq. 4).

No clamping is done here: mask padding before the values reach `exp` (see `models/algorithms/losses.py`),
because a clamp would silently change the gradient of real tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate.

    Args:
        logprobs: (B, T) float, log pi(x_t) of the sampled tokens under the current policy.
        ref_logprobs: (B, T) float, log pi_ref(x_t) of the same tokens under the reference.
        kind: "k1", "k2" or "k3" (see the module docstring).

    Returns:
        (B, T) float. Differentiable w.r.t. `logprobs` (and `ref_logprobs` if it requires grad).
    """
    log_ratio = ref_logprobs - logprobs  # log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")
