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
    ``hidden`` / ``weight`` / ``bias`` (None where there is nothing to hand out). One backward per forward.
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        # Attributes rather than saved tensors: backward drops this last reference before handing the
        # gradients out, so that autograd adopts them as ``.grad`` as they are. A saved tensor would still
        # be referenced there and autograd would copy it: a second [V, H] weight gradient at the peak.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss has already handed out its gradients; run its forward again for another "
                "backward"
            )
        grads, ctx.grads = ctx.grads, None
        # The usual call is loss.backward() (grad_out == 1): the stored gradients as they are, no scaled copy.
        unit = bool(grad_out == 1)
        out = [
            None if g is None or not needed else g if unit else (g * grad_out).to(g.dtype)
            for g, needed in zip(grads, ctx.needs_input_grad[1:4])
        ]
        del grads
        return (None, *out, None, None, None)
