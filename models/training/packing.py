"""Padding-free training forwards: the logits of a right-padded batch, computed without the padding
and, where rows share a prefix, computing that prefix once.

A micro-batch of sequences of different lengths, right-padded to the longest, spends a third of its
forward and backward on padding in the built-in task (lengths 30-70 tokens) and in GRPO batches. And
a GRPO batch repeats every prompt G times (G completions of one prompt), a DPO batch twice (chosen,
rejected). In a causal LM the hidden states of a token depend only on the tokens before it, so
rows that agree on their first k tokens have identical hidden states there: those k positions
need computing once.

`packed_logits` lays the batch out as a few rows of real tokens, in one of three ways, whichever a
FLOP estimate (linear layers ∝ rows × width, attention ∝ rows × width²) finds cheaper:

* **packed**: sequences placed whole, first-fit decreasing, each token at the position it has in
  its own sequence; the model builds the block-diagonal causal mask from the restarting position
  ids (transformers' `find_packed_sequence_indices`: sdpa, eager and flash attention paths).
* **tree**: rows sorted so that rows sharing a prefix are adjacent, and each packed row holds the
  prefix tree (trie) of its sequences: a shared prefix once, then every continuation; a token
  attends to exactly its ancestors in the tree (an explicit 4-D mask), at its depth as position.
  This is the causal mask of each sequence, written once for the shared part. (sdpa / eager only.)
* **segments**: the whole prefix tree in one row (every trie node once, nothing wasted on row
  tails), and attention computed *per sequence*: each layer gathers a sequence's path through the
  tree (its own tokens and the shared prefix nodes) into a (B, H, L, D) batch and runs causal SDPA
  on it, then puts each node's output back (`models/training/segment_attention.py`, a transformers attention function
  switched in for that forward only). The masked rows above attend over whole row widths with an
  explicit mask; here attention costs about half of B · L² (L the longest sequence) on an unmasked
  causal kernel (`benchmarks/profile_sft.py --compile --profile` measures it).
  (sdpa / eager models without sliding windows, soft-capping or attention sinks.)

The logits are then gathered back into the padded (B, T, V) layout (a shared position feeds every
row that contains it; its gradient is the sum of theirs, as it is for the copies in a padded batch),
so every loss downstream runs unchanged. Only float rounding differs from the padded forward.

Each layout is used only once checked: `verify` compares the padded logits of a model with both
layouts once, on a small synthetic batch with shared prefixes, and a layout that differs (e.g. a
model with absolute position embeddings, an attention implementation that ignores the mask) is not
used for that model again, with a warning. The recipes verify the plain model before the DeepSpeed
engine wraps it (a lazy first check inside a multi-process step would add forwards, hence ZeRO-3
collectives, on some ranks only).

`POSTTRAIN_PACKING=0` in the environment turns it off (every forward padded).

What this does not do: pack across micro-batches (the batch composition, hence the loss, is the
caller's), or pack left-padded batches (they fall back to the plain forward).
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from models.training.layouts import (Layout, first_fit_decreasing, pack, padded_cost, plan, right_padded_lengths,
                                     segment_pack, tree_bins, tree_pack, trie_nodes)
from models.training.segment_attention import SEGMENTS_ATTENTION, attention_implementation, register_segment_attention

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("POSTTRAIN_PACKING", "1") != "0"  # POSTTRAIN_PACKING=0: always the padded forward
CHECK_ATOL = 1e-4  # |packed - padded| on the logits of real tokens, fp32, relative to max(1, |logit|)
_verdicts: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, bool]]" = weakref.WeakKeyDictionary()
# What the forwards of this process computed: real (non-pad) tokens asked for, and token slots run
# through the model (packed/tree rows × width, or the padded batch). Read by the benchmarks.
STATS = {"forwards": 0, "real_tokens": 0, "computed_slots": 0}


# ----------------------------------------------------------------------------- forwards


def _unwrap(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the module


def _padded_logits(model, input_ids, attention_mask, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def _gather(logits: torch.Tensor, index: torch.Tensor, b: int, t: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, T, V) logits of the padded batch from a layout's logits; with `keep`, only the kept
    positions', (K, V) in row-major order."""
    if keep is not None:
        return logits.reshape(-1, logits.shape[-1]).index_select(0, index.view(b, t)[keep])
    return logits.reshape(-1, logits.shape[-1]).index_select(0, index).view(b, t, -1)


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward applies its LM head to the positions a 1-D `logits_to_keep` tensor
    names (transformers' causal LMs: `hidden_states[:, logits_to_keep]`)."""
    import inspect

    module = _unwrap(model)
    if module not in _keeps:
        try:
            _keeps[module] = "logits_to_keep" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            _keeps[module] = False
    return _keeps[module]


_keeps: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _attn_impl(module) -> str | None:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def _forward(model, input_ids, lengths, pad_id, layout: Layout, keep=None, **kw) -> torch.Tensor:
    b, t = input_ids.shape
    if layout.mode == "segments":
        rows = [r[:n] for r, n in zip(input_ids.tolist(), lengths)]
        ids, pos, gather, scatter, index = segment_pack(rows, pad_id, t)
        dev = input_ids.device
        index = index.to(dev)
        head_only = keep is not None and _takes_logits_to_keep(model)
        if head_only:
            # one row holds every node: the LM head runs on the kept positions' nodes alone, each node
            # once (rows sharing a prefix name it several times). Those copies are taken with
            # index_select, whose backward sums them in a fixed order; advanced indexing with repeated
            # indices would sum them with the CPU's parallel atomic adds, in an order that varies run to
            # run (and a resumed run would then not reproduce an uninterrupted one)
            nodes, copies = torch.unique(index.view(b, t)[keep], return_inverse=True)
            kw = dict(kw, logits_to_keep=nodes)
        with attention_implementation(_unwrap(model).config, SEGMENTS_ATTENTION):
            logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=False,
                           segment_gather=gather.to(dev), segment_scatter=scatter.to(dev), **kw).logits
        if head_only:
            return logits.reshape(-1, logits.shape[-1]).index_select(0, copies)
        return _gather(logits, index, b, t, keep)
    if layout.mode == "packed":
        ids, pos, index = pack(input_ids, lengths, pad_id, layout.width, layout.bins)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits  # (R, C, V)
        return _gather(logits, index, b, t, keep)
    rows = [r[:n] for r, n in zip(input_ids.tolist(), lengths)]
    ids, pos, mask, index = tree_pack(rows, layout.width, layout.bins, pad_id, t)
    dev = input_ids.device
    dtype = next(_unwrap(model).parameters()).dtype
    if _attn_impl(_unwrap(model)) == "eager":  # eager adds the mask: additive, 0 where attended
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev), use_cache=False,
                   **kw).logits
    return _gather(logits, index.to(dev), b, t, keep)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _recomputes_activations(module) -> bool:
    """Whether the forward of `module` runs under gradient checkpointing (transformers' layers carry
    a `gradient_checkpointing` flag and checkpoint only in training mode)."""
    return module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def packed_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0,
                  keep: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """`model(input_ids=..., attention_mask=...).logits` of a right-padded batch, (B, T, V), computed
    on the real tokens only, shared prefixes once (see the module docstring). Values at padded
    positions are arbitrary finite numbers, as in a padded forward: callers mask them. Falls back to
    exactly that padded call for left-padded or unpadded batches, when no layout saves >= 5%, and
    for models that failed (or, inside a multi-process run, never had) the check of `verify`.

    `keep`, a (B, T) bool mask, asks for the kept positions' logits only: `logits[keep]`, (K, V) in
    row-major order. In the segments layout the LM head then runs on those positions alone (the
    model's `logits_to_keep`), which spares a large vocabulary's head and its (B, T, V) copy on every
    prompt and padding position; the other layouts select after the head.

    Every call runs exactly one forward of `model`, whatever the layout, so ranks that decide
    differently still run the same collectives (ZeRO-3 gathers parameters module by module)."""
    key = _unwrap(model)
    STATS["forwards"] += 1
    STATS["real_tokens"] += int(attention_mask.sum())
    verdict = _verdicts.get(key) if ENABLED else {}
    if verdict is None:
        verdict = {} if _distributed() else verify(key)
    modes = tuple(m for m in ("packed", "tree", "segments") if verdict.get(m))
    if "segments" in modes and torch.is_grad_enabled() and _recomputes_activations(key):
        # gradient checkpointing re-runs each layer in the backward, after the segments attention
        # function has been switched back out: those layers would recompute other tensors
        modes = tuple(m for m in modes if m != "segments")
    lengths = right_padded_lengths(attention_mask) if modes else None
    if not modes or lengths is None or min(lengths) == 0:
        STATS["computed_slots"] += input_ids.numel()
        return _padded_kept(model, input_ids, attention_mask, keep, **kw)
    rows = [r[:n] for r, n in zip(input_ids.tolist(), lengths)] if {"tree", "segments"} & set(modes) else None
    config = getattr(key, "config", None)
    layout = plan(lengths, config, rows, modes)
    if layout.cost >= 0.95 * padded_cost(len(lengths), input_ids.shape[1], config):
        STATS["computed_slots"] += input_ids.numel()
        return _padded_kept(model, input_ids, attention_mask, keep, **kw)
    STATS["computed_slots"] += len(layout.bins) * layout.width
    return _forward(model, input_ids, lengths, pad_id, layout, keep=keep, **kw)


