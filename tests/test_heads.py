"""models/modeling/heads.py on a tiny random Llama (hidden 16, 2 layers, vocab 20)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.modeling.heads import (
    SCORE_HEAD_FILE,
    CausalLMWithValueHead,
    RewardModel,
    ScalarHead,
    position_ids_from_mask,
)
from models.algorithms.losses import last_valid_index


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=20,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def padded_pair():
    """The same two sequences (lengths 3 and 5) right padded and left padded with pad id 0."""
    seqs = [[5, 6, 7], [3, 4, 5, 6, 7]]
    right = torch.zeros(2, 5, dtype=torch.long)
    left = torch.zeros(2, 5, dtype=torch.long)
    right_mask = torch.zeros(2, 5, dtype=torch.long)
    left_mask = torch.zeros(2, 5, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)], right_mask[i, : len(s)] = torch.tensor(s), 1
        left[i, 5 - len(s) :], left_mask[i, 5 - len(s) :] = torch.tensor(s), 1
    return (right, right_mask), (left, left_mask)


def test_scalar_head_shape_and_init():
    torch.manual_seed(0)
    head = ScalarHead(400)
    assert head(torch.randn(2, 3, 400)).shape == (2, 3)
    # weights ~ N(0, 1 / (400 + 1)): std 1/sqrt(401) = 0.0499; bias 0
    assert head.linear.weight.std().item() == pytest.approx(1 / math.sqrt(401), rel=0.15)
    assert torch.equal(head.linear.bias, torch.zeros(1))
    zero = ScalarHead(400, "zeros")
    assert not zero.linear.weight.any() and not zero.linear.bias.any()
    assert torch.equal(zero(torch.randn(2, 3, 400)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="init must be"):
        ScalarHead(4, "uniform")


def test_index_helpers():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert last_valid_index(mask).tolist() == [2, 4, 0]
    # positions restart at the first real token; pads get 0
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]]


def test_value_head_shapes_and_grad(tiny_llama):
    model = CausalLMWithValueHead(tiny_llama)
    assert model.pretrained_model is tiny_llama
    (ids, mask), _ = padded_pair()
    logits, values = model(ids, mask)
    assert logits.shape == (2, 5, 20) and values.shape == (2, 5)
    values.sum().backward()
    assert model.value_head.linear.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_value_head_same_under_left_and_right_padding(tiny_llama):
    model = CausalLMWithValueHead(tiny_llama)
    (r_ids, r_mask), (l_ids, l_mask) = padded_pair()
    with torch.no_grad():
        r_logits, r_values = model(r_ids, r_mask)
        l_logits, l_values = model(l_ids, l_mask)
    # row 0 (length 3): right positions 0..2 == left positions 2..4
    assert torch.allclose(r_values[0, :3], l_values[0, 2:], atol=1e-5)
    assert torch.allclose(r_logits[0, :3], l_logits[0, 2:], atol=1e-5)


def test_reward_model_left_right_padding_identical(tiny_llama):
    torch.manual_seed(1)
    rm = RewardModel(tiny_llama).eval()
    (r_ids, r_mask), (l_ids, l_mask) = padded_pair()
    with torch.no_grad():
        right = rm(r_ids, r_mask)
        left = rm(l_ids, l_mask)
        # the short sequence alone, unpadded: the score reads its last real token, not a pad
        alone = rm(r_ids[:1, :3], r_mask[:1, :3])
    assert right.shape == (2,)
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right[:1], alone, atol=1e-5)


def test_reward_model_save_load_round_trip(tiny_llama, tmp_path):
    torch.manual_seed(2)
    rm = RewardModel(tiny_llama).eval()
    (ids, mask), _ = padded_pair()
    rm.save(tmp_path)
    assert (tmp_path / SCORE_HEAD_FILE).exists() and (tmp_path / "config.json").exists()
    loaded = RewardModel.load(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(rm(ids, mask), loaded(ids, mask), atol=1e-6)
    assert torch.equal(loaded.score_head.linear.weight, rm.score_head.linear.weight)
