"""What the fused linear losses (``FusedLinearGRPOLoss``, ``FusedLinearDPOLoss``) share: their option checks
and the autograd node that hands out gradients computed during the forward."""

from __future__ import annotations

import torch

from fastrl.ops._common import IMPLS, check_temperature


def check_fused_options(temperature: float, impl: str, chunk_size: int | None) -> None:
    """ValueErrors for the options a fused module passes on to the log-prob ops."""
    check_temperature(temperature)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be None or an int > 0, got {chunk_size!r}")


class AttachGrads(torch.autograd.Function):
    """``AttachGrads.apply(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)`` returns ``loss``
    unchanged; its backward hands out the gradients computed ahead of time (Liger-style: no second pass
    over the vocabulary), scaled by the incoming gradient (a scalar). ``grad_*`` have the shapes of
    ``hidden`` / ``weight`` / ``bias`` (None where there is nothing to hand out)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        # The usual call is loss.backward() (grad_out == 1): hand the stored gradients over as they are
        # rather than allocating a scaled copy of a [V, H] weight gradient.
        unit = bool(grad_out == 1)
        grads = []
        for g, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:4]):
            if g is None or not needed:
                grads.append(None)
            else:
                grads.append(g if unit else (g * grad_out).to(g.dtype))
        return (None, *grads, None, None, None)
