"""Padding-free training forwards: the logits of a right-padded batch, computed without the padding.

A micro-batch of sequences of different lengths, right-padded to the longest, spends a third of its
forward and backward on padding in the built-in task (lengths 30-70 tokens) and in GRPO batches
(prompt + completion). `packed_logits` instead packs the real tokens of the batch into a few rows
(first-fit decreasing), gives every token the position it has in its own sequence, and lets the
model build a block-diagonal causal mask from those restarting position ids (transformers'
`find_packed_sequence_indices`, used by the sdpa / eager / flash attention paths when no attention
mask is given), so each token attends to exactly the tokens it attends to in the padded batch.
The logits are then gathered back into the padded (B, T, V) layout, so every loss downstream runs
unchanged; only float rounding differs (a row's matmuls are blocked differently).

Rows are `capacity` tokens long; the capacity is chosen per batch among a few multiples of the
longest sequence by a FLOP estimate (linear layers scale with rows × capacity, attention with
rows × capacity²). Packing is used only where it has been checked: `verify` compares the packed and the padded logits
of a model once, on a small synthetic batch, and the padded forward is used for good (with a
warning) if they differ, e.g. a model with absolute position embeddings or an attention
implementation that ignores the packing. The recipes verify the plain model before the DeepSpeed
engine wraps it (a lazy first check inside a multi-process step would add forwards, hence ZeRO-3
collectives, on some ranks only).

`POSTTRAIN_PACKING=0` in the environment turns it off (every forward padded, as before).

What this does not do: pack across micro-batches (the batch composition, hence the loss, is the
caller's), or pack left-padded batches (they fall back to the plain forward).
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import torch

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("POSTTRAIN_PACKING", "1") != "0"  # POSTTRAIN_PACKING=0: always the padded forward
CHECK_ATOL = 1e-4  # |packed - padded| on the logits of real tokens, fp32
_verdicts: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Row lengths if every row of the (B, T) mask is ones then zeros, else None."""
    lengths = attention_mask.sum(-1)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), expected):
        return None
    return lengths.tolist()


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of sequence indices) of total length <= capacity, longest sequences placed first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _unit_costs(config) -> tuple[float, float]:
    """FLOPs (per layer, forward) of one token through the linear layers, and of one attention pair."""
    d = getattr(config, "hidden_size", None) or 256
    inter = getattr(config, "intermediate_size", None) or 4 * d
    return 8 * d * d + 6 * d * inter, 4 * d  # q,k,v,o + gate,up,down (x2 mul-add); q·k and p·v


def plan(lengths: list[int], config=None) -> tuple[int, list[list[int]], float]:
    """(capacity, bins, estimated cost) minimising estimated FLOPs over capacities 1×..4× the longest."""
    per_token, per_pair = _unit_costs(config)
    longest = max(lengths)
    best = None
    for mult in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0):
        bins = first_fit_decreasing(lengths, max(longest, int(longest * mult)))
        cap = max(sum(lengths[i] for i in b) for b in bins)  # trim unused room
        cost = len(bins) * cap * (per_token + cap * per_pair)
        if best is None or cost < best[2]:
            best = (cap, bins, cost)
    return best


def padded_cost(n_rows: int, width: int, config=None) -> float:
    per_token, per_pair = _unit_costs(config)
    return n_rows * width * (per_token + width * per_pair)


def pack(input_ids: torch.Tensor, lengths: list[int], pad_id: int, capacity: int, bins: list[list[int]]):
    """(packed ids (R, C), position ids (R, C), gather index (B*T,) into the flattened (R*C) rows).
    The index of a padded position points at flat position 0 (its value is arbitrary, as a pad's)."""
    b, t = input_ids.shape
    n_flat = len(bins) * capacity
    src = np.full(n_flat, -1, dtype=np.int64)  # packed flat position -> padded flat position
    pos = np.zeros(n_flat, dtype=np.int64)
    index = np.zeros(b * t, dtype=np.int64)  # padded flat position -> packed flat position
    ar = np.arange(max(capacity, t), dtype=np.int64)
    for r, members in enumerate(bins):
        at = r * capacity
        for i in members:
            n = lengths[i]
            src[at : at + n] = i * t + ar[:n]
            pos[at : at + n] = ar[:n]
            index[i * t : i * t + n] = at + ar[:n]
            at += n
        end = (r + 1) * capacity
        pos[at:end] = ar[: end - at]  # the free tail is a segment of its own, attended by nothing real
    real = src >= 0
    ids = torch.full((n_flat,), pad_id, dtype=input_ids.dtype)
    ids[torch.from_numpy(real)] = input_ids.reshape(-1).cpu()[torch.from_numpy(src[real])]
    dev = input_ids.device
    return (ids.view(len(bins), capacity).to(dev), torch.from_numpy(pos).view(len(bins), capacity).to(dev),
            torch.from_numpy(index).to(dev))


