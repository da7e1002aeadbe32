"""Activation checkpointing per decoder layer (torchtitan's layer-level selective AC).

A checkpointed layer keeps only its input during the forward pass and recomputes its activations in
the backward pass: activation memory of a wrapped layer drops from O(its intermediates) to O(its input),
for one extra forward of that layer. Gradients are unchanged (bit-identical up to the nondeterminism of
the recomputed kernels; exactly equal on the CPU).

Modes:
- ``"full"``: every decoder layer is wrapped.
- ``"selective"``: every ``every``-th layer is wrapped (layers ``every-1, 2*every-1, ...``), so about
  ``1/every`` of the layers recompute. torchtitan calls this layer-level selective AC; it trades memory
  for time in between "none" and "full". (Op-level selective AC, saving matmul outputs only, is not
  implemented here.)
- ``"none"``: nothing changes.

Wrapping uses torch's ``CheckpointWrapper`` with the non-reentrant ``torch.utils.checkpoint`` (works
with keyword arguments, with parameters that do not require grad, and under FSDP2). Apply AC before
FSDP, as torchtitan's ``parallelize`` does. The wrapper strips its own prefix from state-dict keys, so
checkpoints do not change. A KV cache cannot be checkpointed (the recompute would append the keys and
values a second time), so, as Hugging Face's own gradient checkpointing does, a wrapped layer drops its
cache arguments whenever gradients are on (in train or eval mode alike: a policy may train with
dropout off); without gradients (generation, reference log-probs) it runs untouched, cache included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, CheckpointWrapper

from fastrl.distributed._layers import decoder_layers

AC_MODES = ("none", "selective", "full")
# Names Hugging Face decoder layers have used for the KV cache argument.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _LayerCheckpointWrapper(CheckpointWrapper):
    """Non-reentrant checkpointing of one decoder layer, without its KV cache when gradients are on."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._checkpoint_wrapped_module(*args, **kwargs)
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return super().forward(*args, **kwargs)


def apply_ac(model: nn.Module, mode: str = "selective", every: int = 2) -> list[int]:
    """Wrap decoder layers of ``model`` in place with non-reentrant activation checkpointing.

    Returns the indices of the wrapped layers (already-wrapped layers count and are not wrapped twice).
    ``ValueError`` on an unknown ``mode`` or ``every < 1``.
    """
    if mode not in AC_MODES:
        raise ValueError(f"mode must be one of {AC_MODES}, got {mode!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if mode == "none":
        return []
    layers = decoder_layers(model)
    wrapped = []
    for i, layer in enumerate(layers):
        if mode == "selective" and (i + 1) % every != 0:
            continue
        if not isinstance(layer, CheckpointWrapper):
            layers[i] = _LayerCheckpointWrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        wrapped.append(i)
    return wrapped


def count_checkpointed(model: nn.Module) -> int:
    """How many modules of ``model`` are wrapped in activation checkpointing."""
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())
