"""The layouts of `models.training.packing`: how a right-padded batch's sequences are laid out as a
few rows of real tokens (packed whole, as prefix trees, or as one row of trie nodes for the segments
attention), what each layout costs by a FLOP estimate, and the index tensors that build those rows
and gather the results back. Index arithmetic only: no model runs here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # row widths tried, in multiples of the longest row


@dataclass
class Layout:
    mode: str  # "packed", "tree" or "segments"
    width: int  # tokens per packed row
    bins: list[list[int]]  # sequence indices of each packed row (tree: in sorted order)
    cost: float


# ----------------------------------------------------------------------------- planning


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


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _trie_paths(rows: list[list[int]], members):
    """Walk rows[i] for i in `members` (lexicographic order) through their prefix tree, numbering new
    nodes 0, 1, ... as they appear: yields (i, nodes, keep), nodes[j] the node of token j of row i,
    of which the first `keep` (the common prefix with the previous row) are that row's."""
    used = 0
    prev_nodes: np.ndarray | None = None
    prev_row: list[int] | None = None
    for i in members:
        row = rows[i]
        n = len(row)
        keep = _lcp(prev_row, row) if prev_row is not None else 0
        nodes = np.empty(n, dtype=np.int64)
        if keep:
            nodes[:keep] = prev_nodes[:keep]
        nodes[keep:] = np.arange(used, used + n - keep)
        yield i, nodes, keep
        used += n - keep
        prev_nodes, prev_row = nodes, row