def _unwrap(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the module


def _padded_logits(model, input_ids, attention_mask, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def _packed(model, input_ids, lengths, pad_id, layout, **kw) -> torch.Tensor:
    capacity, bins, _ = layout
    ids, pos, index = pack(input_ids, lengths, pad_id, capacity, bins)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits  # (R, C, V)
    b, t = input_ids.shape
    return logits.reshape(-1, logits.shape[-1]).index_select(0, index).view(b, t, -1)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def packed_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0,
                  **kw) -> torch.Tensor:
    """`model(input_ids=..., attention_mask=...).logits` of a right-padded batch, (B, T, V), computed
    on the real tokens only (see the module docstring). Values at padded positions are arbitrary
    finite numbers, as in a padded forward: callers mask them. Falls back to exactly that padded
    call for left-padded or unpadded batches, when packing would save < 5%, and for models that
    failed (or, inside a multi-process run, never had) the check of `verify`.

    Every call runs exactly one forward of `model`, packed or not, so ranks that decide differently
    still run the same collectives (ZeRO-3 gathers parameters module by module)."""
    key = _unwrap(model)
    verdict = _verdicts.get(key) if ENABLED else False
    if verdict is None and not _distributed():
        verdict = verify(key)
    if not verdict:
        return _padded_logits(model, input_ids, attention_mask, **kw)
    lengths = right_padded_lengths(attention_mask)
    if lengths is None or min(lengths) == 0 or min(lengths) == input_ids.shape[1]:
        return _padded_logits(model, input_ids, attention_mask, **kw)
    config = getattr(key, "config", None)
    layout = plan(lengths, config)
    if layout[2] >= 0.95 * padded_cost(len(lengths), input_ids.shape[1], config):
        return _padded_logits(model, input_ids, attention_mask, **kw)
    return _packed(model, input_ids, lengths, pad_id, layout, **kw)


def verify(model) -> bool:
    """Check once per model that the packed forward gives its padded logits (on a small synthetic batch
    with several sequences in one packed row, in eval mode), remember the verdict, and return it.

    The recipes call this on the plain model before the engine wraps it: inside a multi-process
    run a first check would add forwards (hence ZeRO-3 collectives) on some ranks only, so there
    an unverified model is never packed."""
    module = _unwrap(model)
    if module in _verdicts:
        return _verdicts[module]
    config = getattr(module, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        _verdicts[module] = False
        return False
    lengths = [8, 5, 3, 2]  # packs as [8], [5, 3], [2] at capacity 8: a row holds two sequences
    g = torch.Generator().manual_seed(0)
    device = next(module.parameters()).device
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g).to(device)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long().to(device)
    ids = ids.masked_fill(mask == 0, 0)
    layout = (max(lengths), first_fit_decreasing(lengths, max(lengths)), 0.0)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = _padded_logits(module, ids, mask)
            got = _packed(module, ids, lengths, 0, layout)
    except Exception as e:  # noqa: BLE001 - a model whose forward takes no position_ids / use_cache
        logger.warning("padding-free forward unavailable for %s (%s); using padded batches", type(module).__name__, e)
        _verdicts[module] = False
        return False
    finally:
        module.train(was_training)
    real = mask.bool()
    diff = (ref[real] - got[real]).abs().max().item()
    ok = diff <= CHECK_ATOL * max(1.0, ref[real].abs().max().item())
    if not ok:
        logger.warning("padding-free forward differs from the padded one for %s (max |Δlogit| %.2e); "
                       "using padded batches", type(module).__name__, diff)
    _verdicts[module] = ok
    return ok


__all__ = ["packed_logits", "verify", "pack", "plan", "first_fit_decreasing", "right_padded_lengths"]
