"""Exact per-tensor checksums, computed the same way on both sides of a sync, and name/dtype/shape checks.

:func:`checksum` reads the tensor's raw bytes as little 16-bit words ``w_i`` (``i = 0 .. n-1``; an odd
last byte is one more word) and returns two integer sums,

    s1 = sum_i w_i                 s2 = sum_i w_i * ((i mod 65521) + 1)

plus dtype, shape and byte count. Every term is a non-negative integer below 2^32 and there are fewer than
2^31 words in any tensor under 4 GiB, so both sums are exact in int64 on any device: the result does not
depend on summation order, thread count or CPU vs CUDA, and two tensors differ in checksum whenever they
differ in dtype, shape, the multiset of words (s1) or, barring a collision of the weighted sum, their
order (s2). It is a transport check (did these exact bits arrive?), not a cryptographic hash. Cost: one
int64 copy of a chunk at a time (16 M words, 128 MiB) and two reductions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from fastrl.engine.sync.buckets import TensorSlot, dtype_name
from fastrl.engine.sync.errors import ChecksumMismatchError, name_list

_MOD = 65521  # largest prime below 2^16 (Adler-32's modulus): keeps every weighted term below 2^32
_CHUNK = 1 << 24  # words per reduction


class Checksum(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    s1: int
    s2: int


def checksum(tensor: torch.Tensor) -> Checksum:
    """The checksum (module docstring) of ``tensor``'s bytes, on the tensor's own device."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"checksum needs a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach()
    if hasattr(t, "full_tensor"):  # a DTensor: checksum what the receiver sees, the full tensor
        t = t.full_tensor()
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    n_even = raw.numel() & ~1
    if raw.data_ptr() % 2:  # an odd byte offset cannot be viewed as 16-bit words
        raw = raw.clone()
    words = raw[:n_even].view(torch.int16)
    s1 = s2 = 0
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64) & 0xFFFF
        pos = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64) % _MOD + 1
        s1 += int(w.sum())
        s2 += int((w * pos).sum())
    if raw.numel() % 2:
        w, i = int(raw[-1]), words.numel()
        s1 += w
        s2 += w * (i % _MOD + 1)
    return Checksum(dtype_name(t.dtype), tuple(t.shape), raw.numel(), s1, s2)


def compare_checksums(sent: Mapping[str, Checksum], received: Mapping[str, Checksum]) -> None:
    """Raise :class:`ChecksumMismatchError` listing every name whose checksums differ, that was sent but
    not received, or received but not sent. Returns None when all match."""
    differ = [n for n in sent if n in received and tuple(sent[n]) != tuple(received[n])]
    missing = [n for n in sent if n not in received]
    extra = [n for n in received if n not in sent]
    if differ or missing or extra:
        parts = []
        if differ:
            parts.append(f"{len(differ)} differ: {name_list(differ)}")
        if missing:
            parts.append(f"{len(missing)} sent but not reported by the receiver: {name_list(missing)}")
        if extra:
            parts.append(f"{len(extra)} reported but never sent: {name_list(extra)}")
        raise ChecksumMismatchError("weight sync verification failed: " + "; ".join(parts))


def _expected(value) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, torch.Tensor):
        return dtype_name(value.dtype), tuple(value.shape)
    dtype, shape = value
    return (dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)), tuple(shape)


def check_compatible(slots: Iterable[TensorSlot], known: Mapping) -> None:
    """``ValueError`` listing the slot names ``known`` lacks and the dtype or shape mismatches, before
    anything is copied. ``known`` maps name -> tensor or name -> ``(dtype, shape)``."""
    unknown, wrong = [], []
    for slot in slots:
        if slot.name not in known:
            unknown.append(slot.name)
            continue
        dtype, shape = _expected(known[slot.name])
        if (slot.dtype, tuple(slot.shape)) != (dtype, shape):
            wrong.append(f"{slot.name}: sent {slot.dtype}{list(slot.shape)}, expected {dtype}{list(shape)}")
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} weight name(s) the receiver does not know: {name_list(unknown)}")
        if wrong:
            parts.append(f"{len(wrong)} dtype/shape mismatch(es): {name_list(wrong, 10)}")
        raise ValueError("; ".join(parts))
