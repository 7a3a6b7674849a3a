"""Hand-computed checks of models/algorithms/logprobs.py, models/algorithms/kl.py and models/algorithms/losses.py."""

import math

import pytest
import torch

from models.algorithms.kl import kl_estimate
from models.algorithms.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
)
from models.algorithms.losses import (
    aggregate_token_loss,
    bradley_terry_loss,
    dpo_loss,
    grpo_loss,
    kl_penalized_rewards,
    loss_normalizer,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
)

LN2, LN4 = math.log(2), math.log(4)
B = torch.bool


def t(x, **kw):
    return torch.tensor(x, dtype=kw.pop("dtype", torch.float32), **kw)


# ---------------------------------------------------------------- log-probs and reductions


def test_token_logprobs_and_temperature():
    # logits [0, 0, ln2] -> softmax [1/4, 1/4, 1/2]: log p(2) = ln 0.5, log p(0) = ln 0.25
    # temperature 2 -> [0, 0, ln2/2] -> exp [1, 1, sqrt2]: p(2) = 1.41421 / 3.41421 = 0.414214
    logits = t([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    labels = torch.tensor([[2, 0]])
    assert torch.allclose(token_logprobs(logits, labels), t([[-LN2, -LN4]]))
    assert torch.allclose(token_logprobs(logits, labels, temperature=2.0)[0, 0], t(math.log(0.414214)), atol=1e-6)


def test_token_logprobs_matches_log_softmax_and_upcasts_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels, 0.7), ref, atol=1e-6)
    out = token_logprobs(logits.bfloat16(), labels)
    assert out.dtype == torch.float32


def test_entropy():
    # uniform over 4 -> ln 4; [1/4, 1/4, 1/2] -> 0.5 ln4 + 0.5 ln2 = 1.039721
    ent = entropy_from_logits(t([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, LN2, -1e9]]]))
    assert torch.allclose(ent, t([[LN4, 1.039721]]))


def test_masked_reductions_ignore_nan_padding():
    x = t([[1.0, 2.0, 3.0, float("nan")], [4.0, float("-inf"), 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=B)
    assert masked_sum(x, mask) == 10.0  # 1 + 2 + 3 + 4
    assert masked_mean(x, mask) == 2.5  # 10 / 4
    assert torch.equal(masked_mean(x, mask, dim=-1), t([2.0, 4.0]))
    assert torch.equal(masked_mean(x, torch.zeros_like(mask), dim=-1), t([0.0, 0.0]))  # empty -> 0
    # [1,2,3,4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> 5/3 unbiased, 5/4 biased
    assert torch.allclose(masked_var(x, mask), t(5 / 3))
    assert torch.allclose(masked_var(x, mask, unbiased=False), t(1.25))
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros_like(mask))


def test_masked_whiten():
    # [1, 2, 3]: mean 2, unbiased var 1 -> [-1, 0, 1]; shift_mean=False keeps the mean -> [1, 2, 3]
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]], dtype=B)
    assert torch.allclose(masked_whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]))


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # token 0: lp = ln .5, ref = ln .25 -> log r = ref - lp = -ln2
    #   k1 = ln2 = 0.693147; k2 = 0.5 ln2^2 = 0.240227; k3 = 0.5 + ln2 - 1 = 0.193147
    # token 1: lp = ln .25, ref = ln .5 -> log r = ln2
    #   k1 = -0.693147 (negative per token); k2 = 0.240227; k3 = 2 - ln2 - 1 = 0.306853
    lp, ref = t([[-LN2, -LN4]]), t([[-LN4, -LN2]])
    assert torch.allclose(kl_estimate(lp, ref, "k1"), t([[LN2, -LN2]]))
    assert torch.allclose(kl_estimate(lp, ref, "k2"), t([[0.240227, 0.240227]]))
    assert torch.allclose(kl_estimate(lp, ref, "k3"), t([[0.193147, 0.306853]]))
    assert torch.equal(kl_estimate(lp, lp, "k3"), torch.zeros(1, 2))
    g = torch.Generator().manual_seed(1)
    assert (kl_estimate(torch.randn(50, generator=g), torch.randn(50, generator=g), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


# ---------------------------------------------------------------- aggregation

LOSS = t([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [float("nan")] * 4])
MASK = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=B)  # row 2 fully masked


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("seq_mean_token_mean", 3.0),  # row means [2, 4], empty row excluded -> 6 / 2
        ("seq_mean", 3.0),
        ("token_mean", 2.5),  # (1 + 2 + 3 + 4) / 4
        # sums [6, 4, 0] / 4 = [1.5, 1, 0]; Dr. GRPO's constant counts every row -> 2.5 / 3
        ("seq_mean_token_sum_norm", 2.5 / 3),
        ("constant_length", 2.5 / 3),
    ],
)
def test_aggregation_modes(mode, expected):
    assert torch.allclose(aggregate_token_loss(LOSS, MASK, mode, constant_length=4), t(expected))


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_all_masked_batch_is_zero_not_nan(mode):
    x = torch.full((2, 3), float("nan"), requires_grad=True)
    loss = aggregate_token_loss(x, torch.zeros(2, 3, dtype=B), mode, constant_length=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(2, 3))


