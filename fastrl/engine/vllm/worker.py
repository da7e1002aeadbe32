"""fastrl's vLLM worker extension: the engine side of a weight sync.

vLLM mixes ``FastrlWorkerExtension`` into each of its workers (``worker_extension_cls``), so the methods
below run inside the worker that holds the model, called by name through ``collective_rpc`` - in the
trainer's process (in-process engine), in vLLM's engine process (``separate_process``) or in a
``fastrl vllm-serve`` server (``/collective_rpc``). One update is::

    fastrl_begin_update()                        layer-wise reload armed (vLLM's own reload machinery)
    fastrl_load_bucket(slots, verify)  xN        tensors read from the shared buffer, loaded
      (or fastrl_load_tensors(pairs, verify) in-process: the tensors themselves, no buffer)
    fastrl_finish_update()                       layers not fully loaded are restored, caches reset

Loading goes through the model's own ``load_weights`` (checkpoint names, stacked q/k/v and gate/up
handled by vLLM) inside ``initialize_layerwise_reload`` / ``finalize_layerwise_reload``, the pair
vLLM's ``reload_weights`` uses; it is split so that each bucket is one call. That is what works on the
CPU backend, whose linear weights are repacked for oneDNN (a plain ``load_weights`` there fails).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrl.engine.vllm.common import pack, unpack


class FastrlWorkerExtension:
    """Methods callable by name through vLLM's ``collective_rpc``; ``self`` is the vLLM worker."""

    def _fastrl_model(self):
        return self.model_runner.get_model()

    def fastrl_known_weights(self) -> str:
        """``pack({checkpoint name: (dtype the engine runs in, shape)})`` of the checkpoint this engine
        started from: the names a sync may send."""
        from safetensors import safe_open

        config = self.vllm_config.model_config
        dtype = config.dtype
        known = {}
        files = sorted(Path(config.model).glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"no *.safetensors in {config.model}: cannot tell which weights a sync sends")
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    floating = sl.get_dtype() in ("F32", "F16", "BF16", "F64")
                    known[name] = (dtype if floating else _st_dtype(sl.get_dtype()), shape)
        return pack(known)

    def fastrl_open_buffer(self, request: str) -> int:
        """Map a trainer's shared buffer (a /dev/shm file on the CPU, CUDA IPC on GPUs) once; ``request``
        is a packed ``(key, BufferHandle)``. Buffers are kept per key: one server may serve several
        clients over its life, each with its own buffer."""
        from fastrl.engine.sync import SharedBuffer

        key, handle = unpack(request)
        buffers = self.__dict__.setdefault("_fastrl_buffers", {})
        old = buffers.pop(key, None)
        if old is not None:
            old.close()
        buffers[key] = SharedBuffer.open(handle)
        return int(buffers[key].tensor.numel())

    def fastrl_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self._fastrl_model())
        self._fastrl_loaded = set()

    def fastrl_load_bucket(self, request: str) -> str:
        """Load the tensors described by ``request`` (packed ``(key, slots, verify)``) from buffer
        ``key``; returns the packed ``{name: checksum}`` of what arrived with ``verify``, else None."""
        from fastrl.engine.sync import receive

        key, slots, verify = unpack(request)
        buffer = self.__dict__.get("_fastrl_buffers", {}).get(key)
        if buffer is None:
            raise RuntimeError(f"fastrl_load_bucket: no buffer {key!r} (fastrl_open_buffer first)")
        # Copies: a layer's weights wait in vLLM's layer-wise loader until the whole layer has arrived,
        # and the next bucket overwrites the buffer.
        return pack(self._fastrl_load(receive(buffer.tensor, slots, copy=True), verify))

    def fastrl_init_group(self, request: str) -> None:
        """Join the trainer's two-rank group (packed ``(host, port, backend)``) as rank 1: the path for
        a server on another host, where no memory can be shared."""
        from datetime import timedelta

        import torch.distributed as dist

        from fastrl.engine.vllm.common import make_group

        host, port, backend = unpack(request)
        timeout = timedelta(seconds=300)
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)
        self._fastrl_group = make_group(store, rank=1, world_size=2, backend=backend, timeout=timeout)
        self._fastrl_store = store

    def fastrl_recv_bucket(self, request: str) -> str:
        """Receive one bucket (packed ``(slots, verify, nbytes)``) broadcast by the trainer, then load it."""
        from fastrl.engine.sync import receive
        from fastrl.engine.vllm.common import broadcast

        slots, verify, nbytes = unpack(request)
        buf = getattr(self, "_fastrl_recv", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._fastrl_recv = torch.empty(nbytes, dtype=torch.uint8, device=self.model_runner.device)
        broadcast(self._fastrl_group, buf[:nbytes])
        return pack(self._fastrl_load(receive(buf, slots, copy=True), verify))

    def fastrl_load_tensors(self, pairs, verify: bool = False):
        """In-process variant: ``pairs`` are (name, tensor) views of the trainer's bucket; copied here."""
        return self._fastrl_load([(n, t.clone()) for n, t in pairs], verify)

    def _fastrl_load(self, pairs, verify: bool):
        from fastrl.engine.sync import checksum

        device = self.model_runner.device
        sums = {n: checksum(t) for n, t in pairs} if verify else None
        pairs = [(n, t.to(device, non_blocking=True)) for n, t in pairs]
        loaded = self._fastrl_model().load_weights(iter(pairs))
        if loaded is not None:
            self._fastrl_loaded.update(loaded)
        return sums

    def fastrl_finish_update(self) -> None:
        """Process what arrived into the kernels' layout; layers that got nothing keep their weights."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(self._fastrl_model(), self.vllm_config.model_config)
        runner = self.model_runner
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(runner, reset, None)
            if fn is not None:
                fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def fastrl_close_buffer(self, key: str) -> None:
        buffer = self.__dict__.get("_fastrl_buffers", {}).pop(key, None)
        if buffer is not None:
            buffer.close()


def _st_dtype(code: str) -> torch.dtype:
    table = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
    table.update({"BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
    return table.get(code, torch.uint8)
