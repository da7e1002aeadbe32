"""Weight sync from the trainer to a generation engine, shared by every engine (never imports vLLM).

An engine implements one callback, ``send_bucket(bucket)``: deliver the bucket's tensors (views into the
shared buffer, described by ``bucket.slots``) to the engine and return once they are consumed. Then::

    syncer = WeightSyncer(send_bucket, open_buffer=engine_maps_buffer, device="cuda")
    stats = syncer.sync(model)          # after every optimizer step

:class:`WeightSyncer` plans the buckets from the model's weight specs, creates the shared buffer once
(``open_buffer(handle)`` lets the engine map it; then the ``/dev/shm`` name is unlinked), streams
:func:`iter_sync_weights` through a :class:`BucketPacker` and calls ``send_bucket`` per full bucket. With
``verify=True`` it checksums every tensor as packed and compares with the checksums ``send_bucket``
returns (the engine side's, of what it received). Without ``open_buffer`` the buffer is a plain local
tensor (an engine in the trainer's own process).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fastrl.engine.sync.buckets import (
    DEFAULT_ALIGN,
    DEFAULT_BUCKET_BYTES,
    BucketPacker,
    TensorSlot,
    bucket_nbytes,
    plan_buckets,
    unpack_bucket,
)
from fastrl.engine.sync.errors import ChecksumMismatchError, SyncError, SyncTimeoutError
from fastrl.engine.sync.sources import iter_sync_weights, sync_specs
from fastrl.engine.sync.transport import BufferHandle, SharedBuffer, receive
from fastrl.engine.sync.verify import Checksum, check_compatible, checksum, compare_checksums

__all__ = [
    "Bucket",
    "BucketPacker",
    "BufferHandle",
    "Checksum",
    "ChecksumMismatchError",
    "SharedBuffer",
    "SyncError",
    "SyncStats",
    "SyncTimeoutError",
    "TensorSlot",
    "WeightSyncer",
    "bucket_nbytes",
    "check_compatible",
    "checksum",
    "compare_checksums",
    "iter_sync_weights",
    "plan_buckets",
    "receive",
    "sync_specs",
    "unpack_bucket",
]


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One bucket handed to ``send_bucket``. ``buffer`` is the sender's view of the shared buffer (an
    in-process engine reads ``unpack_bucket(bucket.buffer, bucket.slots)``); with ``verify`` the callback
    must return ``{name: checksum(received tensor)}`` for the bucket's tensors."""

    index: int
    slots: list[TensorSlot]
    nbytes: int
    buffer: torch.Tensor
    verify: bool
    last: bool


@dataclasses.dataclass(frozen=True)
class SyncStats:
    n_tensors: int
    n_buckets: int
    bytes: int
    seconds: float