def test_aggregation_errors_and_normalizer():
    with pytest.raises(ValueError, match="constant_length"):
        aggregate_token_loss(LOSS, MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_token_loss(LOSS, MASK, "sum")
    assert loss_normalizer(MASK, "token_mean") == 4  # valid tokens
    assert loss_normalizer(MASK, "seq_mean") == 2  # non-empty rows
    assert loss_normalizer(MASK, "seq_mean_token_sum_norm") == 3  # every row: Dr. GRPO's constant
    # explicit normaliser replaces the count: token sum 10 / 8
    assert aggregate_token_loss(LOSS, MASK, "token_mean", normalizer=8) == 1.25


# ---------------------------------------------------------------- GRPO


def one_token(ratio, adv, **kw):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = grpo_loss(lp, torch.zeros(1, 1), t([adv]), torch.ones(1, 1, dtype=B), **kw)
    loss.backward()
    return loss.item(), m, lp.grad.item()


def test_grpo_clip_high_asymmetry():
    # A = +1, ratio 1.3: clip_high 0.2 -> min(1.3, 1.2) = 1.2 (bites, no grad)
    #                    clip_high 0.28 -> min(1.3, 1.28) = 1.28 (bites)
    loss, m, grad = one_token(1.3, 1.0, clip_high=0.2)
    assert loss == pytest.approx(-1.2) and m["clip_fraction"] == 1.0 and grad == 0.0
    loss, m, _ = one_token(1.3, 1.0, clip_high=0.28)
    assert loss == pytest.approx(-1.28) and m["clip_fraction"] == 1.0
    # ratio 1.25: clipped at 1.2 under 0.2, free under 0.28 -> loss -1.25, d/dlp = -ratio * A = -1.25
    loss, m, grad = one_token(1.25, 1.0, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and m["clip_fraction"] == 0.0 and grad == pytest.approx(-1.25)
    assert m["ratio_mean"] == pytest.approx(1.25)


def test_grpo_clip_low_and_when_clipping_does_not_bite():
    # A = -1, ratio 0.7, clip_low 0.2: min(-0.7, -0.8) = -0.8 -> loss 0.8, bites
    loss, m, grad = one_token(0.7, -1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8) and m["clip_fraction"] == 1.0 and grad == 0.0
    # clip_low 0.4: free -> loss 0.7
    assert one_token(0.7, -1.0, clip_low=0.4)[0] == pytest.approx(0.7)
    # A = -1, ratio 1.3: min(-1.3, -1.2) = -1.3 -> unclipped branch is active, not counted as clipped
    loss, m, grad = one_token(1.3, -1.0)
    assert loss == pytest.approx(1.3) and m["clip_fraction"] == 0.0 and grad == pytest.approx(1.3)


def test_grpo_beta_and_kl_metric():
    # lp = ln .5, ref = ln .25, old = lp (ratio 1), A = 1: pg = -1; k3 = 0.193147
    # beta 0.1 -> -1 + 0.1 * 0.193147 = -0.980685; beta 0 -> -1, kl still reported
    lp, ref, mask = t([[-LN2]]), t([[-LN4]]), torch.ones(1, 1, dtype=B)
    loss, m = grpo_loss(lp, lp, t([1.0]), mask, ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(-0.980685, abs=1e-6) and m["kl"].item() == pytest.approx(0.193147, abs=1e-6)
    assert m["pg_loss"].item() == pytest.approx(-1.0)
    loss, m = grpo_loss(lp, lp, t([1.0]), mask, ref_logprobs=ref, beta=0.0)
    assert loss.item() == pytest.approx(-1.0) and m["kl"].item() == pytest.approx(0.193147, abs=1e-6)
    loss, m = grpo_loss(lp, lp, t([1.0]), mask)
    assert m["kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, t([1.0]), mask, beta=0.1)


@pytest.mark.parametrize(
    "aggregation,expected",
    [
        ("seq_mean_token_mean", 0.5),  # ratio 1 -> per token -A: row means [-1, 2] -> 0.5
        ("token_mean", -0.25),  # (-1 -1 -1 + 2) / 4
        ("seq_mean_token_sum_norm", -1 / 6),  # sums [-3, 2] / 3 = [-1, 0.6667] -> mean -0.16667
    ],
)
def test_grpo_aggregations(aggregation, expected):
    lp = torch.zeros(2, 3)
    mask = t([[1, 1, 1], [1, 0, 0]], dtype=B)
    loss, _ = grpo_loss(lp, lp, t([1.0, -2.0]), mask, aggregation=aggregation, constant_length=3)
    assert loss.item() == pytest.approx(expected)


def test_grpo_padding_garbage_gives_finite_grads():
    lp = t([[-1.0, float("-inf")]], requires_grad=True)
    old = t([[-1.0, float("-inf")]])
    ref = t([[-2.0, 50.0]])
    loss, _ = grpo_loss(lp, old, t([1.0]), t([[1, 0]], dtype=B), ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_grpo_micro_batches_equal_one_big_batch(aggregation):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g)
    ref = -torch.rand(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=B)
    kw = dict(aggregation=aggregation, constant_length=6, ref_logprobs=None, beta=0.05, clip_high=0.28)
    lp = (old + 0.3 * torch.randn(4, 6, generator=g)).requires_grad_()

    big, _ = grpo_loss(lp, old, adv, mask, **{**kw, "ref_logprobs": ref})
    (big_grad,) = torch.autograd.grad(big, lp)

    # trainer convention: the normaliser of the whole window is the sum of the micro-batch counts
    halves = [slice(0, 2), slice(2, 4)]
    normalizer = sum(loss_normalizer(mask[s], aggregation) for s in halves)
    total = 0.0
    for s in halves:
        micro, _ = grpo_loss(lp[s], old[s], adv[s], mask[s], **{**kw, "ref_logprobs": ref[s]}, normalizer=normalizer)
        total = total + micro
    (acc_grad,) = torch.autograd.grad(total, lp)
    assert torch.allclose(total, big) and torch.allclose(acc_grad, big_grad)

    # and the naive average of micro-batch means is wrong here (the test can fail); not for Dr. GRPO,
    # whose divisor counts rows, 2 per half, so equal halves average correctly
    if aggregation == "seq_mean_token_sum_norm":
        return
    naive = sum(grpo_loss(lp[s], old[s], adv[s], mask[s], **{**kw, "ref_logprobs": ref[s]})[0] for s in halves) / 2
    assert not torch.allclose(naive, big)


def test_gspo_sequence_ratio_by_hand():
    # log-ratios [ln 2, 0] -> sequence log-ratio ln2 / 2 -> s = sqrt(2) = 1.41421, shared by both tokens
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=B)
    kw = dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean", importance_sampling_level="sequence")
    # A = +1: s > 1.28, the clip bites -> per token -1.28, mean -1.28, gradient 0
    lp = t([[LN2, 0.0]], requires_grad=True)
    loss, m = grpo_loss(lp, old, t([1.0]), mask, **kw)
    loss.backward()
    assert loss.item() == pytest.approx(-1.28) and torch.equal(lp.grad, torch.zeros(1, 2))
    assert m["clip_fraction"].item() == 1.0 and m["ratio_mean"].item() == pytest.approx(math.sqrt(2))
    # A = -1: -min(-1.41421, -1.28) = 1.41421 on both tokens, mean s; d s / d lp_t = s * (1/2) = 0.70711
    lp = t([[LN2, 0.0]], requires_grad=True)
    loss, _ = grpo_loss(lp, old, t([-1.0]), mask, **kw)
    loss.backward()
    assert loss.item() == pytest.approx(math.sqrt(2))
    assert torch.allclose(lp.grad, t([[math.sqrt(2) / 2, math.sqrt(2) / 2]]))
    # token level instead: ratios [2, 1] with A = -1 -> per token [2, 1] (no clip bites), mean 1.5
    loss, _ = grpo_loss(t([[LN2, 0.0]]), old, t([-1.0]), mask, clip_low=0.2, clip_high=0.28, aggregation="token_mean")
    assert loss.item() == pytest.approx(1.5)


def test_cispo_keeps_the_gradient_of_capped_tokens():
    # ratio 0.5 / 0.25 = 2, cap 1.5, A = +1: loss = -1.5 * 1 * ln 0.5 = 1.03972, d/d lp = -1.5
    lp = t([[math.log(0.5)]], requires_grad=True)
    old = t([[math.log(0.25)]])
    loss, m = grpo_loss(lp, old, t([1.0]), torch.ones(1, 1, dtype=B), clip_high=1.5, policy_loss="cispo")
    loss.backward()
    assert loss.item() == pytest.approx(1.5 * LN2) and lp.grad.item() == pytest.approx(-1.5)
    assert m["clip_fraction"].item() == 1.0
    # the PPO clip at the same ratio (1 + 0.28 < 2, A > 0) gives no gradient at all
    _, _, grad = one_token(2.0, 1.0, clip_high=0.28)
    assert grad == 0.0


def test_bias_corrected_kl_by_hand():
    # pi = 0.5, old = 0.25 (ratio 2), ref = 0.25: r = ref / pi = 0.5, k3 = 0.5 - ln 0.5 - 1 = 0.193147
    # A = 0 so the policy term is 0; beta 1: plain 0.193147, bias-corrected 2 * 0.193147 = 0.386294
    lp, old, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]]), t([[math.log(0.25)]])
    one = torch.ones(1, 1, dtype=B)
    plain, _ = grpo_loss(lp, old, t([0.0]), one, ref_logprobs=ref, beta=1.0, clip_high=1.5)
    corrected, m = grpo_loss(lp, old, t([0.0]), one, ref_logprobs=ref, beta=1.0, clip_high=1.5, use_bias_correction_kl=True)
    assert plain.item() == pytest.approx(0.193147, abs=1e-6)
    assert corrected.item() == pytest.approx(0.386294, abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.193147, abs=1e-6)  # the monitor stays plain k3


