"""A plain receiver process (tests and benchmarks): an "engine" that only holds a parameter set.

:class:`ReceiverProcess` spawns a ``torch.multiprocessing`` child that allocates its own tensors for
``param_specs`` (``(name, dtype, shape)``), maps the shared buffer once (``open_buffer``) and, per bucket
message, checks the names, dtypes and shapes against its set (unknown names refused, listed), copies the
tensors out of the buffer into its parameters and acknowledges (with checksums under ``verify``). Every
wait on the child has a deadline (``timeout_s``): a child that dies or hangs mid-sync raises
:class:`~fastrl.engine.sync.errors.SyncError` / ``SyncTimeoutError`` in the sender, never a hang.

It also takes single tensors pickled into the message (``send_tensor``), the per-parameter path of
naive RPC-based syncs, so the benchmark can compare both through the same process.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
import weakref

import torch
import torch.multiprocessing as mp

from fastrl.engine.sync.buckets import to_dtype
from fastrl.engine.sync.transport import DEFAULT_TIMEOUT_S, Channel, SharedBuffer, receive
from fastrl.engine.sync.verify import check_compatible, checksum

_START_TIMEOUT_S = 120.0  # a spawned child imports torch; a busy machine is slow


def _reply(conn, seq: int, msg) -> None:
    conn.send_bytes(pickle.dumps((seq, msg), protocol=pickle.HIGHEST_PROTOCOL))


def _main(conn, specs, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    params = {n: torch.zeros(tuple(s), dtype=to_dtype(d), device=device) for n, d, s in specs}
    buffer = None
    _reply(conn, 0, ("ready", os.getpid()))
    while True:
        try:
            seq, msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the sender is gone
        kind = msg[0]
        try:
            if kind == "open":
                buffer = SharedBuffer.open(msg[1])
                reply = ("ok",)
            elif kind == "bucket":
                _, slots, verify = msg
                if buffer is None:
                    raise RuntimeError("bucket before open: no shared buffer mapped")
                check_compatible(slots, params)
                sums = {}
                for name, view in receive(buffer.tensor, slots):
                    params[name].copy_(view)
                    if verify:
                        sums[name] = checksum(params[name])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()  # consumed: the sender may overwrite the buffer
                reply = ("ok", sums if verify else None)
            elif kind == "tensor":
                _, name, tensor = msg
                check_compatible([_slot_of(name, tensor)], params)
                params[name].copy_(tensor)
                reply = ("ok",)
            elif kind == "fetch":
                reply = ("ok", {n: t.cpu() for n, t in params.items()})
            elif kind == "checksums":
                reply = ("ok", {n: checksum(t) for n, t in params.items()})
            elif kind == "stall":  # tests: a stuck engine, silent for msg[1] seconds
                time.sleep(msg[1])
                continue
            elif kind == "close":
                if buffer is not None:
                    buffer.close()
                _reply(conn, seq, ("ok",))
                return
            else:
                raise RuntimeError(f"unknown message {kind!r}")
        except Exception as err:
            reply = ("error", type(err).__name__, str(err) or traceback.format_exc(limit=3))
        _reply(conn, seq, reply)


def _kill(proc) -> None:
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5.0)


def _slot_of(name: str, tensor: torch.Tensor):
    from fastrl.engine.sync.buckets import TensorSlot, dtype_name

    return TensorSlot(
        name=name,
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        offset=0,
        nbytes=tensor.numel() * tensor.element_size(),
    )


class ReceiverProcess:
    """A spawned receiver holding ``param_specs``; use as a context manager or call :meth:`close`."""

    def __init__(
        self, param_specs, *, timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "cpu", threads: int = 1
    ):
        from fastrl.engine.sync.buckets import dtype_name

        self.specs = [(n, dtype_name(to_dtype(d)), tuple(int(x) for x in s)) for n, d, s in param_specs]
        self.timeout_s, self.device, self.threads = timeout_s, str(device), threads
        self.proc = None
        self.channel: Channel | None = None

    def start(self) -> ReceiverProcess:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        args = (child, self.specs, self.device, self.threads)
        self.proc = ctx.Process(target=_main, args=args, daemon=True)
        self.proc.start()
        child.close()
        # dropped without close() (a failed benchmark method, a test error): kill the child with it
        self._reaper = weakref.finalize(self, _kill, self.proc)
        self.channel = Channel(parent, timeout_s=self.timeout_s, peer=self.proc, name="receiver process")
        reply = self.channel.recv("start-up", timeout_s=max(self.timeout_s, _START_TIMEOUT_S))
        assert reply[0] == "ready", reply
        return self

    def __enter__(self) -> ReceiverProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def open_buffer(self, handle) -> None:
        self.channel.request(("open", handle), "opening the shared buffer")

    def send_bucket(self, bucket):
        """A ``WeightSyncer`` ``send_bucket``: returns once the child copied the bucket out."""
        reply = self.channel.request(("bucket", bucket.slots, bucket.verify), f"bucket {bucket.index}")
        return reply[1]

    def send_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """The per-parameter path: ``tensor`` pickled into the message (a copy), one round trip."""
        self.channel.request(("tensor", name, tensor.detach()), f"tensor {name}")

    def params(self) -> dict[str, torch.Tensor]:
        return self.channel.request(("fetch",), "fetching the parameters")[1]

    def checksums(self) -> dict:
        return self.channel.request(("checksums",), "checksumming the parameters")[1]

    def stall(self, seconds: float = 3600.0) -> None:
        """Tests: the child stops answering for ``seconds`` (then serves what queued up, late)."""
        self.channel.send(("stall", seconds))

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not within the timeout. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.is_alive():
                self.channel.request(("close",), "close", timeout_s=min(self.timeout_s, 5.0))
                proc.join(timeout=5.0)
        except Exception:
            pass  # dead, stuck or confused: killed below
        _kill(proc)
        self._reaper.detach()
        self.channel.conn.close()
