"""One flat buffer shared once between the trainer (sender) and an engine (receiver), and a request/ack pipe.

CPU: a file under ``/dev/shm`` mapped by both processes (``torch.from_file(path, shared=True)``): writes
on one side are visible on the other with no copy. The creator :meth:`SharedBuffer.unlink`\\ s the name as
soon as the receiver has mapped it (the mappings stay valid), so nothing is left in ``/dev/shm`` even if
either process is killed afterwards; until then a finalizer (run at exit or garbage collection) unlinks
it, and the name carries a ``fastrl-sync-<pid>-`` prefix so a leftover is attributable.

CUDA: the buffer is a device allocation exported as a CUDA-IPC handle (the arguments torch's own
``torch.multiprocessing`` reduction produces). The receiver maps it on the device with the same GPU UUID
(``torch.cuda.get_device_properties(i).uuid``), never by index: two processes with different
``CUDA_VISIBLE_DEVICES`` number the same GPU differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import time
import uuid
import weakref
from typing import Any

import torch

from fastrl.engine.sync.buckets import TensorSlot, unpack_bucket
from fastrl.engine.sync.errors import SyncError, SyncTimeoutError

DEFAULT_TIMEOUT_S = 30.0
SHM_DIR = "/dev/shm"
MIN_BYTES = 256  # mmap refuses a zero-length file


@dataclasses.dataclass(frozen=True)
class BufferHandle:
    """Everything a receiver needs to map the buffer; picklable. ``kind`` is ``"shm"`` or ``"cuda_ipc"``."""

    kind: str
    nbytes: int
    path: str | None = None
    ipc_args: tuple | None = None
    device_uuid: str | None = None


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_by_uuid(device_uuid: str) -> torch.device:
    """The local CUDA device whose UUID is ``device_uuid``; SyncError naming the visible ones otherwise."""
    if not torch.cuda.is_available():
        raise SyncError(f"the buffer lives on GPU {device_uuid}, but this process sees no CUDA device")
    seen = []
    for i in range(torch.cuda.device_count()):
        u = gpu_uuid(i)
        if u == device_uuid:
            return torch.device("cuda", i)
        seen.append(u)
    raise SyncError(
        f"GPU {device_uuid} is not visible to this process (visible: {', '.join(seen)}); "
        "check CUDA_VISIBLE_DEVICES"
    )


class SharedBuffer:
    """A flat ``uint8`` buffer (:attr:`tensor`) visible to two processes. Make one with :meth:`create`
    (sender) and map it on the other side with :meth:`open` (receiver)."""

    def __init__(self, tensor: torch.Tensor, handle: BufferHandle, *, owner: bool):
        self.tensor, self.handle, self.owner = tensor, handle, owner
        self._finalizer = None
        if owner and handle.kind == "shm":
            self._finalizer = weakref.finalize(self, _unlink_quiet, handle.path)

    @property
    def nbytes(self) -> int:
        return self.handle.nbytes

    @classmethod
    def create(
        cls,
        nbytes: int,
        *,
        device: str | torch.device = "cpu",
        prefix: str | None = None,
        shm_dir: str = SHM_DIR,
    ) -> SharedBuffer:
        """A new buffer of at least ``nbytes`` bytes (zero-filled on the CPU) on ``device``."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        nbytes = max(nbytes, MIN_BYTES)
        device = torch.device(device)
        if device.type == "cpu":
            if not os.path.isdir(shm_dir):
                raise ValueError(f"shm_dir {shm_dir!r} is not a directory")
            name = f"{prefix or 'fastrl-sync'}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            path = os.path.join(shm_dir, name)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # never reuse someone's file
            try:
                # Reserve the pages now: a tmpfs that runs out later (docker's default /dev/shm is 64 MB)
                # kills the writer with SIGBUS instead of raising.
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                os.close(fd)
                _unlink_quiet(path)
                st = os.statvfs(shm_dir)
                free_mib = st.f_bavail * st.f_frsize / 2**20
                raise SyncError(
                    f"cannot reserve {nbytes / 2**20:.0f} MiB in {shm_dir} ({free_mib:.0f} MiB free): "
                    f"{err.strerror}; enlarge it (docker run --shm-size) or lower bucket_bytes"
                ) from err
            os.close(fd)
            try:
                tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            except BaseException:
                _unlink_quiet(path)
                raise
            return cls(tensor, BufferHandle(kind="shm", nbytes=nbytes, path=path), owner=True)
        if device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            index = device.index if device.index is not None else torch.cuda.current_device()
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", index))
            _, args = reduce_tensor(tensor)
            handle = BufferHandle(
                kind="cuda_ipc", nbytes=nbytes, ipc_args=tuple(args), device_uuid=gpu_uuid(index)
            )
            return cls(tensor, handle, owner=True)
        raise ValueError(f"device must be cpu or cuda, got {device}")

    @classmethod
    def open(cls, handle: BufferHandle) -> SharedBuffer:
        """Map the buffer ``handle`` describes (in the receiver)."""
        if not isinstance(handle, BufferHandle):
            raise ValueError(f"handle must be a BufferHandle, got {type(handle).__name__}")
        if handle.kind == "shm":
            if not os.path.exists(handle.path):
                raise SyncError(
                    f"shared buffer {handle.path} does not exist (already unlinked by the sender, or "
                    "another host); a handle can be opened only before the sender unlinks it"
                )
            tensor = torch.from_file(handle.path, shared=True, size=handle.nbytes, dtype=torch.uint8)
            return cls(tensor, handle, owner=False)
        if handle.kind == "cuda_ipc":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            device = device_by_uuid(handle.device_uuid)
            args = list(handle.ipc_args)
            args[6] = device.index  # storage_device: the receiver's own index of that GPU
            return cls(rebuild_cuda_tensor(*args), handle, owner=False)
        raise ValueError(f"unknown buffer kind {handle.kind!r}")

    def unlink(self) -> None:
        """Remove the ``/dev/shm`` name (creator only; a no-op on CUDA). Both mappings stay valid."""
        if self.owner and self.handle.kind == "shm":
            _unlink_quiet(self.handle.path)
            if self._finalizer is not None:
                self._finalizer.detach()

    def close(self) -> None:
        """Drop this side's mapping (and, for the creator, the name)."""
        self.unlink()
        self.tensor = None
        if self.handle.kind == "cuda_ipc" and not self.owner:
            torch.cuda.ipc_collect()