def _trl_loss(lp, old, ref, adv, mask, *, eps_low, eps_high, beta, level, loss_type, bias_kl):
    """TRL's GRPOTrainer._compute_loss arithmetic ('dapo' / 'cispo', one process, no accumulation),
    written out as an independent oracle."""
    mask = mask.float()
    adv = adv.unsqueeze(1)
    log_ratio = lp - old
    if level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)
    per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    if bias_kl:
        per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_loss = per_token_loss + beta * per_token_kl
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
@pytest.mark.parametrize("bias_kl", [False, True])
def test_grpo_variants_match_trl(level, loss_type, bias_kl):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g) - 0.1
    ref = -torch.rand(3, 5, generator=g) - 0.1
    adv = torch.randn(3, generator=g)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=B)
    base = (old + 0.4 * torch.randn(3, 5, generator=g)).masked_fill(~mask, -1.0)  # finite padding for TRL
    eps_high = 1.2 if loss_type == "cispo" else 0.28
    lp = base.clone().requires_grad_()
    ours, _ = grpo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=eps_high, ref_logprobs=ref, beta=0.05,
                        aggregation="token_mean", importance_sampling_level=level,
                        policy_loss="cispo" if loss_type == "cispo" else "clip", use_bias_correction_kl=bias_kl)
    (g_ours,) = torch.autograd.grad(ours, lp)
    lp = base.clone().requires_grad_()
    trl = _trl_loss(lp, old, ref, adv, mask, eps_low=0.2, eps_high=eps_high, beta=0.05, level=level,
                    loss_type=loss_type, bias_kl=bias_kl)
    (g_trl,) = torch.autograd.grad(trl, lp)
    assert torch.allclose(ours, trl, atol=1e-6)
    assert torch.allclose(g_ours * mask, g_trl * mask, atol=1e-6)


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss():
    # A = [+1, -1], ratios [1.5, 0.5], clip 0.2:
    #   token 0: min(1.5, 1.2) = 1.2 -> -1.2 (bites); token 1: min(-0.5, -0.8) = -0.8 -> 0.8 (bites)
    #   token_mean = (-1.2 + 0.8) / 2 = -0.2
    lp = t([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, m = ppo_policy_loss(lp, torch.zeros(1, 2), t([[1.0, -1.0]]), torch.ones(1, 2, dtype=B))
    loss.backward()
    assert loss.item() == pytest.approx(-0.2) and m["clip_fraction"] == 1.0
    assert torch.equal(lp.grad, torch.zeros(1, 2))
    # ratio 1 everywhere: loss = -mean(A) = -(2 - 1) / 2 = -0.5, nothing clipped, approx_kl 0
    loss, m = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), t([[2.0, -1.0]]), torch.ones(1, 2, dtype=B))
    assert loss.item() == pytest.approx(-0.5) and m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0