def predicting(shifted: torch.Tensor) -> torch.Tensor:
    """The `keep` mask (B, T) of the positions whose next token `shifted` (B, T-1, aligned with the
    shifted labels input_ids[:, 1:]) marks: the positions a next-token loss needs logits at."""
    keep = torch.zeros((shifted.shape[0], shifted.shape[1] + 1), dtype=torch.bool, device=shifted.device)
    keep[:, :-1] = shifted
    return keep


def _padded_kept(model, input_ids, attention_mask, keep, **kw) -> torch.Tensor:
    """The padded forward's logits; with `keep`, the kept positions' only, (K, V) in row-major order
    (the LM head on those positions alone where the model takes a boolean `logits_to_keep`)."""
    if keep is None:
        return _padded_logits(model, input_ids, attention_mask, **kw)
    if _takes_logits_to_keep(model):
        logits = _padded_logits(model, input_ids, attention_mask, logits_to_keep=keep, **kw)
        return logits.reshape(-1, logits.shape[-1])
    return _padded_logits(model, input_ids, attention_mask, **kw)[keep]


def verify(model) -> dict[str, bool]:
    """Check once per model that each layout gives its padded logits (a small synthetic batch with
    shared prefixes and several sequences per row, in eval mode, no grad); remember and return the
    verdicts {"packed": bool, "tree": bool}.

    The recipes call this on the plain model before the engine wraps it: inside a multi-process
    run a first check would add forwards (hence ZeRO-3 collectives) on some ranks only, so there
    an unverified model is never packed."""
    module = _unwrap(model)
    if module in _verdicts:
        return _verdicts[module]
    config = getattr(module, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    verdict = {"packed": False, "tree": False, "segments": False}
    if vocab < 8:
        _verdicts[module] = verdict
        return verdict
    g = torch.Generator().manual_seed(0)
    stem = torch.randint(1, vocab, (6,), generator=g).tolist()
    rows = [stem + torch.randint(1, vocab, (k,), generator=g).tolist() for k in (3, 5, 1)]  # share 6 tokens
    rows += [torch.randint(1, vocab, (k,), generator=g).tolist() for k in (8, 4, 2)]
    lengths = [len(r) for r in rows]
    width = max(lengths)
    device = next(module.parameters()).device
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    ids = ids.to(device)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long().to(device)
    layouts = {"packed": Layout("packed", width, first_fit_decreasing(lengths, width), 0.0)}
    if _attn_impl(module) in ("sdpa", "eager"):
        bins, sizes = tree_bins(rows, 2 * width)
        layouts["tree"] = Layout("tree", max(sizes), bins, 0.0)
        if register_segment_attention():
            layouts["segments"] = Layout("segments", trie_nodes(rows), [list(range(len(rows)))], 0.0)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = _padded_logits(module, ids, mask)
            real = mask.bool()
            scale = max(1.0, ref[real].abs().max().item())
            for mode, layout in layouts.items():
                try:
                    got = _forward(module, ids, lengths, 0, layout)
                    diff = (ref[real] - got[real]).abs().max().item()
                    verdict[mode] = diff <= CHECK_ATOL * scale
                    if not verdict[mode]:
                        logger.warning("%s forward differs from the padded one for %s (max |Δlogit| %.2e); not used",
                                       mode, type(module).__name__, diff)
                except Exception as e:  # noqa: BLE001 - a forward that takes no position_ids / 4-D mask
                    logger.warning("%s forward unavailable for %s (%s); not used", mode, type(module).__name__, e)
    finally:
        module.train(was_training)
    _verdicts[module] = verdict
    return verdict


__all__ = ["packed_logits", "predicting", "verify", "STATS", "plan", "pack", "tree_pack", "tree_bins", "first_fit_decreasing",
           "right_padded_lengths", "Layout", "segment_pack", "trie_nodes"]
