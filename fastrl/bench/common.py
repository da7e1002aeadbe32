"""Pieces the suites share: random inputs, the measured matrix-product baselines, a method from a loss
closure."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from fastrl.bench.harness import BenchContext, Method, Skip

LossFn = Callable[[dict[str, Any]], torch.Tensor]


def randn(ctx: BenchContext, *shape: int, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, device=ctx.device, dtype=torch.float32).mul_(scale).to(ctx.dtype)
    return t.requires_grad_(requires_grad)


def lm_head(ctx: BenchContext, V: int, H: int, *, requires_grad: bool = True) -> torch.Tensor:
    """A [V, H] weight whose logits have unit scale for unit-scale hidden states."""
    return randn(ctx, V, H, scale=H**-0.5, requires_grad=requires_grad)


def backward_step(loss_fn: Callable[[], torch.Tensor]):
    """The step every loss method times: ``loss = loss_fn(); loss.backward()``, returning the loss."""

    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step


def backward_method(name: str, loss_fn: LossFn, *, kind: str = "method", note: str = "") -> Method:
    """A method whose step is ``loss = loss_fn(inputs); loss.backward()``."""
    setup = lambda inputs: backward_step(lambda: loss_fn(inputs))
    return Method(name=name, setup=setup, kind=kind, note=note)


def compiled_method(ctx: BenchContext, name: str, loss_fn: LossFn, *, first_shape: bool = True) -> Method:
    """``torch.compile`` of an eager loss; off on the CPU unless ``--compile``, and measured at a suite's
    first shape only (compiling costs tens of seconds per shape on a GPU)."""

    def setup(inputs: dict[str, Any]):
        if not ctx.compile:
            raise Skip("torch.compile off (pass --compile; on by default with --gpu)")
        if not first_shape:
            raise Skip("torch.compile is measured at the suite's first shape only")
        compiled = torch.compile(loss_fn)
        return backward_step(lambda: compiled(inputs))

    return Method(name=name, setup=setup)


def blas_name(ctx: BenchContext) -> str:
    """Who runs ``torch.mm`` here: cuBLAS on a GPU, the CPU BLAS (MKL / OpenBLAS) elsewhere."""
    return "cuBLAS" if ctx.device.type == "cuda" else "CPU BLAS"


def products_baseline(
    ctx: BenchContext,
    count: str,
    parts: str,
    hidden_key: str,
    weight_key: str,
    *,
    ref_keys: tuple[str, str] | None = None,
) -> Method:
    """The matrix products alone, as a measured baseline: logits = h W^T, grad_h = G W, grad_W = G^T h.

    Named ``"<count> cuBLAS products (<parts>)"`` on a GPU and ``"... CPU BLAS products ..."`` elsewhere.
    ``G`` stands for the logits' gradient; it is allocated in setup so it counts as an input. With
    ``ref_keys`` (DPO) a fourth product, the reference model's logits, is added.
    """
    name = f"{count} {blas_name(ctx)} products ({parts})"

    def setup(inputs: dict[str, Any]):
        h = inputs[hidden_key].detach().reshape(-1, inputs[hidden_key].shape[-1])
        w = inputs[weight_key].detach()
        g = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
        ref = None
        if ref_keys is not None:
            ref = (inputs[ref_keys[0]].reshape(-1, h.shape[1]), inputs[ref_keys[1]])

        def step():
            if ref is not None:
                torch.mm(ref[0], ref[1].t())
            logits = torch.mm(h, w.t())  # kept alive across the backward products, as autograd would
            grads = torch.mm(g, w), torch.mm(g.t(), h)
            del logits, grads
            return None

        return step

    return Method(name=name, setup=setup, kind="baseline")


def accepted_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` (a class or callable) accepts: peers' versions differ."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