def test_ppo_value_loss_clipping_inactive_and_active():
    # token A: v 1.0, old 0.9 (inside +-0.2), R 1.5 -> both errors (1 - 1.5)^2 = 0.25
    # token B: v 2.0, old 1.0 -> v_clip 1.2, R 3: unclipped (2 - 3)^2 = 1, clipped (1.2 - 3)^2 = 3.24 -> 3.24
    # loss = 0.5 * (0.25 + 3.24) / 2 = 0.8725; dL/dv_A = 0.5 * 2 * (1 - 1.5) / 2 = -0.25, dL/dv_B = 0
    v = t([[1.0, 2.0, 5.0]], requires_grad=True)
    mask = t([[1, 1, 0]], dtype=B)
    loss, m = ppo_value_loss(v, t([[0.9, 1.0, 0.0]]), t([[1.5, 3.0, 0.0]]), mask, clip_range_value=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.8725)
    assert m["vf_clip_fraction"] == 0.5
    assert torch.allclose(v.grad, t([[-0.25, 0.0, 0.0]]))
    # wide clip range: token B unclipped -> 0.5 * (0.25 + 1) / 2 = 0.3125
    loss, m = ppo_value_loss(v, t([[0.9, 1.0, 0.0]]), t([[1.5, 3.0, 0.0]]), mask, clip_range_value=10.0)
    assert loss.item() == pytest.approx(0.3125) and m["vf_clip_fraction"] == 0.0