def tree_bins(rows: list[list[int]], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Sequences in lexicographic order, cut greedily into bins whose prefix trees have at most
    `capacity` nodes (a sequence longer than that gets a bin of its own). Returns the bins and the
    node count of each. In sorted order a sequence's longest common prefix with any earlier member
    of its bin is the one with its predecessor, so it adds len - lcp(predecessor) nodes."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    bins: list[list[int]] = []
    sizes: list[int] = []
    prev = None
    for i in order:
        add = len(rows[i]) - (_lcp(rows[prev], rows[i]) if prev is not None else 0)
        if not bins or sizes[-1] + add > capacity:
            bins.append([i])
            sizes.append(len(rows[i]))
        else:
            bins[-1].append(i)
            sizes[-1] += add
        prev = i
    return bins, sizes


def _unit_costs(config) -> tuple[float, float]:
    """FLOPs (per layer, forward) of one token through the linear layers, and of one attention pair."""
    d = getattr(config, "hidden_size", None) or 256
    inter = getattr(config, "intermediate_size", None) or 4 * d
    return 8 * d * d + 6 * d * inter, 4 * d  # q,k,v,o + gate,up,down (x2 mul-add); q·k and p·v


def _cost(n_rows: int, width: int, config) -> float:
    per_token, per_pair = _unit_costs(config)
    return n_rows * width * (per_token + width * per_pair)


def _segments_cost(nodes: int, n_seqs: int, longest: int, config) -> float:
    """Every trie node once through the linear layers; attention on the (n_seqs, longest) batch of
    paths, of which a causal kernel computes about half (the masked rows compute all of theirs)."""
    per_token, per_pair = _unit_costs(config)
    return nodes * per_token + 0.5 * n_seqs * longest * longest * per_pair


def trie_nodes(rows: list[list[int]]) -> int:
    """Nodes of the prefix tree of `rows` (distinct prefixes)."""
    order = sorted(rows)
    return sum(len(r) - (_lcp(order[k - 1], r) if k else 0) for k, r in enumerate(order))


def plan(lengths: list[int], config=None, rows: list[list[int]] | None = None,
         modes: tuple[str, ...] = ("packed", "tree")) -> Layout:
    """The cheapest layout (by the FLOP estimate) over the modes and widths tried."""
    longest = max(lengths)
    best: Layout | None = None
    if "segments" in modes and rows is not None:
        nodes = trie_nodes(rows)
        best = Layout("segments", nodes, [list(range(len(rows)))], _segments_cost(nodes, len(rows), longest, config))
    for mult in WIDTHS:
        cap = max(longest, int(longest * mult))
        if "packed" in modes:
            bins = first_fit_decreasing(lengths, cap)
            width = max(sum(lengths[i] for i in b) for b in bins)  # trim unused room
            cand = Layout("packed", width, bins, _cost(len(bins), width, config))
            if best is None or cand.cost < best.cost:
                best = cand
        if "tree" in modes and rows is not None:
            bins, sizes = tree_bins(rows, cap)
            width = max(sizes)
            cand = Layout("tree", width, bins, _cost(len(bins), width, config))
            if best is None or cand.cost < best.cost:
                best = cand
    return best


def padded_cost(n_rows: int, width: int, config=None) -> float:
    return _cost(n_rows, width, config)


def segment_pack(rows: list[list[int]], pad_id: int, t: int):
    """Segments layout: (ids (1, N), position ids (1, N), path gather (B, L), node scatter (N,),
    logits gather index (B*T,)) for the N-node prefix tree of `rows` in one row, L = longest row.

    gather[i, j] is the node of row i's j-th token (j >= len(row i): its last node, a value causal
    attention never lets a real token read); scatter[node] is one (i * L + j) whose path ends there:
    the copy of that node's attention output that goes back into the row."""
    n_seq, longest = len(rows), max(len(r) for r in rows)
    order = sorted(range(n_seq), key=lambda i: rows[i])
    total = sum(len(r) for r in rows)
    ids = np.full(total, pad_id, dtype=np.int64)
    pos = np.zeros(total, dtype=np.int64)
    scatter = np.zeros(total, dtype=np.int64)
    gather = np.zeros((n_seq, longest), dtype=np.int64)
    index = np.zeros(n_seq * t, dtype=np.int64)
    used = 0
    for i, nodes, keep in _trie_paths(rows, order):
        row, n = rows[i], len(rows[i])
        used = max(used, int(nodes[n - 1]) + 1)  # new nodes are numbered after every earlier one
        ids[nodes[keep:]] = row[keep:]
        pos[nodes[keep:]] = np.arange(keep, n)
        scatter[nodes[keep:]] = i * longest + np.arange(keep, n)
        gather[i, :n] = nodes
        gather[i, n:] = nodes[n - 1]
        index[i * t : i * t + n] = nodes
    as_t = torch.from_numpy
    return (as_t(ids[:used]).view(1, used), as_t(pos[:used]).view(1, used), as_t(gather), as_t(scatter[:used]),
            as_t(index))


# ----------------------------------------------------------------------------- building the rows


def pack(input_ids: torch.Tensor, lengths: list[int], pad_id: int, capacity: int, bins: list[list[int]]):
    """Packed layout: (ids (R, C), position ids (R, C), gather index (B*T,) into the flattened rows).
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


def tree_pack(rows: list[list[int]], width: int, bins: list[list[int]], pad_id: int, t: int):
    """Tree layout: (ids (R, C), position ids (R, C), ancestor mask (R, 1, C, C) bool, gather index
    (B*T,)). Within a bin, a sequence reuses the nodes of its predecessor's first lcp tokens and
    adds nodes for the rest; node j attends to node i iff i is j or an ancestor of j. Unused slots
    attend to themselves only (no all-masked row, no nan)."""
    n_rows = len(bins)
    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    pos = np.zeros((n_rows, width), dtype=np.int64)
    mask = np.zeros((n_rows, width, width), dtype=bool)
    index = np.zeros(len(rows) * t, dtype=np.int64)
    tri = np.tril(np.ones((width, width), dtype=bool))
    for r, members in enumerate(bins):
        used = 0
        for i, nodes, keep in _trie_paths(rows, members):
            row, n = rows[i], len(rows[i])
            used = max(used, int(nodes[n - 1]) + 1)
            ids[r, nodes[keep:]] = row[keep:]
            pos[r, nodes[keep:]] = np.arange(keep, n)
            mask[r][np.ix_(nodes[keep:], nodes)] = tri[keep:n, :n]
            index[i * t : i * t + n] = r * width + nodes
        free = np.arange(used, width)
        mask[r, free, free] = True
    return (torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask)[:, None], torch.from_numpy(index))
