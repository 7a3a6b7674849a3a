"""How a stage's examples become batches, for every recipe.

- The order: a seeded permutation per epoch, a pure function of the position in the stream, so that
  a resumed run sees exactly the data an uninterrupted run would (`EpochSampler`).
- The tensors: rows right-padded to the longest (`pad_right`), and prompt + completion rows whose
  completion mask and per-token values line up with the *shifted* labels `input_ids[:, 1:]`
  (`collate_completions`): the logit at position t predicts token t+1, so completion token j of a
  P-token prompt sits at shifted index P-1+j. SFT, DPO, the reward model, GRPO and PPO all collate here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


class EpochSampler:
    """Item p of the endless stream is perm(p // n)[p % n], perm(e) a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm = lru_cache(maxsize=4)(self._make)

    def _make(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


def pad_right(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) long rows right-padded with `pad_value` to the longest row, and the (B, T) 0/1 mask of
    the real positions."""
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return out, mask


def collate_completions(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int,
    per_token: dict[str, list[list[float]]] | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T) of prompt + completion, right-padded; completion_mask (B, T-1)
    and each `per_token` float field (one value per completion token) placed on the shifted labels."""
    input_ids, attn = pad_right([p + c for p, c in zip(prompts, completions)], pad_id)
    b, n = input_ids.shape
    out = {"input_ids": input_ids, "attention_mask": attn,
           "completion_mask": torch.zeros((b, n - 1), dtype=torch.bool)}
    fields = per_token or {}
    out.update({f: torch.zeros((b, n - 1), dtype=torch.float32) for f in fields})
    for i, (p, c) in enumerate(zip(prompts, completions)):
        start, end = len(p) - 1, len(p) - 1 + len(c)
        out["completion_mask"][i, start:end] = True
        for f, values in fields.items():
            out[f][i, start:end] = torch.tensor(values[i], dtype=torch.float32)
    return out