def test_kl_penalized_rewards_score_at_last_valid_token():
    # k1 = lp - ref; kl_coef 0.1. row 0 right padded, row 1 left padded, row 2 empty.
    # row 0: k1 [0.1, 0.2, 0.3] -> [-0.01, -0.02, -0.03 + 1.0] ; row 1: k1 0.5 -> -0.05 each, +2 on the last
    lp = t([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=B)
    r = kl_penalized_rewards(t([1.0, 2.0, 3.0]), lp, torch.zeros(3, 4), mask, kl_coef=0.1)
    expected = t([[-0.01, -0.02, 0.97, 0.0], [0.0, -0.05, -0.05, 1.95], [0.0] * 4])
    assert torch.allclose(r, expected)
    # k3 on row 0 token 0: lp 0.1, ref 0 -> log r = -0.1 -> e^-0.1 + 0.1 - 1 = 0.0048374
    r3 = kl_penalized_rewards(t([0.0, 0.0, 0.0]), lp, torch.zeros(3, 4), mask, kl_coef=1.0, kind="k3")
    assert r3[0, 0].item() == pytest.approx(-0.0048374, abs=1e-6)


# ---------------------------------------------------------------- DPO, reward model


def test_sequence_logps():
    # sum -1 -2 -3 = -6; mean -2; padding ignored
    x, mask = t([[-1.0, -2.0, -3.0, float("nan")]]), t([[1, 1, 1, 0]], dtype=B)
    assert sequence_logps(x, mask).item() == -6.0
    assert sequence_logps(x, mask, average=True).item() == -2.0


PAIR = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))  # pc, pr, rc, rr -> h = (-1 + 2) - (-3 + 2) = 2


