"""A preallocated KV cache for eager decoding: no copy of the whole cache per step.

transformers' ``DynamicLayer`` appends with ``torch.cat`` on every step, which copies the layer's entire
cache (O(length) per step, O(length^2) per completion; 28% of the CPU decode time at the bench shape).
``StaticLayer`` avoids that but attends over its full preallocated length every step. ``GrowingLayer``
takes the middle road: buffers of ``capacity`` positions allocated once, each update written in place,
and attention given views of the filled prefix only (``keys[:, :, :length]``).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in ``[B, heads, capacity, head_dim]`` buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, heads = key_states.shape[:2]
        self.device = key_states.device
        self._k = key_states.new_empty(B, heads, self.capacity, key_states.shape[-1])
        self._v = value_states.new_empty(B, heads, self.capacity, value_states.shape[-1])
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # an invariant of the engine, which sizes the cache for prompt + new tokens
            raise AssertionError(f"GrowingLayer full: {end} > capacity {self.capacity}")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) rows ``indices``; only the filled prefix is copied."""
        if not self.is_initialized:
            return
        n = self.length
        k = self._k.new_empty((len(indices),) + self._k.shape[1:])
        v = self._v.new_empty((len(indices),) + self._v.shape[1:])
        k[:, :, :n] = self._k[:, :, :n].index_select(0, indices)
        v[:, :, :n] = self._v[:, :, :n].index_select(0, indices)
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, :n], v[:, :, :n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
        self.batch_select_indices(rows)

    def reset(self) -> None:
        self.length = 0
        self.is_initialized = False
        self.keys = self.values = self._k = self._v = None


def growing_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are ``GrowingLayer``s of ``capacity``
    positions (sliding-window layers, whose own logic trims them, stay as transformers builds them)."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache
