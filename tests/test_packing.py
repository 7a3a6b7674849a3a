"""Padding-free forwards (models/training/packing.py): the packed, prefix-tree and segments layouts give the
padded batch's logits and gradients (eager and under torch.compile), and anything unverified falls
back to the padded forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import models.training.packing as P


@pytest.fixture(scope="module")
def model():
    from models.modeling.tiny_model import build_tiny_model
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _batch(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return ids, mask


# a GRPO-like batch: two prompts, three completions each (sharing some of their first tokens too)
ROWS = [
    [1, 10, 11, 12, 20, 21, 22, 23], [1, 10, 11, 12, 20, 21, 30], [1, 10, 11, 12, 40, 41, 42, 43, 44, 45],
    [1, 15, 16, 50, 51], [1, 15, 16, 50, 52, 53, 54], [1, 15, 16, 60],
]


def test_tree_bins_share_prefixes_and_respect_capacity():
    bins, sizes = P.tree_bins(ROWS, capacity=100)
    assert len(bins) == 1 and sorted(bins[0]) == list(range(len(ROWS)))
    # trie nodes: 1; 10 11 12; 20 21 22 23; 30; 40..45; 15 16; 50 51; 52 53 54; 60
    assert sizes == [1 + 3 + 4 + 1 + 6 + 2 + 2 + 3 + 1]
    bins, sizes = P.tree_bins(ROWS, capacity=12)
    assert all(s <= 12 or len(b) == 1 for b, s in zip(bins, sizes))
    assert sorted(i for b in bins for i in b) == list(range(len(ROWS)))


def test_tree_mask_is_each_sequences_causal_mask():
    ids, pos, mask, index = P.tree_pack(ROWS, 23, [list(range(len(ROWS)))], pad_id=0, t=10)
    flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
    for b, row in enumerate(ROWS):
        nodes = index[b * 10 : b * 10 + len(row)]
        assert flat_ids[nodes].tolist() == row and flat_pos[nodes].tolist() == list(range(len(row)))
        for t, node in enumerate(nodes.tolist()):
            attended = set(torch.nonzero(mask[0, 0, node]).flatten().tolist())
            assert attended == set(nodes[: t + 1].tolist())  # exactly its own prefix
    assert mask[0, 0].any(-1).all()  # unused slots attend to themselves: no all-masked row


def test_segment_pack_lays_each_sequence_out_as_its_path_through_the_tree():
    ids, pos, gather, scatter, index = P.segment_pack(ROWS, pad_id=0, t=10)
    n = 1 + 3 + 4 + 1 + 6 + 2 + 2 + 3 + 1  # the trie nodes, each once (as in tree_bins above)
    assert ids.shape == pos.shape == (1, n) and scatter.shape == (n,) and P.trie_nodes(ROWS) == n
    longest = max(map(len, ROWS))
    assert gather.shape == (len(ROWS), longest)
    for b, row in enumerate(ROWS):
        path = gather[b, : len(row)]
        assert ids[0, path].tolist() == row and pos[0, path].tolist() == list(range(len(row)))
        assert (gather[b, len(row):] == path[-1]).all()  # padding repeats the last node
        assert index[b * 10 : b * 10 + len(row)].tolist() == path.tolist()  # logits of row b come from its path
    for node in range(n):  # every node keeps the output of a path position that *is* that node
        b, j = divmod(int(scatter[node]), longest)
        assert j < len(ROWS[b]) and int(gather[b, j]) == node


@pytest.mark.parametrize("mode", ["packed", "tree", "segments"])
def test_layouts_give_the_padded_logits_and_gradients(model, mode):
    assert P.verify(model) == {"packed": True, "tree": True, "segments": True}
    ids, mask = _batch(ROWS)
    lengths = mask.sum(-1).tolist()
    layout = P.plan(lengths, model.config, [r[:] for r in ROWS], (mode,))
    assert layout.mode == mode
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask).logits
    ref[mask.bool()].logsumexp(-1).sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = P._forward(model, ids, lengths, 0, layout)
    got[mask.bool()].logsumexp(-1).sum().backward()
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("mode", ["packed", "tree", "segments", "padded"])
def test_kept_positions_give_those_logits_and_gradients_only(model, mode, monkeypatch):
    # SFT asks for the positions that predict a label: here every row's tail past its 3rd token
    ids, mask = _batch(ROWS)
    keep = mask.bool().clone()
    keep[:, :3] = False
    lengths = mask.sum(-1).tolist()
    if mode == "padded":
        monkeypatch.setattr(P, "ENABLED", False)  # the padded fallback: a boolean logits_to_keep
    else:
        layout = P.plan(lengths, model.config, [r[:] for r in ROWS], (mode,))
        monkeypatch.setattr(P, "plan", lambda *a, **k: layout)
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    try:
        model.zero_grad()
        ref = model(input_ids=ids, attention_mask=mask).logits[keep]
        ref.logsumexp(-1).sum().backward()
        g_ref = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        head_rows.clear()
        before = P.STATS["computed_slots"]
        got = P.packed_logits(model, ids, mask, keep=keep)
        assert (P.STATS["computed_slots"] - before < ids.numel()) == (mode != "padded")  # the layout was used
        got.logsumexp(-1).sum().backward()
    finally:
        hook.remove()
    assert got.shape == ref.shape == (int(keep.sum()), model.config.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    if mode == "padded":  # the LM head ran on the kept positions alone
        assert head_rows == [int(keep.sum())]
    if mode == "segments":  # ... each shared node once (rows 0-2 and 3-5 share their first tokens)
        assert len(head_rows) == 1 and 0 < head_rows[0] < int(keep.sum())


def test_kept_positions_of_shared_prefixes_take_each_node_once_and_sum_its_copies_by_index_select(model, monkeypatch):
    # rows sharing a prefix name its nodes several times: the head runs on each node once and the
    # copies come from index_select (a fixed-order backward), so two runs give bit-identical gradients
    rows = [ROWS[i % len(ROWS)] for i in range(12)]
    ids, mask = _batch(rows)
    keep = mask.bool()
    layout = P.plan(mask.sum(-1).tolist(), model.config, rows, ("segments",))
    monkeypatch.setattr(P, "plan", lambda *a, **k: layout)
    head_rows, grads = [], []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    try:
        for _ in range(2):
            model.zero_grad()
            P.packed_logits(model, ids, mask, keep=keep).logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        hook.remove()
    assert head_rows == [P.trie_nodes(rows)] * 2 and P.trie_nodes(rows) < int(keep.sum())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_logits_picks_a_cheaper_layout_and_matches(model):
    rows = [ROWS[i % len(ROWS)] for i in range(24)]  # repeated prompts: the tree pays
    ids, mask = _batch(rows)
    lengths = mask.sum(-1).tolist()
    assert P.plan(lengths, model.config, rows).mode == "tree"
    # 24 paths over 23 trie nodes: one tree row of 23 slots is cheaper than attending per path
    assert P.plan(lengths, model.config, rows, ("packed", "tree", "segments")).mode == "tree"
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = P.packed_logits(model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_distinct_sequences_of_mixed_lengths_take_the_segments_layout(model):
    g = torch.Generator().manual_seed(1)
    lengths = (30, 5, 12, 28, 7, 19, 30, 9, 22, 14, 25, 6)
    rows = [[3 + i] + torch.randint(3, 60, (n - 1,), generator=g).tolist() for i, n in enumerate(lengths)]
    ids, mask = _batch(rows)
    lengths = mask.sum(-1).tolist()
    layout = P.plan(lengths, model.config, rows, ("packed", "tree", "segments"))
    assert layout.mode == "segments" and layout.width == P.trie_nodes(rows) == sum(lengths)
    before = P.STATS["computed_slots"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = P.packed_logits(model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    assert P.STATS["computed_slots"] - before == sum(lengths)  # no slot spent on padding or row tails
    assert model.config._attn_implementation == "sdpa"  # the segments forward switched it back


def test_segments_under_torch_compile_give_the_padded_logits_and_gradients():
    """Compiled, segment_attention takes its matmul-softmax branch (faster than the CPU flash kernel
    at these sizes) and the row gathers stay opaque ATen ops: the numbers must not change. A
    grouped-query model (2 query heads per key/value head) also covers the head repeat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     attn_implementation="sdpa"))
    assert P.verify(m)["segments"]
    ids, mask = _batch(ROWS)
    lengths = mask.sum(-1).tolist()
    layout = P.plan(lengths, m.config, [r[:] for r in ROWS], ("segments",))
    m.zero_grad()
    ref = m(input_ids=ids, attention_mask=mask).logits
    ref[mask.bool()].logsumexp(-1).sum().backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, dynamic=True)
    got = P._forward(compiled, ids, lengths, 0, layout)
    got[mask.bool()].logsumexp(-1).sum().backward()
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ref, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


class NoPositions(torch.nn.Module):
    """A model that ignores position_ids and masks (as absolute-position or odd models may): the
    check must catch it and keep the padded forward."""

    def __init__(self, vocab=32):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, hidden_size=8, intermediate_size=16, _attn_implementation="sdpa")
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.emb(input_ids).cumsum(1)  # depends on every earlier token in the row, packed or not
        return SimpleNamespace(logits=self.out(h))


def test_a_model_that_fails_the_check_keeps_the_padded_forward():
    m = NoPositions()
    assert P.verify(m) == {"packed": False, "tree": False, "segments": False}
    ids, mask = _batch([[1, 2, 3, 4], [1, 2], [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(P.packed_logits(m, ids, mask), m(input_ids=ids, attention_mask=mask).logits)


def test_left_padded_and_unpadded_batches_use_the_plain_forward(model):
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert P.right_padded_lengths(left) is None
    with torch.no_grad():
        torch.testing.assert_close(P.packed_logits(model, ids, left), model(input_ids=ids, attention_mask=left).logits)
        full = torch.ones_like(ids)
        torch.testing.assert_close(P.packed_logits(model, ids, full), model(input_ids=ids, attention_mask=full).logits)