def receive(
    buffer_u8: torch.Tensor, slots: list[TensorSlot], *, copy: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """The receiving side of one bucket: ``(name, tensor)`` per slot, views into the shared buffer
    (valid until the sender writes the next bucket, i.e. until this bucket is acknowledged) or, with
    ``copy``, clones the caller may keep."""
    pairs = unpack_bucket(buffer_u8, slots)
    return [(n, t.clone()) for n, t in pairs] if copy else pairs


class Channel:
    """Request/reply over a ``multiprocessing`` connection, with a deadline on every reply.

    Messages are pickled explicitly (``send_bytes``), so tensors in them are copied, never turned into
    shared-memory handles by torch's ``ForkingPickler`` reductions. Each travels as ``(seq, msg)`` and the
    peer answers ``(seq, reply)``: a late reply to a request that already timed out is dropped, never
    taken for the answer to the next one. A reply ``("error", kind, text)`` raises ``ValueError`` for
    ``kind == "ValueError"`` and :class:`SyncError` otherwise.
    """

    def __init__(self, conn, *, timeout_s: float = DEFAULT_TIMEOUT_S, peer=None, name: str = "receiver"):
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        self.conn, self.timeout_s, self.peer, self.name = conn, float(timeout_s), peer, name
        self.seq = 0  # of the last request sent; the peer's first message (start-up) carries 0

    def send(self, msg: Any) -> None:
        self.seq += 1
        try:
            self.conn.send_bytes(pickle.dumps((self.seq, msg), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as err:
            raise SyncError(f"{self.name} is gone ({self._peer_state()}): {err}") from err

    def recv(self, what: str, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                ready = self.conn.poll(max(0.0, min(left, 0.2)))
                if ready:
                    seq, reply = pickle.loads(self.conn.recv_bytes())
                    if seq == self.seq:
                        break
                    continue  # the late answer to a request that timed out
            except (EOFError, ConnectionResetError, BrokenPipeError, OSError) as err:
                raise SyncError(f"{self.name} died during {what} ({self._peer_state()})") from err
            if self.peer is not None and not self.peer.is_alive():
                raise SyncError(f"{self.name} died during {what} ({self._peer_state()})")
            if left <= 0:
                raise SyncTimeoutError(f"no reply from {self.name} within {timeout_s:g} s during {what}")
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            _, kind, text = reply
            if kind == "ValueError":
                raise ValueError(text)
            raise SyncError(f"{self.name} failed during {what}: {kind}: {text}")
        return reply

    def request(self, msg: Any, what: str, timeout_s: float | None = None) -> Any:
        self.send(msg)
        return self.recv(what, timeout_s)

    def _peer_state(self) -> str:
        if self.peer is None:
            return "connection closed"
        code = self.peer.exitcode
        return "still running" if code is None else f"exit code {code}"
