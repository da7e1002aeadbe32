"""Shared input checks and ``impl`` dispatch for the ops. Every user mistake is a ``ValueError`` that names
the argument and what was expected."""

from __future__ import annotations

import torch

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA tensors, the chunked PyTorch path elsewhere. Returns "triton" or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        from fastrl.triton_kernels._runtime import triton_available

        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return impl


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_labels(
    name: str, labels: torch.Tensor, batch_shape: torch.Size, vocab: int, ignore_index: int
) -> None:
    """Integer labels of shape ``batch_shape`` with values in [0, vocab) or equal to ``ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != batch_shape:
        raise ValueError(f"{name} must have shape {tuple(batch_shape)}, got {tuple(labels.shape)}")
    if labels.numel():
        valid = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
        if not bool(valid.all()):
            bad = labels[~valid][0].item()
            raise ValueError(
                f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}"
            )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


# ---------------------------------------------------------------------------------------------------------
# Eager autograd without the custom-op dispatcher
# ---------------------------------------------------------------------------------------------------------
# An eager call of a ``torch.library.custom_op`` imports ``torch._dynamo`` (its backend kernel is wrapped in
# ``torch._compile._disable_dynamo``), and ``torch._dynamo`` imports Triton: about 1 s and 150 MiB the first
# time, paid by every CPU user of the torch path. The ops keep their custom-op registration for
# torch.compile / export, and run eager calls through a plain ``autograd.Function`` built from the same
# forward, setup_context and backward, so both paths share one implementation.


def use_eager_path() -> bool:
    """True outside torch.compile / export tracing and any dispatch mode (FakeTensor, make_fx, ...), where
    only the custom op is traceable."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` subclass named ``name`` with ``forward(*inputs)``, ``setup_context(ctx,
    inputs, output)`` and ``backward(ctx, *grads)``, the signatures ``torch.library.register_autograd``
    takes."""
    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )
