"""Bucket layout: many named tensors packed into one flat byte buffer, so a sync is a few large copies.

A bucket is a list of :class:`TensorSlot` (name, dtype, shape, byte offset, byte count) over one flat
``uint8`` buffer. Layout rule (:func:`plan_buckets` and :class:`BucketPacker` share it, so a receiver can
be told the plan once or per bucket and both sides agree): tensors are placed in stream order, each at the
next multiple of ``align`` bytes (256 by default: every dtype's alignment, and what CUDA's copy kernels
like); a bucket is closed when the next tensor would end past ``bucket_bytes``; a tensor larger than
``bucket_bytes`` goes alone into a bucket of its own size. So the buffer must hold
``max(bucket_nbytes(b) for b in plan)`` bytes, which is ``bucket_bytes`` unless one tensor is larger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

MiB = 2**20
DEFAULT_BUCKET_BYTES = 512 * MiB
DEFAULT_ALIGN = 256


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name ``getattr(torch, name)`` gives back)."""
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {name!r}")
    return dtype


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a bucket: ``buffer[offset : offset + nbytes]`` as ``dtype`` and ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, d: dict) -> TensorSlot:
        return cls(
            name=d["name"],
            dtype=d["dtype"],
            shape=tuple(int(s) for s in d["shape"]),
            offset=int(d["offset"]),
            nbytes=int(d["nbytes"]),
        )


def spec_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def bucket_nbytes(slots: list[TensorSlot]) -> int:
    """Bytes of buffer the bucket uses: the end of its last slot (0 for an empty bucket)."""
    return max((s.offset + s.nbytes for s in slots), default=0)


def _check_sizes(bucket_bytes: int, align: int) -> None:
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a positive power of two, got {align!r}")


class _Layout:
    """The one placement rule (see the module docstring), fed one tensor at a time."""

    def __init__(self, bucket_bytes: int, align: int):
        _check_sizes(bucket_bytes, align)
        self.bucket_bytes, self.align = bucket_bytes, align
        self.slots: list[TensorSlot] = []
        self.end = 0

    def place(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> tuple[list[TensorSlot] | None, TensorSlot]:
        """Place one tensor; returns (the bucket this closed before it, or None; the tensor's slot)."""
        nbytes = spec_nbytes(dtype, shape)
        start = -(-self.end // self.align) * self.align
        closed = None
        if self.slots and start + nbytes > self.bucket_bytes:
            closed, self.slots, start = self.slots, [], 0
        slot = TensorSlot(
            name=name,
            dtype=dtype_name(dtype),
            shape=tuple(int(s) for s in shape),
            offset=start,
            nbytes=nbytes,
        )
        self.slots.append(slot)
        self.end = start + nbytes
        return closed, slot

    def full(self) -> bool:
        """True once a tensor larger than ``bucket_bytes`` occupies the bucket (nothing else may join)."""
        return self.end > self.bucket_bytes

    def take(self) -> list[TensorSlot]:
        slots, self.slots, self.end = self.slots, [], 0
        return slots


def _spec(spec) -> tuple[str, torch.dtype, tuple[int, ...]]:
    try:
        name, dtype, shape = spec
    except (TypeError, ValueError):
        raise ValueError(f"a spec must be (name, dtype, shape), got {spec!r}") from None
    if not isinstance(name, str) or not name:
        raise ValueError(f"a spec's name must be a non-empty str, got {name!r}")
    shape = tuple(shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"shape of {name!r} must be non-negative ints, got {shape!r}")
    return name, to_dtype(dtype), shape


def plan_buckets(
    specs: Iterable, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, align: int = DEFAULT_ALIGN
) -> list[list[TensorSlot]]:
    """Buckets for ``specs`` (``(name, dtype, shape)`` in stream order); duplicate names are refused."""
    layout = _Layout(bucket_bytes, align)
    plan: list[list[TensorSlot]] = []
    seen: set[str] = set()
    for spec in specs:
        name, dtype, shape = _spec(spec)
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r} in specs")
        seen.add(name)
        closed, _ = layout.place(name, dtype, shape)
        if closed is not None:
            plan.append(closed)
        if layout.full():
            plan.append(layout.take())
    if layout.slots:
        plan.append(layout.take())
    return plan


def _view(buffer_u8: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    raw = buffer_u8[slot.offset : slot.offset + slot.nbytes]
    return raw.view(to_dtype(slot.dtype)).view(slot.shape)


def _check_buffer(buffer_u8: torch.Tensor) -> None:
    if not isinstance(buffer_u8, torch.Tensor) or buffer_u8.dtype != torch.uint8 or buffer_u8.dim() != 1:
        raise ValueError("buffer must be a 1-D torch.uint8 tensor")
    if not buffer_u8.is_contiguous():
        raise ValueError("buffer must be contiguous")


class BucketPacker:
    """Copies a stream of ``(name, tensor)`` into ``buffer_u8`` bucket by bucket.

    ``flush(slots, nbytes_used)`` is called each time a bucket is complete and once more from
    :meth:`finish`; when it returns the buffer is overwritten with the next bucket, so ``flush`` must not
    return before the receiver has consumed the bucket. The layout equals ``plan_buckets`` on the same
    stream. Tensors may live on another device than the buffer (``copy_`` moves them).
    """

    def __init__(
        self,
        buffer_u8: torch.Tensor,
        flush: Callable[[list[TensorSlot], int], None],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        align: int = DEFAULT_ALIGN,
    ):
        _check_buffer(buffer_u8)
        self.buffer, self.flush = buffer_u8, flush
        self._layout = _Layout(bucket_bytes, align)
        self.n_tensors = self.n_buckets = self.nbytes = 0

    def _emit(self, slots: list[TensorSlot]) -> None:
        self.n_buckets += 1
        self.flush(slots, bucket_nbytes(slots))

    def add(self, name: str, tensor: torch.Tensor) -> TensorSlot:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        closed, slot = self._layout.place(name, tensor.dtype, tuple(tensor.shape))
        if closed is not None:
            self._emit(closed)
        if slot.offset + slot.nbytes > self.buffer.numel():
            raise ValueError(
                f"tensor {name!r} ({slot.nbytes} bytes at offset {slot.offset}) does not fit the "
                f"{self.buffer.numel()}-byte buffer; size it to the largest bucket of plan_buckets()"
            )
        _view(self.buffer, slot).copy_(tensor.detach())
        self.n_tensors += 1
        self.nbytes += slot.nbytes
        if self._layout.full():
            self._emit(self._layout.take())
        return slot

    def finish(self) -> None:
        """Flush the last, partly filled bucket (if any)."""
        if self._layout.slots:
            self._emit(self._layout.take())


def unpack_bucket(buffer_u8: torch.Tensor, slots: list[TensorSlot]) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` per slot: zero-copy views into ``buffer_u8`` with the slot's dtype and shape.
    The views alias the buffer: copy them out before the next bucket overwrites it."""
    _check_buffer(buffer_u8)
    out = []
    for slot in slots:
        if not isinstance(slot, TensorSlot):
            raise ValueError(f"slots must be TensorSlot objects, got {type(slot).__name__}")
        if slot.offset < 0 or slot.offset + slot.nbytes > buffer_u8.numel():
            raise ValueError(
                f"slot {slot.name!r} [{slot.offset}, {slot.offset + slot.nbytes}) lies outside the "
                f"{buffer_u8.numel()}-byte buffer"
            )
        dtype = to_dtype(slot.dtype)
        if spec_nbytes(dtype, slot.shape) != slot.nbytes:
            raise ValueError(
                f"slot {slot.name!r}: {slot.nbytes} bytes do not fit {slot.dtype}{list(slot.shape)}"
            )
        out.append((slot.name, _view(buffer_u8, slot)))
    return out