def test_dpo_sigmoid_and_label_smoothing():
    # beta 0.1 -> beta*h = 0.2: -logsigmoid(0.2) = ln(1 + e^-0.2) = 0.598139
    losses, cr, rr = dpo_loss(*PAIR, beta=0.1)
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    # rewards beta * (policy - ref): 0.1 * 1 = 0.1, 0.1 * -1 = -0.1
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    # ls 0.1: 0.9 * 0.598139 + 0.1 * (0.598139 + 0.2) = 0.538325 + 0.079814 = 0.618139
    losses, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.618139, abs=1e-6)


def test_dpo_ipo():
    # beta 0.1: (2 - 1 / 0.2)^2 = (2 - 5)^2 = 9 ; beta 0.5: (2 - 1)^2 = 1
    assert dpo_loss(*PAIR, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(9.0)
    assert dpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, loss_type="hinge")


def test_dpo_rpo_adds_the_chosen_nll():
    # chosen per-token mean log-prob -0.5 -> NLL 0.5; alpha 1: 0.598139 + 0.5 = 1.098139, alpha 0.2: + 0.1
    mean_c = t([-0.5], requires_grad=True)
    losses, cr, rr = dpo_loss(*PAIR, beta=0.1, rpo_alpha=1.0, policy_chosen_mean_logps=mean_c)
    assert losses.item() == pytest.approx(1.098139, abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)  # rewards unchanged
    losses.sum().backward()
    assert mean_c.grad.item() == pytest.approx(-1.0)  # d(loss)/d(mean log-prob) = -alpha
    assert dpo_loss(*PAIR, beta=0.1, rpo_alpha=0.2, policy_chosen_mean_logps=t([-0.5]))[0].item() == pytest.approx(0.698139, abs=1e-6)
    # IPO + RPO: 9 + 0.5
    assert dpo_loss(*PAIR, beta=0.1, loss_type="ipo", rpo_alpha=1.0, policy_chosen_mean_logps=t([-0.5]))[0].item() == pytest.approx(9.5)
    assert dpo_loss(*PAIR, beta=0.1, rpo_alpha=0.0)[0].item() == pytest.approx(0.598139, abs=1e-6)  # 0: off
    with pytest.raises(ValueError, match="policy_chosen_mean_logps"):
        dpo_loss(*PAIR, rpo_alpha=1.0)


def test_bradley_terry():
    # diffs [1, -1]: ln(1 + e^-1) = 0.313262, ln(1 + e) = 1.313262 -> mean 0.813262; accuracy 1/2
    loss, acc = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 1.0]))
    assert loss.item() == pytest.approx(0.813262, abs=1e-6) and acc.item() == 0.5
    # margin [1, 0]: diffs [0, -1] -> (ln 2 + 1.313262) / 2 = 1.003205; accuracy ignores the margin
    loss, acc = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 1.0]), margin=t([1.0, 0.0]))
    assert loss.item() == pytest.approx(1.003205, abs=1e-6) and acc.item() == 0.5