class WeightSyncer:
    """Sends a model's weights in buckets through one buffer shared once (see the module docstring).

    ``bucket_bytes``: bucket size (512 MiB); a tensor larger than it travels alone and the buffer grows
    to fit it. ``device``: where the buffer lives (``"cuda"``: CUDA IPC; ``"cpu"``: ``/dev/shm``).
    ``dtype``: cast floating weights to it on the way (the engine's dtype; None keeps the trainer's).
    ``sender``: False on FSDP ranks that only take part in the gathers (they need no buffer or callback).
    """

    def __init__(
        self,
        send_bucket: Callable[[Bucket], Mapping[str, Checksum] | None] | None,
        *,
        open_buffer: Callable[[BufferHandle], None] | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        align: int = DEFAULT_ALIGN,
        sender: bool = True,
        prefix: str | None = None,
    ):
        if sender and not callable(send_bucket):
            raise ValueError("send_bucket must be callable on a sending rank")
        if open_buffer is not None and not callable(open_buffer):
            raise ValueError("open_buffer must be callable or None")
        plan_buckets([], bucket_bytes=bucket_bytes, align=align)  # validates both sizes
        self.send_bucket, self.open_buffer = send_bucket, open_buffer
        self.bucket_bytes, self.align, self.sender, self.prefix = bucket_bytes, align, sender, prefix
        self.device, self.dtype = torch.device(device), dtype
        self.buffer: SharedBuffer | torch.Tensor | None = None

    @property
    def buffer_tensor(self) -> torch.Tensor | None:
        return self.buffer.tensor if isinstance(self.buffer, SharedBuffer) else self.buffer

    def _ensure_buffer(self, nbytes: int) -> torch.Tensor:
        current = self.buffer_tensor
        if current is not None and current.numel() >= nbytes:
            return current
        self.close()
        if self.open_buffer is None:
            self.buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        else:
            shared = SharedBuffer.create(nbytes, device=self.device, prefix=self.prefix)
            self.buffer = shared
            try:
                self.open_buffer(shared.handle)
            except BaseException:
                self.close()
                raise
            shared.unlink()  # the engine has it mapped: nothing can leak in /dev/shm from here on
        return self.buffer_tensor

    @torch.no_grad()
    def sync(self, model: nn.Module, *, verify: bool = False) -> SyncStats:
        """Send every weight of ``model`` (:func:`iter_sync_weights`); returns once the engine has all."""
        stream = iter_sync_weights(model, dtype=self.dtype)
        if not self.sender:
            t0 = time.perf_counter()
            n = sum(1 for _ in stream)  # the collectives only
            return SyncStats(n_tensors=n, n_buckets=0, bytes=0, seconds=time.perf_counter() - t0)
        return self.sync_stream(sync_specs(model, dtype=self.dtype), stream, verify=verify)

    @torch.no_grad()
    def sync_stream(self, specs, stream, *, verify: bool = False) -> SyncStats:
        """Send ``stream`` (``(name, tensor)`` pairs) whose ``(name, dtype, shape)`` are ``specs``, in
        order: :meth:`sync` without the model (benchmarks, or a source of its own). ``dtype`` is not
        applied here: the stream's tensors go as they are."""
        t0 = time.perf_counter()
        plan = plan_buckets(specs, bucket_bytes=self.bucket_bytes, align=self.align)
        buffer = self._ensure_buffer(max((bucket_nbytes(b) for b in plan), default=1))
        sent_buckets = 0

        def flush(slots: list[TensorSlot], used: int) -> None:
            nonlocal sent_buckets
            i = sent_buckets
            if i >= len(plan) or slots != plan[i]:
                raise SyncError(
                    f"bucket {i} differs from the plan: the weight stream does not match its specs "
                    "(a model changed during the sync?)"
                )
            if buffer.device.type == "cuda":
                torch.cuda.synchronize(buffer.device)  # the copies must land before another process reads
            sent = {n: checksum(t) for n, t in unpack_bucket(buffer, slots)} if verify else None
            bucket = Bucket(
                index=i, slots=slots, nbytes=used, buffer=buffer, verify=verify, last=i == len(plan) - 1
            )
            reply = self.send_bucket(bucket)
            if verify:
                if reply is None:
                    raise SyncError("verify=True but send_bucket returned no checksums")
                compare_checksums(sent, reply)
            sent_buckets += 1

        packer = BucketPacker(buffer, flush, bucket_bytes=self.bucket_bytes, align=self.align)
        for name, tensor in stream:
            packer.add(name, tensor)
        packer.finish()
        if sent_buckets != len(plan):
            raise SyncError(f"sent {sent_buckets} buckets, planned {len(plan)}")
        return SyncStats(
            n_tensors=packer.n_tensors,
            n_buckets=sent_buckets,
            bytes=packer.nbytes,
            seconds=time.perf_counter() - t0,
        )

    def close(self) -> None:
        """Release the buffer (the engine's mapping is the engine's to drop)."""
        if isinstance(self.buffer, SharedBuffer):
            self.buffer.close()
        self.buffer = None
