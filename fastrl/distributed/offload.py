"""Activation offloading: the tensors a decoder layer saves for backward go to CPU memory during the
forward and come back for the backward (TorchTune's ``OffloadActivations`` idea).

:class:`OffloadActivations` is a ``torch.autograd.graph.saved_tensors_hooks`` pair. ``pack`` (forward)
copies a saved tensor of at least ``min_bytes`` that lives on one of ``devices`` to host memory and
returns a handle; ``unpack`` (backward) copies it back to its device. On CUDA the host buffer is pinned
and the device-to-host copy runs on a side stream, ordered after the compute that produced the tensor
(``wait_stream``), so the forward does not wait for it; the GPU tensor is kept alive until its copy's
event has completed, and the backward's copy back waits on that event. Parameters (and tensors they
view, such as a transposed weight) are never copied: they stay resident anyway.

The same code runs on the CPU with ``devices=("cpu",)``, where the "offload" is a plain copy into a
separate buffer: that checks the hook logic (what is offloaded, that gradients do not change) without
a GPU. :func:`apply_activation_offloading` installs it around each decoder layer's forward (outside
activation checkpointing, so a recompute in backward is not offloaded again).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrl.distributed._layers import decoder_layers


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """``with OffloadActivations():`` offloads what the block saves for backward (see the module)."""

    def __init__(
        self, *, devices: tuple[str, ...] = ("cuda",), min_bytes: int = 1024, pin_memory: bool | None = None
    ):
        self.devices, self.min_bytes = devices, min_bytes
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.offloaded_bytes = 0  # what went to the host, for the record
        self._stream = None
        self._in_flight: list[tuple[torch.Tensor, object]] = []
        super().__init__(self._pack, self._unpack)

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if (
            t.device.type not in self.devices
            or nbytes < self.min_bytes
            or isinstance(t, nn.Parameter)
            or (t._base is not None and isinstance(t._base, nn.Parameter))
        ):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin and t.is_cuda)
        event = None
        if t.is_cuda:
            self._in_flight = [(x, e) for x, e in self._in_flight if not e.query()]
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._in_flight.append((t, event))  # the GPU copy must outlive its transfer
        else:
            host.copy_(t)
        self.offloaded_bytes += nbytes
        return (t.device, host, event)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
            return host.to(device, non_blocking=True)
        return host.clone() if device.type == "cpu" else host.to(device)


def apply_activation_offloading(model: nn.Module, **kwargs) -> list[OffloadActivations]:
    """Run each decoder layer's forward (the element of the layer list, i.e. outside its checkpoint
    wrapper) under an :class:`OffloadActivations`; returns the contexts (one per layer). Idempotent."""
    contexts = []
    for layer in decoder_layers(model):
        existing = getattr(layer, "_fastrl_offload", None)
        if existing is not None:
            contexts.append(existing)
            continue
        ctx = OffloadActivations(**kwargs)

        def enter(module, args, ctx=ctx):
            if torch.is_grad_enabled():
                ctx.__enter__()
                module._fastrl_offload_active = True

        def leave(module, args, output, ctx=ctx):
            if getattr(module, "_fastrl_offload_active", False):
                module._fastrl_offload_active = False
                ctx.__exit__(None, None, None)

        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave, always_call=True)
        layer._fastrl_offload = ctx
        contexts.append(ctx)
    return contexts
