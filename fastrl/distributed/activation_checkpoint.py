"""Activation checkpointing per decoder layer (torchtitan's layer-level selective AC).

A checkpointed layer keeps only its input during the forward pass and recomputes its activations in
the backward pass: activation memory of a wrapped layer drops from O(its intermediates) to O(its input),
for one extra forward of that layer. Gradients are unchanged (bit-identical up to the nondeterminism of
the recomputed kernels; exactly equal on the CPU).

Modes (``train.activation_checkpointing``):
- ``"full"``: every decoder layer is wrapped.
- ``"selective:<k>"`` (``"selective"`` = ``"selective:2"``): every ``k``-th layer is wrapped (layers
  ``k-1, 2k-1, ...``), so about ``1/k`` of the layers recompute. torchtitan calls this layer-level
  selective AC; it trades memory for time in between "none" and "full".
- ``"op"``: op-level selective AC (torchtitan's ``op`` mode) on every layer: the outputs of the
  compute-heavy ops (matrix products ``mm`` / ``addmm`` / ``bmm``, attention) are saved, except those of
  every second matrix product, and everything cheap (norms, activations, element-wise ops) is recomputed
  in backward. Built on ``torch.utils.checkpoint.create_selective_checkpoint_contexts``; the recompute
  costs little compute (no attention, half the matmuls) for most of the memory "full" saves.
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

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, CheckpointWrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fastrl.distributed._layers import decoder_layers

AC_MODES = ("none", "full", "selective", "selective:<k>", "op")


def parse_ac_mode(mode: str) -> tuple[str, int]:
    """``(kind, every)`` of a mode string: ``("none"|"full"|"op", 1)`` or ``("selective", k)``;
    ``ValueError`` naming the accepted forms otherwise."""
    if mode in ("none", "full", "op"):
        return mode, 1
    if mode == "selective":
        return "selective", 2
    if isinstance(mode, str) and mode.startswith("selective:"):
        k = mode.split(":", 1)[1]
        if k.isdigit() and int(k) >= 1:
            return "selective", int(k)
    raise ValueError(f"activation checkpointing mode must be one of {AC_MODES} (k >= 1), got {mode!r}")


def _aten(*names: str) -> set:
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


# Matrix products (what "every second" counts) and attention kernels: the ops worth saving.
_MATMULS = _aten("mm", "addmm", "bmm", "baddbmm")
_SAVE = _MATMULS | _aten(
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def op_policy_context():
    """A fresh pair of selective-checkpoint contexts for one checkpointed call (the ``"op"`` mode).

    The forward and its recompute count the matrix products separately, so the same ones are skipped in
    both: the 1st, 3rd, ... are saved, the 2nd, 4th, ... recomputed."""
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in _MATMULS:
            key = "recompute" if ctx.is_recompute else "forward"
            counts[key] += 1
            if counts[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


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


def apply_ac(model: nn.Module, mode: str = "selective", every: int | None = None) -> list[int]:
    """Wrap decoder layers of ``model`` in place with non-reentrant activation checkpointing.

    ``mode``: see the module docstring; ``every`` overrides the ``k`` of ``"selective"``. Returns the
    indices of the wrapped layers (already-wrapped layers count and are not wrapped twice).
    ``ValueError`` on an unknown ``mode`` or ``every < 1``.
    """
    kind, k = parse_ac_mode(mode)
    if every is not None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        k = every
    if kind == "none":
        return []
    layers = decoder_layers(model)
    extra = {"context_fn": op_policy_context} if kind == "op" else {}
    wrapped = []
    for i, layer in enumerate(layers):
        if kind == "selective" and (i + 1) % k != 0:
            continue
        if not isinstance(layer, CheckpointWrapper):
            layers[i] = _LayerCheckpointWrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra)
        wrapped.append(i)
    return wrapped


def count_checkpointed(model: nn.Module) -> int:
    """How many modules of ``model`` are wrapped in activation checkpointing."""
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())
