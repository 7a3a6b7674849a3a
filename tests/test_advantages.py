"""Hand-computed checks of models/advantages.py, plus a slow loop oracle for GAE."""

import math

import pytest
import torch

from models.advantages import gae, group_relative_advantages

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
