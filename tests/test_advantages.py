"""Hand-computed checks of models/algorithms/advantages.py, plus a slow loop oracle for GAE."""

import math

import pytest
import torch

from models.algorithms.advantages import gae, group_relative_advantages, soft_overlong_penalty

EPS = 1e-4


# ---------------------------------------------------------------- group-relative advantages


def test_group_std_normalization():
    # rewards [1,0 | 1,1], group 2 -> means [0.5, 1]; centred [0.5,-0.5 | 0,0]
    # std_group0 (unbiased) = sqrt((0.25 + 0.25) / 1) = 0.70711 -> adv +-0.5 / (0.70711 + 1e-4)
    adv, flat = group_relative_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "group")
    a = 0.5 / (math.sqrt(0.5) + EPS)  # 0.70701
    assert torch.allclose(adv, torch.tensor([a, -a, 0.0, 0.0]))
    assert flat.tolist() == [False, False, True, True]


def test_batch_std_normalization():
    # batch mean 0.75; squared deviations 0.0625, 0.5625, 0.0625, 0.0625 sum 0.75
    # unbiased var 0.75 / 3 = 0.25 -> std 0.5; group means still [0.5, 1] -> adv +-0.5 / (0.5 + 1e-4)
    adv, flat = group_relative_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "batch")
    a = 0.5 / (0.5 + EPS)  # 0.99980
    assert torch.allclose(adv, torch.tensor([a, -a, 0.0, 0.0]))
    assert flat.tolist() == [False, False, True, True]


def test_no_std_normalization_dr_grpo():
    # Dr. GRPO: centred only -> [0.5, -0.5, 0, 0]
    adv, _ = group_relative_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_of_three():
    # [0, 1, 2]: mean 1, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-4)
    # [3, 3, 5]: mean 11/3, centred [-2/3, -2/3, 4/3], std sqrt((4/9 + 4/9 + 16/9) / 2) = sqrt(4/3)
    adv, flat = group_relative_advantages(torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 5.0]), 3)
    s = math.sqrt(4 / 3) + EPS
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -2 / 3 / s, -2 / 3 / s, 4 / 3 / s]
    assert torch.allclose(adv, torch.tensor(expected))
    assert not flat.any()


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_all_equal_groups_are_zero_and_flagged(mode):
    # every group flat and the whole batch flat: batch std 0, group std 0 -> must be 0, not nan
    adv, flat = group_relative_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 0.3]), 3, mode)
    assert torch.equal(adv, torch.zeros(6))
    assert flat.all()


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_group_size_one_never_nan(mode):
    # a single completion has nothing to be relative to: advantage 0, flagged
    adv, flat = group_relative_advantages(torch.tensor([1.0, 0.0, 5.0]), 1, mode)
    assert torch.equal(adv, torch.zeros(3))
    assert flat.all()


def test_mean_of_equal_floats_is_exactly_zero():
    # 0.1 is not representable: mean([0.1]*3) - 0.1 may be ~1e-9, divided by eps it would be ~1e-5.
    # Flagged groups must be exactly zero.
    adv, _ = group_relative_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), 3, "group")
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3] > 0 and adv[4] < 0


def test_integer_rewards_accepted():
    adv, _ = group_relative_advantages(torch.tensor([1, 0]), 2, "none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple"):
        group_relative_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_relative_advantages(torch.zeros(4), 2, "bogus")
    with pytest.raises(ValueError):
        group_relative_advantages(torch.zeros(2, 2), 2)


# ---------------------------------------------------------------- GAE


def gae_oracle(rewards, values, mask, gamma, lam):
    """Obvious per-sequence loop: keep only the valid tokens, run the textbook recursion."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = torch.where(mask, adv + values.double(), torch.zeros_like(adv))
    return adv, ret


def test_gae_three_tokens_by_hand():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8 (gamma * lam = 0.72)
    # t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3;            A2 = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;         A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;         A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_padding_is_skipped_left_and_right():
    # the same 3-token episode, right padded and left padded, with garbage at the pads:
    # valid positions must carry the hand values above, pads 0 (no bootstrap from pad values)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0, 7.0], [7.0, 7.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0], [9.0, 9.0, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3, 0, 0], [0, 0, 0.21712, 0.246, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0, 0, 0], [0, 0, 0.71712, 0.846, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_loop_oracle(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 8
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3  # holes anywhere
    mask[0] = True  # a full row
    mask[1] = False  # an empty row
    mask[2, :3] = False  # left padding
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_oracle(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, adv_ref)
    assert torch.allclose(ret, ret_ref)
    assert torch.equal(adv[1], torch.zeros(T))


def test_gae_lambda_one_is_discounted_return_minus_value():
    # lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t. rewards [1, 2], gamma 0.5, values [0.25, 1]
    # A1 = 2 - 1 = 1; A0 = 1 + 0.5 * 2 - 0.25 = 1.75
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv, ret = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.25, 1.0]]), mask, 0.5, 1.0)
    assert torch.allclose(adv, torch.tensor([[1.75, 1.0]]))
    assert torch.allclose(ret, torch.tensor([[2.0, 2.0]]))


def test_gae_does_not_backprop_into_values():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2, dtype=torch.bool), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- unjudged rewards (NaN)

NAN = float("nan")


def test_unjudged_rewards_leave_the_baseline_and_get_zero():
    # group [1, 0, nan, 0]: judged [1, 0, 0], mean 1/3, centred [2/3, -1/3, -1/3]
    # unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3) = 0.57735 -> A = [2/3, -1/3, 0, -1/3] / 0.57745
    # group [nan, 2, nan, nan]: one judged reward, nothing to compare -> flat, all 0
    # group [nan x 4]: nothing judged -> flat, all 0
    r = torch.tensor([1.0, 0.0, NAN, 0.0, NAN, 2.0, NAN, NAN, NAN, NAN, NAN, NAN])
    adv, flat = group_relative_advantages(r, 4, "group")
    s = math.sqrt(1 / 3) + EPS
    assert torch.allclose(adv, torch.tensor([2 / 3 / s, -1 / 3 / s, 0, -1 / 3 / s] + [0.0] * 8))
    assert flat.tolist() == [False] * 4 + [True] * 8
    # "none" (Dr. GRPO): centred only -> [2/3, -1/3, 0, -1/3]
    adv, _ = group_relative_advantages(r[:4], 4, "none")
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, 0.0, -1 / 3]))
    # "batch": judged batch [1, 0, 0, 2]: mean 0.75, squared deviations 0.0625 + 0.5625 + 0.5625 + 1.5625
    # = 2.75, unbiased var 2.75 / 3 -> std 0.957427; group 0 keeps its own mean 1/3
    adv, _ = group_relative_advantages(r[:8], 4, "batch")
    sb = math.sqrt(2.75 / 3) + EPS
    assert torch.allclose(adv, torch.tensor([2 / 3 / sb, -1 / 3 / sb, 0, -1 / 3 / sb, 0, 0, 0, 0]))


def _trl_advantages(rewards, g, scale_rewards):
    """TRL's arithmetic (GRPOTrainer._generate_and_score_completions, multi_objective_aggregation
    'sum_then_normalize', with trl.trainer.utils.nanstd), written out as an independent oracle."""

    def nanstd(x, dim=None):
        mean = torch.nanmean(x, dim=dim, keepdim=True)
        var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
        corr = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=x.dtype))
        return torch.sqrt(var * corr).squeeze() if dim is None else torch.sqrt(var * corr).squeeze(dim)

    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_unjudged_rewards_match_trl(mode):
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (24,), generator=g).float()
    r[torch.rand(24, generator=g) < 0.3] = NAN
    r[0:4] = torch.tensor([1.0, NAN, 0.0, 1.0])  # at least one group with signal and an unjudged row
    adv, flat = group_relative_advantages(r, 4, mode)
    want = _trl_advantages(r, 4, mode)
    # TRL gives a flat group 0 through std 0 -> 0/1e-4 = 0 (or nan -> 0); "none" with a flat group
    # centres to 0 as well, so the two agree everywhere.
    assert torch.allclose(adv, want, atol=1e-6)
    assert not torch.isnan(adv).any()


# ---------------------------------------------------------------- soft overlong punishment


def test_soft_overlong_penalty_by_hand():
    # L_max 100, buffer 20: 0 up to 80; 90 -> (80 - 90) / 20 = -0.5; 100 -> -1; factor 0.5 halves it
    assert soft_overlong_penalty(80, 100, 20) == 0.0
    assert soft_overlong_penalty(90, 100, 20) == -0.5
    assert soft_overlong_penalty(100, 100, 20) == -1.0
    assert soft_overlong_penalty(101, 100, 20) == -1.0
    assert soft_overlong_penalty(90, 100, 20, penalty_factor=0.5) == -0.25
    assert soft_overlong_penalty(100, 100, 0) == 0.0  # disabled


def test_soft_overlong_penalty_matches_trl():
    # TRL trl/rewards/other_rewards.py, _SoftOverlongPunishment.__call__ (penalty factor 1)
    def trl(n, max_len, cache):
        if n <= max_len - cache:
            return 0.0
        if max_len - cache < n <= max_len:
            return (max_len - cache - n) / cache
        return -1.0

    for n in range(0, 30):
        assert soft_overlong_penalty(n, 24, 7) == pytest.approx(trl(n, 24, 7))
