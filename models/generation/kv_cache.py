"""The sampler's KV cache: each layer writes into buffers preallocated for `max_len` positions (and
`max_rows` rows) and hands attention a view of the filled part, where transformers' DynamicCache
`torch.cat`s every layer's keys and values each step (on CPU that costs more than the matmuls of a
small model). Rows can be re-selected (`batch_select_indices`, repeats allowed) and copied to the end
(`append_rows`), copying only the filled positions. Imported lazily by models/generation/rollouts.py,
which falls back to the stock cache when transformers lays its cache out otherwise (ImportError)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, max_len: int, max_rows: int | None = None):
        super().__init__()
        self.max_len, self.max_rows = max_len, max_rows
        self.length = 0
        self.rows = 0

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h, _, dk = key_states.shape
        cap = max(b, self.max_rows or 0)
        self._k = key_states.new_zeros((cap, h, self.max_len, dk))
        self._v = value_states.new_zeros((cap, h, self.max_len, value_states.shape[-1]))
        self.rows = b

    def _views(self):
        self.keys, self.values = self._k[: self.rows, :, : self.length], self._v[: self.rows, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._k[: self.rows, :, self.length : end] = key_states
        self._v[: self.rows, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            # copy the filled positions only (fresh buffers keep the room for the tokens to come)
            self._k, self._v = self._select(self._k, indices), self._select(self._v, indices)
            self.rows = indices.numel()
            self._views()

    def _select(self, buf, indices):
        m = indices.numel()
        out = buf.new_empty((max(m, buf.shape[0]), *buf.shape[1:]))
        torch.index_select(buf[: self.rows, :, : self.length], 0, indices, out=out[:m, :, : self.length])
        return out

    def append_rows(self, indices):
        if self.is_initialized:
            m = indices.numel()
            if self.rows + m > self._k.shape[0]:
                self.batch_select_indices(torch.cat([torch.arange(self.rows, device=indices.device), indices]))
                return
            for buf in (self._k, self._v):
                buf[self.rows : self.rows + m, :, : self.length] = buf[indices, :, : self.length]
            self.rows += m
            self._views()


def preallocated_cache(num_layers: int, max_len: int, max_rows: int | None = None) -> Cache:
    return Cache(layers=[PreallocatedLayer(max_len, max_rows) for _ in range(num_layers)])
