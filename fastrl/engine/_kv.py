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


# ---------------------------------------------------------------------------------------------------------
# Shared-prefix decode attention: a group's rows read their common prompt's keys/values once.

SHARED_PREFIX_ATTENTION = "fastrl_shared_prefix"


class SharedPrefixCache(DynamicCache):
    """Decode cache of n rows whose prompts are U shared prefixes: per layer the prefix keys/values
    ``[U, kv_heads, P, head_dim]`` (left-padded, ``prefix_mask [U, P]``) once, and each row's own
    generated positions in a ``GrowingLayer``. ``row_prompt [n]`` names each row's prefix.

    Attention (``shared_prefix_attention``) scores a row's query against its prefix through a slot layout,
    ``slots [U, Gmax]`` (the rows of each prefix, padded with any row): one batched matrix product per
    prefix reads its keys once for all its rows, instead of once per row."""

    def __init__(self, prefix_kv, prefix_mask: torch.Tensor, row_prompt: list[int], capacity: int):
        super().__init__()
        self.layers = [GrowingLayer(capacity) for _ in prefix_kv]
        self.prefix_kv, self.prefix_mask = list(prefix_kv), prefix_mask.bool()
        self._set_rows(row_prompt)

    def _set_rows(self, row_prompt: list[int]) -> None:
        """The slot layout of rows ``row_prompt``; prefixes no row uses any more are dropped."""
        used = sorted(set(row_prompt))
        if len(used) < self.prefix_mask.shape[0]:
            keep = torch.tensor(used, device=self.prefix_mask.device)
            self.prefix_kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.prefix_kv]
            self.prefix_mask = self.prefix_mask.index_select(0, keep)
            renumber = {u: i for i, u in enumerate(used)}
            row_prompt = [renumber[u] for u in row_prompt]
        members: list[list[int]] = [[] for _ in used]
        for r, u in enumerate(row_prompt):
            members[u].append(r)
        g = max(len(m) for m in members)
        device = self.prefix_mask.device
        self.row_prompt = row_prompt
        self.row_mask = self.prefix_mask.index_select(0, torch.tensor(row_prompt, device=device))  # [n, P]
        self.slots = torch.tensor([m + [m[0]] * (g - len(m)) for m in members], device=device)  # [U, G]
        self.row_slot = torch.tensor(
            [u * g + members[u].index(r) for r, u in enumerate(row_prompt)], device=device
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_mask.shape[1] + self.layers[layer_idx].get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._set_rows([self.row_prompt[i] for i in indices.tolist()])


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``softmax([q Kp^T, q Ks^T] * scaling) [Vp; Vs]`` for one query per row, where ``Kp, Vp`` are the
    row's shared prefix (``kwargs["fastrl_shared"]``, a ``SharedPrefixCache``) and ``Ks, Vs`` its own
    positions (``key``, ``value`` [n, kv_heads, t, d]). Padding of the prefix is masked; the generated
    positions are all visible to a one-token query. Returns ``([n, 1, heads, d], None)``."""
    shared: SharedPrefixCache = kwargs["fastrl_shared"]
    Kp, Vp = shared.prefix_kv[module.layer_idx]
    n, H, q_len, d = query.shape
    assert q_len == 1, "shared-prefix attention serves one-token decode steps"
    U, kvh, P, _ = Kp.shape
    rep, G, t = H // kvh, shared.slots.shape[1], key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    slots, row_slot = shared.slots.flatten(), shared.row_slot

    def to_slots(x_nHk):  # [n, H, k] -> [U, kvh, G * rep, k]
        k = x_nHk.shape[-1]
        return (
            x_nHk.index_select(0, slots).view(U, G, kvh, rep, k).transpose(1, 2).reshape(U, kvh, G * rep, k)
        )

    def to_rows(x_UKk):  # [U, kvh, G * rep, k] -> [n, H, k]
        k = x_UKk.shape[-1]
        return x_UKk.view(U, kvh, G, rep, k).transpose(1, 2).reshape(U * G, H, k).index_select(0, row_slot)

    q_nHd = query[:, :, 0]
    s_prefix = to_rows(torch.matmul(to_slots(q_nHd), Kp.transpose(-1, -2)))  # [n, H, P]
    s_prefix = s_prefix.masked_fill(~shared.row_mask[:, None, :], float("-inf"))
    s_own = torch.matmul(q_nHd.view(n, kvh, rep, d), key.transpose(-1, -2)).view(n, H, t)
    work = torch.promote_types(query.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    probs = torch.cat([s_prefix, s_own], -1).mul_(scaling).to(work).softmax(-1).to(query.dtype)
    out = to_rows(torch.matmul(to_slots(probs[..., :P].contiguous()), Vp))
    out = out + torch.matmul(probs[..., P:].reshape(n, kvh, rep, t), value).view(n, H, d)
    return out[:, None], None


def register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
