"""Per-token log-probs (and entropy) from materialised logits: ``fastrl.logprobs``.

Layers (``fastrl/triton_kernels/logprobs.py`` holds the kernels):
- ``logprobs_reference``: plain, unchunked PyTorch; what tests and benchmarks compare against.
- the chunked PyTorch impl (``impl="torch"``, what ``auto`` picks off CUDA): fp32 copies of at most
  ``TORCH_CHUNK_ELEMENTS`` logits exist at a time.
- ``torch.library`` custom ops ``fastrl::logprobs_fwd`` / ``fastrl::logprobs_bwd`` (and the mutating
  ``fastrl::logprobs_bwd_inplace``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces
  through; autograd is attached with ``register_autograd``.
- ``logprobs``: input checks, ``impl`` dispatch, the public function.
"""

# No ``from __future__ import annotations`` here: torch.library.custom_op reads the forward op's schema from
# its real annotations.
import torch
from torch import Tensor

from fastrl.ops._common import (
    check_float,
    check_labels,
    check_same_device,
    check_temperature,
    eager_function,
    resolve_impl,
    use_eager_path,
)

# Logits per chunk in the torch impl: a chunk's fp32 temporaries stay at a few times 64 MiB.
TORCH_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype: fp64 for fp64 logits, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(logits, labels, temperature, ignore_index, *, values: bool) -> None:
    check_float("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have shape [..., V] with at least one dimension, got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}"
        )
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    check_same_device(logits=logits, labels=labels)
    check_temperature(temperature)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if values:  # data-dependent (a device sync): run where real tensors are at hand, not while tracing
        check_labels("labels", labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    elif labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    elif labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")


def logprobs_reference(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain PyTorch, unchunked: the same math as :func:`logprobs` (see there), differentiable by autograd.

    Materialises fp32 (fp64 for fp64 logits) ``log_softmax(logits / T)`` of the whole input.
    """
    _check_inputs(logits, labels, temperature, ignore_index, values=True)
    log_p = torch.log_softmax(logits.to(_acc_dtype(logits.dtype)) / temperature, dim=-1)
    kept = labels != ignore_index
    safe = torch.where(kept, labels, 0).long()
    logp = torch.where(kept, log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    p = log_p.exp()
    # p log p -> 0 as p -> 0: -inf logits (masked tokens) add nothing instead of 0 * -inf = NaN. The where
    # sits on log p, not on the product, so that the gradient through it is not NaN either.
    entropy = -(p * torch.where(p == 0, 0.0, log_p)).sum(-1)
    return logp, entropy


# ------------------------------------------------------------------------------------------------------
# Layout: rows of logits[..., V] as an [A, B, V] strided view, so sliced inputs (logits[:, :-1]) need no copy.
# ------------------------------------------------------------------------------------------------------


def _rows_view(x: Tensor) -> tuple[Tensor, bool]:
    """``x[..., V]`` as ``[A, B, V]`` with the last dimension contiguous. Returns ``(view, True)`` when the
    leading dimensions collapse to two strided ones, else ``(contiguous copy, False)``."""
    V = x.shape[-1]
    if x.stride(-1) == 1 or V == 1:
        merged: list[tuple[int, int]] = []
        for n, st in zip(x.shape[:-1], x.stride()[:-1]):
            if n == 1:
                continue
            if merged and merged[-1][1] == n * st:
                merged[-1] = (merged[-1][0] * n, st)
            else:
                merged.append((n, st))
        if any(n == 0 for n in x.shape[:-1]):
            merged = [(0, V)]
        if len(merged) <= 2:
            (A, sa), (B, sb) = [(1, 0)] * (2 - len(merged)) + merged
            return x.as_strided((A, B, V), (sa, sb, 1)), True
    return x.contiguous().view(1, -1, V), False


def _flat_labels(labels: Tensor) -> Tensor:
    flat = labels.reshape(-1)
    return (flat if flat.dtype in (torch.int32, torch.int64) else flat.long()).contiguous()


# ------------------------------------------------------------------------------------------------------
# The chunked PyTorch impl.
# ------------------------------------------------------------------------------------------------------


def _row_chunks(A: int, B: int, V: int):
    """``(a0, a1, b0, b1)`` blocks of the [A, B] rows holding about TORCH_CHUNK_ELEMENTS logits each."""
    rows = max(1, TORCH_CHUNK_ELEMENTS // V)
    if A * B == 0:
        return
    if rows <= B:
        for a in range(A):
            for b0 in range(0, B, rows):
                yield a, a + 1, b0, min(B, b0 + rows)
    else:
        per = rows // B
        for a0 in range(0, A, per):
            yield a0, min(A, a0 + per), 0, B


def _torch_forward(x, labels, inv_temp, ignore_index, with_entropy):
    A, B, V = x.shape
    acc = _acc_dtype(x.dtype)
    labels = labels.view(A, B)
    logp = torch.empty(A, B, device=x.device, dtype=acc)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    for a0, a1, b0, b1 in _row_chunks(A, B, V):
        z = x[a0:a1, b0:b1].to(acc) * inv_temp
        lse_c = torch.logsumexp(z, dim=-1)
        lab = labels[a0:a1, b0:b1]
        kept = lab != ignore_index
        z_y = z.gather(-1, torch.where(kept, lab, 0).long().unsqueeze(-1)).squeeze(-1)
        logp[a0:a1, b0:b1] = torch.where(kept, z_y - lse_c, 0.0)
        lse[a0:a1, b0:b1] = lse_c
        if with_entropy:
            log_p = z - lse_c.unsqueeze(-1)
            p = log_p.exp()
            entropy[a0:a1, b0:b1] = -(p * torch.where(p == 0, 0.0, log_p)).sum(-1)
    return logp.view(-1), lse.view(-1), entropy.view(-1) if with_entropy else None


def _torch_backward(x, grad, labels, lse, entropy, g_logp, g_h, inv_temp, ignore_index):
    A, B, V = x.shape
    acc = _acc_dtype(x.dtype)
    labels, lse = labels.view(A, B), lse.view(A, B)
    for a0, a1, b0, b1 in _row_chunks(A, B, V):
        log_p = x[a0:a1, b0:b1].to(acc) * inv_temp - lse[a0:a1, b0:b1].unsqueeze(-1)
        p = log_p.exp()
        g = torch.zeros_like(p)
        if g_logp is not None:
            lab = labels[a0:a1, b0:b1]
            kept = lab != ignore_index
            gl = torch.where(kept, g_logp.view(A, B)[a0:a1, b0:b1].to(acc), 0.0).unsqueeze(-1)
            g = -gl * p
            if g_h is None:
                # As in the kernel: a row with nothing to propagate gets exactly 0, even when its logits
                # are NaN/inf (padding), where 0 * p would be NaN and reach the weights through backward.
                g.masked_fill_(~kept.unsqueeze(-1), 0.0)
            g.scatter_add_(-1, torch.where(kept, lab, 0).long().unsqueeze(-1), gl)
        if g_h is not None:
            h = entropy.view(A, B)[a0:a1, b0:b1].unsqueeze(-1)
            gh = g_h.view(A, B)[a0:a1, b0:b1].to(acc).unsqueeze(-1)
            g -= gh * torch.where(p == 0, 0.0, p * (log_p + h))
        grad[a0:a1, b0:b1] = g * inv_temp


# ------------------------------------------------------------------------------------------------------
# Custom ops. Outputs are fp32 (fp64 for fp64 logits); ``entropy`` is an empty [0] tensor unless asked for.
# ------------------------------------------------------------------------------------------------------


def _forward_impl(logits, labels, temperature, ignore_index, with_entropy, impl):
    # The value check of labels lives here so that it also runs under torch.compile (not traceable).
    _check_inputs(logits, labels, temperature, ignore_index, values=True)
    x, _ = _rows_view(logits)
    flat = _flat_labels(labels)
    if impl == "triton":
        from fastrl.triton_kernels._runtime import interpreting, kernels

        k = kernels("logprobs", x.device)
        logp, lse, entropy = k.logprobs_forward(
            x,
            flat,
            inv_temp=1.0 / temperature,
            ignore_index=ignore_index,
            with_entropy=with_entropy,
            interpret=interpreting(x.device),
        )
    else:
        logp, lse, entropy = _torch_forward(x, flat, 1.0 / temperature, ignore_index, with_entropy)
    if entropy is None:
        entropy = logp.new_empty(0)
    else:
        entropy = entropy.view(labels.shape)
    return logp.view(labels.shape), lse.view(labels.shape), entropy


def _forward_impl_op(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    impl: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp, lse, entropy)``; ``inplace_backward`` only tells the backward where to write."""
    return _forward_impl(logits, labels, temperature, ignore_index, with_entropy, impl)


_logprobs_fwd = torch.library.custom_op("fastrl::logprobs_fwd", _forward_impl_op, mutates_args=())


@_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, impl, inplace_backward):
    acc = _acc_dtype(logits.dtype)
    logp = logits.new_empty(labels.shape, dtype=acc)
    entropy = logits.new_empty(labels.shape if with_entropy else (0,), dtype=acc)
    return logp, torch.empty_like(logp), entropy


def _backward_impl(
    logits, grad, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, impl
):
    """Writes the logits gradient into ``grad``: either ``logits`` itself or a fresh contiguous tensor."""
    x, x_is_view = _rows_view(logits)
    # The gradient rows must split into the same [A, B] as the logits rows: the kernels share one B.
    g3 = x if grad is logits else grad.view(x.shape)
    flat = _flat_labels(labels)
    lse = lse.reshape(-1).contiguous()
    entropy = entropy.reshape(-1).contiguous() if grad_entropy is not None else None
    g_logp = grad_logp.reshape(-1).contiguous() if grad_logp is not None else None
    g_h = grad_entropy.reshape(-1).contiguous() if grad_entropy is not None else None
    inv_temp = 1.0 / temperature
    if impl == "triton":
        from fastrl.triton_kernels._runtime import interpreting, kernels

        k = kernels("logprobs", x.device)
        k.logprobs_backward(
            x, g3, flat, lse, entropy, g_logp, g_h,
            inv_temp=inv_temp, ignore_index=ignore_index, interpret=interpreting(x.device),
        )  # fmt: skip
    else:
        _torch_backward(x, g3, flat, lse, entropy, g_logp, g_h, inv_temp, ignore_index)
    if grad is logits and not x_is_view:  # the kernels wrote into a contiguous copy: move it into place
        logits.copy_(x.view(logits.shape))


# The two backward ops share one argument list; the in-place one writes the gradient into ``logits``. The
# schema is spelled out once here rather than inferred from two copies of the annotated signature.
_BWD_ARGS = (
    "Tensor labels, Tensor lse, Tensor entropy, Tensor? grad_logp, Tensor? grad_entropy, float temperature, "
    "int ignore_index, str impl"
)


def _bwd(logits: Tensor, *args) -> Tensor:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _backward_impl(logits, grad, *args)
    return grad


def _bwd_inplace(logits: Tensor, *args) -> None:
    """Overwrites ``logits`` with the gradient (each row is read before it is written)."""
    _backward_impl(logits, logits, *args)


_logprobs_bwd = torch.library.custom_op(
    "fastrl::logprobs_bwd", _bwd, mutates_args=(), schema=f"(Tensor logits, {_BWD_ARGS}) -> Tensor"
)
_logprobs_bwd_inplace = torch.library.custom_op(
    "fastrl::logprobs_bwd_inplace",
    _bwd_inplace,
    mutates_args=("logits",),
    schema=f"(Tensor(a!) logits, {_BWD_ARGS}) -> ()",
)
_logprobs_bwd.register_fake(
    lambda logits, *args: torch.empty_like(logits, memory_format=torch.contiguous_format)
)
_logprobs_bwd_inplace.register_fake(lambda logits, *args: None)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, impl, inplace_backward = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.options = (temperature, ignore_index, with_entropy, impl, inplace_backward)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _make_backward(bwd, bwd_inplace):
    """The backward of ``logprobs_fwd`` over the given backward ops: the custom ops under torch.compile,
    their plain Python bodies on the eager path (``_common.eager_function``)."""

    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, impl, inplace_backward = ctx.options
        if not with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        args = (labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, impl)
        if inplace_backward:
            bwd_inplace(logits, *args)
            grad = logits
        else:
            grad = bwd(logits, *args)
        return grad, None, None, None, None, None, None

    return backward


def _bwd_inplace_eager(logits: Tensor, *args) -> None:
    _bwd_inplace(logits, *args)
    # What the custom op's ``mutates_args`` does: an autograd node that saved ``logits`` sees the overwrite
    # (a Triton kernel writes through the data pointer, which bumps no version counter by itself).
    torch.autograd.graph.increment_version(logits)


torch.library.register_autograd(
    "fastrl::logprobs_fwd", _make_backward(_logprobs_bwd, _logprobs_bwd_inplace), setup_context=_setup_context
)
_EagerLogprobs = eager_function(
    "_EagerLogprobs", _forward_impl_op, _setup_context, _make_backward(_bwd, _bwd_inplace_eager)
)


def logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of ``labels`` under ``softmax(logits / temperature)``, and optionally the entropy.

    With ``z = logits / T`` and ``lse = log sum_j exp(z_j)``, for every position (row) ``i``::

        logp_i    = z_{i, y_i} - lse_i                  (exactly 0 where y_i == ignore_index)
        entropy_i = -sum_j p_ij log p_ij,  p_ij = exp(z_ij - lse_i)

    The entropy is computed for every row, ignored ones included (TRL's fused head zeroes the ignored
    rows' entropy instead): masking it is the caller's business. Gradients, for any upstream ``g_logp``
    and ``g_H``::

        dL/dlogits_ij = (g_logp_i * (1[j = y_i] - p_ij) - g_H_i * p_ij (log p_ij + H_i)) / T

    with ``g_logp_i`` taken as 0 on ignored rows; the gradient has the dtype of ``logits``.

    Args:
        logits: ``[..., V]`` floating point (fp32, bf16, fp16 or fp64); the last dimension should be
            contiguous (else a copy is made). ``-inf`` entries are tokens of probability 0.
        labels: integer ``[...]`` (``logits.shape[:-1]``), in ``[0, V)`` or equal to ``ignore_index``.
        temperature: ``T > 0``.
        return_entropy: also return the entropy.
        impl: ``"auto"`` (Triton on CUDA, the chunked PyTorch path elsewhere), ``"triton"`` (interpreted
            on CPU tensors) or ``"torch"``.
        inplace_backward: the backward writes the logits gradient into the ``logits`` buffer instead of a
            new one, saving a logits-sized allocation. The logits are destroyed: use it only when nothing
            else reads them after this op's backward. Another autograd node that saved ``logits`` and runs
            its backward later fails with autograd's "modified by an inplace operation" error.

    Returns:
        ``logp`` of shape ``labels.shape``, or ``(logp, entropy)``; fp32 (fp64 for fp64 logits).
    """
    _check_inputs(logits, labels, temperature, ignore_index, values=False)
    impl = resolve_impl(impl, logits.device)
    op = _EagerLogprobs.apply if use_eager_path() else torch.ops.fastrl.logprobs_fwd
    logp, _, entropy = op(
        logits, labels, float(temperature), ignore_index, bool(return_entropy), impl, bool(inplace_backward)
    )
    return (logp, entropy) if return_entropy else logp
