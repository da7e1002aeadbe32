"""Per-token log-probs straight from hidden states and the lm_head, never holding the [N, V] logits.

``linear_logprobs(hidden, weight, labels)`` equals ``logprobs(hidden @ weight.T + bias, labels)``:

    z = (h W^T + b) / T,   logp_n = z[n, y_n] - logsumexp_v z[n, v],
    entropy_n = -sum_v p[n, v] log p[n, v],   p = softmax(z[n]),

fp32 outputs (fp64 for fp64 inputs) of ``labels.shape``, exactly the semantics of ``fastrl.logprobs``:
tokens with ``labels == ignore_index`` get logp = 0 and no log-prob gradient, while their entropy is
computed (and differentiated) like any other. The logits are rounded to the input dtype (as
``F.linear`` does) before the fp32 softmax.

Algorithm (DESIGN.md, "fused linear log-probs"). Tokens are processed in chunks of C rows. Per chunk the
logits go into one preallocated [C, V] buffer (cuBLAS ``mm``/``addmm``), one row pass takes lse, logp and
entropy; the autograd op saves only hidden, weight, bias, labels, lse and entropy. Backward recomputes
each chunk's logits into the buffer, overwrites them with d loss / d logits (one row pass) and runs the
two products ``grad_hidden[chunk] = G W`` and ``grad_weight += G^T h[chunk]`` (skipped when the weight
is frozen). ``impl="triton"`` does the row passes with the kernels of ``fastrl.triton_kernels.logprobs``,
``impl="torch"`` with in-place PyTorch ops (same algorithm; ``auto`` picks it for CPU tensors).
``recompute=True`` runs the fully fused kernels of ``fastrl.triton_kernels.linear_logprobs`` instead: no
logits buffer at all, the logits recomputed tile by tile in the backward; slower, least memory.

Chunk rule (``chunk_size=None``): C = budget // (V * itemsize), the budget being 256 MiB on CUDA (large
enough that the products run at full cuBLAS speed) and 32 MiB elsewhere (CPU matmuls saturate at a few
hundred rows); C is rounded down to a multiple of 64 when >= 64 and clamped to [1, N]. The PyTorch row
pass adds about two chunk-sized fp32 temporaries; the Triton one none.

grad_weight precision: with one chunk it is a single product in the weight dtype, as in PyTorch. With
several chunks and a half-precision weight the chunk products are summed in an fp32 [V, H] accumulator
when that is at most ``GRAD_WEIGHT_FP32_MAX_BYTES`` (256 MiB; ``FASTRL_GRAD_WEIGHT_FP32_MAX_MIB``
overrides): on CUDA each chunk product goes straight into it (``addmm(out_dtype=float32)``), on the CPU
from upcast chunk operands, so the error does not grow with the number of chunks. Above that the products
are added in the weight dtype (``addmm_``, one rounding per chunk, as Liger does), keeping the extra memory
at the gradients plus the chunk buffer: at a 150k vocabulary an fp32 [V, H] accumulator alone (890 MiB at
H=1536) would break the "gradients + 512 MiB" memory goal of ANCHORS.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastrl.ops._common import (
    check_float,
    check_labels,
    check_same_device,
    check_temperature,
    eager_function,
    resolve_impl,
    use_eager_path,
)

__all__ = [
    "LinearLogprobsGrads",
    "default_chunk_size",
    "fused_linear_logprobs_with_grad",
    "linear_logprobs",
    "linear_logprobs_reference",
]

GRAD_WEIGHT_FP32_MAX_BYTES = int(os.environ.get("FASTRL_GRAD_WEIGHT_FP32_MAX_MIB", "256")) << 20
CHUNK_BUDGET_BYTES = {"cuda": 256 << 20, "other": 32 << 20}


class LinearLogprobsGrads(NamedTuple):
    """What :func:`fused_linear_logprobs_with_grad` returns. logp/entropy: detached fp32 [N] (entropy None
    unless asked); grad_hidden [N, H] in hidden's dtype; grad_weight [V, H] / grad_bias [V] in their
    dtypes, None when that tensor does not require grad."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


# ---------------------------------------------------------------------------------------------------------
# Reference: materialises the logits
# ---------------------------------------------------------------------------------------------------------


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Plain PyTorch: ``logprobs_reference(F.linear(hidden, weight, bias), labels, ...)``, the whole [..., V]
    logits in the input dtype and their fp32 (fp64 for fp64 inputs) log-softmax materialised."""
    from fastrl.ops.logprobs import logprobs_reference

    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


# ---------------------------------------------------------------------------------------------------------
# Checks and the chunk rule
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, bias, temperature, ignore_index, chunk_size) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H={hidden.shape[-1]}] to match hidden's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise ValueError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if torch.compiler.is_compiling():  # the range check reads the labels: a graph break under compile
        if labels.is_floating_point() or labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must be integers of shape {tuple(hidden.shape[:-1])}")
    else:
        check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index)


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Rows per chunk so that one [C, V] logits buffer stays within the budget (module docstring)."""
    budget = CHUNK_BUDGET_BYTES["cuda" if device.type == "cuda" else "other"]
    rows = max(1, budget // (vocab * itemsize))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_tokens))


def _pick_impl(impl: str, device: torch.device, dtype: torch.dtype, recompute: bool) -> str:
    if recompute:
        if impl == "torch":
            raise ValueError("impl must be 'auto' or 'triton' with recompute=True (a fused Triton kernel)")
        resolved = resolve_impl("triton", device)
    else:
        resolved = resolve_impl(impl, device)
        if impl == "auto" and dtype == torch.float64:
            resolved = "torch"
    if resolved == "triton" and dtype == torch.float64:
        raise ValueError("impl='triton' supports float32/float16/bfloat16 inputs; use impl='torch' for fp64")
    return resolved


# ---------------------------------------------------------------------------------------------------------
# Row passes over a chunk of logits: PyTorch and Triton
# ---------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output and softmax dtype: fp64 for fp64 inputs, fp32 otherwise (as in ``fastrl.logprobs``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_forward(impl, logits_CV, labels_C, inv_temp, ignore_index, with_entropy):
    """(logp, lse, entropy or None) [C] in the accumulation dtype. The logits chunk is only read."""
    if impl == "triton":
        from fastrl.triton_kernels._runtime import interpreting, kernels

        return kernels("logprobs", logits_CV.device).logprobs_forward(
            logits_CV.unsqueeze(0), labels_C, inv_temp=inv_temp, ignore_index=ignore_index,
            with_entropy=with_entropy, interpret=interpreting(logits_CV.device),
        )  # fmt: skip
    z = logits_CV.to(_acc_dtype(logits_CV.dtype))
    if inv_temp != 1.0:
        z = z * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    # log_softmax, not z - lse: it subtracts the row max first, so log p of the likeliest tokens is not
    # the difference of two numbers the size of the logits (lse carries an error of ulp(|z|)).
    log_p = torch.log_softmax(z, dim=-1)
    kept = labels_C != ignore_index
    logp = torch.where(kept, log_p.gather(1, torch.where(kept, labels_C, 0)[:, None]).squeeze(1), 0.0)
    entropy = None
    if with_entropy:
        p = torch.exp(log_p)
        zero = p == 0  # p log p -> 0 as p -> 0: -inf logits add nothing instead of NaN
        entropy = -p.mul_(log_p).masked_fill_(zero, 0.0).sum(-1)
    return logp, lse, entropy


def _rows_grad_(impl, logits_CV, labels_C, lse_C, entropy_C, dlogp_C, dentropy_C, inv_temp, ignore_index):
    """Overwrite the logits chunk with d loss / d logits, with p = softmax(z)::

        g_v = (g_logp ([v = y] - p_v) - g_H p_v (log p_v + H)) / T

    g_logp is dropped at ignored tokens; the entropy term applies to every token (``fastrl.logprobs``).
    The Triton kernel takes p = exp(z - lse_C); the PyTorch pass recomputes log_softmax instead."""
    if impl == "triton":
        from fastrl.triton_kernels._runtime import interpreting, kernels

        x = logits_CV.unsqueeze(0)
        kernels("logprobs", logits_CV.device).logprobs_backward(
            x, x, labels_C, lse_C, entropy_C if dentropy_C is not None else None, dlogp_C, dentropy_C,
            inv_temp=inv_temp, ignore_index=ignore_index, interpret=interpreting(logits_CV.device),
        )  # fmt: skip
        return logits_CV
    kept = labels_C != ignore_index
    z = logits_CV.to(_acc_dtype(logits_CV.dtype))
    if inv_temp != 1.0:
        z.mul_(inv_temp)  # in place even when z is the chunk itself: it is scratch from here on
    log_p = torch.log_softmax(z, dim=-1)  # recomputed rather than z - lse_C: see _rows_forward
    del z
    p = torch.exp(log_p)
    g_logp = torch.where(kept, dlogp_C, 0.0).to(p.dtype)
    if dentropy_C is not None:
        zero = p == 0
        g = log_p.add_(entropy_C[:, None]).mul_(p).masked_fill_(zero, 0.0).mul_(-dentropy_C[:, None])
        g.sub_(p.mul_(g_logp[:, None]))
    else:
        # masked_fill, not a multiply by zero: an ignored row with non-finite logits (a fully masked
        # padding position) must give an exact zero, never 0 * NaN, before G^T h spreads it into grad_W.
        g = p.mul_(-g_logp[:, None]).masked_fill_(~kept[:, None], 0.0)
    g.scatter_add_(1, torch.where(kept, labels_C, 0)[:, None], g_logp[:, None])
    if inv_temp != 1.0:
        g.mul_(inv_temp)
    return logits_CV.copy_(g)


# ---------------------------------------------------------------------------------------------------------
# The chunked sweep: forward only, and forward + backward in one pass
# ---------------------------------------------------------------------------------------------------------


def _chunk_logits(h_CH, weight, bias, out_CV):
    if bias is None:
        return torch.mm(h_CH, weight.t(), out=out_CV)
    return torch.addmm(bias, h_CH, weight.t(), out=out_CV)


def _grad_hidden_chunk(g_CV, weight, out_CH):
    return torch.mm(g_CV, weight, out=out_CH)


class _GradWeightAccumulator:
    """grad_weight += G^T h over chunks, in fp32 where the module docstring's rule allows."""

    def __init__(self, weight: torch.Tensor, n_chunks: int):
        half = weight.dtype in (torch.float16, torch.bfloat16)
        fp32 = half and n_chunks > 1 and weight.numel() * 4 <= GRAD_WEIGHT_FP32_MAX_BYTES
        self.dtype = weight.dtype
        self.acc = torch.zeros_like(weight, dtype=torch.float32 if fp32 else weight.dtype)

    fp32_out_addmm = True  # torch.addmm(out_dtype=float32) works here (CUDA); turned off if it raises

    def add(self, g_CV: torch.Tensor, h_CH: torch.Tensor) -> None:
        if self.acc.dtype == g_CV.dtype:
            self.acc.addmm_(g_CV.t(), h_CH)
            return
        if self.acc.is_cuda and _GradWeightAccumulator.fp32_out_addmm:
            try:
                torch.addmm(self.acc, g_CV.t(), h_CH, out_dtype=torch.float32, out=self.acc)
                return
            except RuntimeError:  # argument checks fail before any write
                _GradWeightAccumulator.fp32_out_addmm = False
        # No fp32-output half matmul (the CPU): upcast the chunk operands, chunk-sized fp32 temporaries.
        self.acc.addmm_(g_CV.t().float(), h_CH.float())

    def result(self) -> torch.Tensor:
        return self.acc.to(self.dtype)


def _sweep(
    hidden_NH, weight, bias, labels_N, *, impl, inv_temp, ignore_index, with_entropy, chunk_size,
    grad_fn=None, saved=None, need_hidden=True, need_weight=True, need_bias=True,
):  # fmt: skip
    """One pass over the chunks. Three modes:

    * forward (``grad_fn`` and ``saved`` None): returns (logp, lse, entropy);
    * fused (``grad_fn``): forward and backward per chunk, upstream grads from ``grad_fn``;
    * backward (``saved = (lse, entropy, dlogp, dentropy)``): recomputes the chunk logits.
    The last two return (logp, entropy, grad_hidden, grad_weight, grad_bias).
    """
    N, _ = hidden_NH.shape
    V = weight.shape[0]
    C = chunk_size or default_chunk_size(N, V, hidden_NH.element_size(), hidden_NH.device)
    f32 = dict(device=hidden_NH.device, dtype=_acc_dtype(hidden_NH.dtype))
    backward = grad_fn is not None or saved is not None
    logp = torch.empty(N, **f32) if saved is None else None
    lse = torch.empty(N, **f32) if saved is None else saved[0]
    entropy = (torch.empty(N, **f32) if saved is None else saved[1]) if with_entropy else None
    n_chunks = -(-N // C)
    grad_h = torch.empty_like(hidden_NH) if backward and need_hidden else None
    grad_w = _GradWeightAccumulator(weight, n_chunks) if backward and need_weight else None
    grad_b = torch.zeros(V, **f32) if backward and need_bias and bias is not None else None
    buf = torch.empty(min(C, N), V, device=hidden_NH.device, dtype=hidden_NH.dtype)
    for start in range(0, N, C):
        rows = slice(start, min(start + C, N))
        h_c, y_c = hidden_NH[rows], labels_N[rows]
        x = _chunk_logits(h_c, weight, bias, buf[: rows.stop - start])
        if saved is None:
            logp[rows], lse[rows], ent_c = _rows_forward(impl, x, y_c, inv_temp, ignore_index, with_entropy)
            if with_entropy:
                entropy[rows] = ent_c
            if not backward:
                continue
            dlogp_c, dent_c = _call_grad_fn(
                grad_fn, rows, logp[rows], entropy[rows] if with_entropy else None
            )
        else:
            dlogp_c, dent_c = saved[2][rows], (saved[3][rows] if saved[3] is not None else None)
        ent_rows = entropy[rows] if with_entropy else None
        g = _rows_grad_(impl, x, y_c, lse[rows], ent_rows, dlogp_c, dent_c, inv_temp, ignore_index)
        if grad_h is not None:
            _grad_hidden_chunk(g, weight, grad_h[rows])
        if grad_w is not None:
            grad_w.add(g, h_c)
        if grad_b is not None:
            grad_b += g.sum(0, dtype=grad_b.dtype)
    if not backward:
        return logp, lse, entropy
    return (
        logp,
        entropy,
        grad_h,
        grad_w.result() if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )


def _call_grad_fn(grad_fn, rows, logp_C, entropy_C):
    out = grad_fn(rows, logp_C, entropy_C)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("grad_fn must return (dloss_dlogp, dloss_dentropy or None)")
    dlogp, dent = out
    if not isinstance(dlogp, torch.Tensor) or dlogp.shape != logp_C.shape:
        raise ValueError(f"grad_fn's dloss_dlogp must be a tensor of shape {tuple(logp_C.shape)}")
    if dent is not None and (entropy_C is None or dent.shape != entropy_C.shape):
        raise ValueError("grad_fn's dloss_dentropy must be None unless with_entropy=True, shape [C]")
    acc = logp_C.dtype
    return dlogp.detach().to(acc).contiguous(), (
        dent.detach().to(acc).contiguous() if dent is not None else None
    )


# ---------------------------------------------------------------------------------------------------------
# Whole forward / backward for one resolved impl, registered as torch.library ops for torch.compile
# ---------------------------------------------------------------------------------------------------------


def _forward_impl(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, impl, chunk_size,
                  recompute):  # fmt: skip
    inv_temp = 1.0 / temperature
    if recompute:
        from fastrl.triton_kernels._runtime import interpreting, kernels

        lse, logp, ent = kernels("linear_logprobs", hidden.device).fused_forward(
            hidden, weight, bias, labels, inv_temp=inv_temp, ignore_index=ignore_index,
            with_entropy=with_entropy, interpret=interpreting(hidden.device),
        )  # fmt: skip
        return logp, lse, ent
    return _sweep(hidden, weight, bias, labels, impl=impl, inv_temp=inv_temp, ignore_index=ignore_index,
                  with_entropy=with_entropy, chunk_size=chunk_size)  # fmt: skip


def _fwd_body(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float, ignore_index: int, with_entropy: bool, impl: str, chunk_size: int, recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logp, lse, entropy) fp32 [N]; entropy is empty when not asked for (ops cannot return None).
    With ``recompute`` lse is [2, N], an exact two-float sum (see ``fused_forward``)."""
    logp, lse, ent = _forward_impl(hidden, weight, bias, labels, temperature, ignore_index, with_entropy,
                                   impl, chunk_size, recompute)  # fmt: skip
    return logp, lse, ent if ent is not None else lse.new_empty(0)


_fwd_op = torch.library.custom_op("fastrl::linear_logprobs_fwd", _fwd_body, mutates_args=())


@_fwd_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, impl, chunk_size, recompute):
    n = hidden.shape[0]
    logp = hidden.new_empty(n, dtype=_acc_dtype(hidden.dtype))
    lse = logp.new_empty((2, n) if recompute else (n,))
    return logp, lse, logp.new_empty(n if with_entropy else 0)


def _bwd_body(
    dlogp: torch.Tensor, dentropy: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
    temperature: float, ignore_index: int, impl: str, chunk_size: int, recompute: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad_hidden, grad_weight, grad_bias); an empty tensor stands for a gradient not asked for."""
    inv_temp = 1.0 / temperature
    dlogp = dlogp.to(lse.dtype).contiguous()
    dentropy = dentropy.to(lse.dtype).contiguous() if dentropy is not None else None
    need_bias = need_bias and bias is not None
    if recompute:
        from fastrl.triton_kernels._runtime import interpreting, kernels

        gh, gw, gb = kernels("linear_logprobs", hidden.device).fused_backward(
            hidden, weight, bias, labels, lse, entropy, dlogp, dentropy, inv_temp=inv_temp,
            ignore_index=ignore_index, grad_hidden=need_hidden, grad_weight=need_weight,
            grad_bias=need_bias, interpret=interpreting(hidden.device),
        )  # fmt: skip
        gh = gh.to(hidden.dtype) if gh is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
    else:
        _, _, gh, gw, gb = _sweep(
            hidden, weight, bias, labels, impl=impl, inv_temp=inv_temp, ignore_index=ignore_index,
            with_entropy=entropy is not None, chunk_size=chunk_size, saved=(lse, entropy, dlogp, dentropy),
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        )  # fmt: skip
    empty = hidden.new_empty(0)
    return tuple(g if g is not None else empty.clone() for g in (gh, gw, gb))


_bwd_op = torch.library.custom_op("fastrl::linear_logprobs_bwd", _bwd_body, mutates_args=())


@_bwd_op.register_fake
def _(dlogp, dentropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, impl,
      chunk_size, recompute, need_hidden, need_weight, need_bias):  # fmt: skip
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    gb = torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, impl, chunk_size, recompute = (
        inputs
    )
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if with_entropy else None)
    ctx.options = (temperature, ignore_index, impl, chunk_size, recompute)


def _make_backward(bwd):
    """The backward of ``linear_logprobs_fwd`` over ``bwd``: the custom op under torch.compile, its plain
    Python body on the eager path (``_common.eager_function``)."""

    def backward(ctx, dlogp, dlse, dentropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, impl, chunk_size, recompute = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if dlogp is None:
            dlogp = torch.zeros_like(lse)
        if entropy is None:
            dentropy = None
        elif dentropy is None:
            dentropy = torch.zeros_like(lse)
        gh, gw, gb = bwd(dlogp, dentropy, hidden, weight, bias, labels, lse, entropy, temperature,
                         ignore_index, impl, chunk_size, recompute, need_h, need_w, need_b)  # fmt: skip
        return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 7

    return backward


torch.library.register_autograd(
    "fastrl::linear_logprobs_fwd", _make_backward(_bwd_op), setup_context=_setup_context
)
_EagerLinearLogprobs = eager_function(
    "_EagerLinearLogprobs", _fwd_body, _setup_context, _make_backward(_bwd_body)
)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    recompute: bool = False,
):
    """fp32 log-probs ``logp[...] = log softmax((hidden @ weight.T + bias) / T)[labels]`` (module docstring).

    hidden [..., H], weight [V, H], labels ``hidden.shape[:-1]``, bias [V] or None. Returns ``logp`` of
    ``labels.shape``, or ``(logp, entropy)`` when ``return_entropy``. Exact gradients to hidden, weight and
    bias; none is computed for a tensor that does not require grad, and nothing is saved under no_grad.
    ``impl``: "auto" | "triton" | "torch"; ``chunk_size``: rows per logits chunk (None: the module's rule);
    ``recompute``: fused Triton kernels with no logits buffer (slower, least memory).
    """
    _check_inputs(hidden, weight, labels, bias, temperature, ignore_index, chunk_size)
    resolved = _pick_impl(impl, hidden.device, hidden.dtype, recompute)
    batch_shape = labels.shape
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    if hidden_NH.stride(-1) != 1:
        hidden_NH = hidden_NH.contiguous()
    labels_N = labels.reshape(-1).to(torch.int64).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n = hidden_NH.shape[0]
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], hidden.element_size(), hidden.device)
    op = _EagerLinearLogprobs.apply if use_eager_path() else _fwd_op
    logp, _, entropy = op(hidden_NH, weight, bias, labels_N, float(temperature), ignore_index,
                          return_entropy, resolved, chunk, recompute)  # fmt: skip
    logp = logp.view(batch_shape)
    return (logp, entropy.view(batch_shape)) if return_entropy else logp


def fused_linear_logprobs_with_grad(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    grad_fn: Callable[[slice, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> LinearLogprobsGrads:
    """Forward and backward of ``linear_logprobs`` in one sweep, for losses whose per-token gradient is
    known once that token's log-prob (and entropy) is.

    For each chunk of rows ``rows`` (a ``slice`` into [0, N)), in order: logits into the chunk buffer,
    ``logp_C`` / ``entropy_C`` (detached fp32 [C]; entropy None unless ``with_entropy``), then
    ``grad_fn(rows, logp_C, entropy_C)`` must return ``(dloss_dlogp_C, dloss_dentropy_C or None)`` (any
    float dtype, shape [C]); these are the upstream gradients of the *total* loss. The logits gradient
    replaces the logits in the buffer and ``grad_hidden[rows] = G W``, ``grad_weight += G^T h[rows]``
    follow at once: three matrix products in all. Log-prob gradients at ignored tokens are dropped (their
    logp is the constant 0); entropy gradients apply to every token, as in ``linear_logprobs``. grad_fn
    is called once per chunk, in row order, so it must not depend on later chunks; it may keep the
    logp/entropy it is given (e.g. for metrics). The logp/entropy views it receives are also returned.

    hidden_NH [N, H], weight_VH [V, H], labels_N [N], bias [V] or None. No autograd graph is built: the
    caller feeds the returned gradients to its own autograd Function. grad_weight (grad_bias) is None when
    weight (bias) does not require grad. ``impl`` "auto" | "triton" (Triton row passes) | "torch".
    """
    if hidden_NH.dim() != 2:
        raise ValueError(f"hidden_NH must have shape [N, H], got {tuple(hidden_NH.shape)}")
    if not callable(grad_fn):
        raise ValueError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    _check_inputs(hidden_NH, weight_VH, labels_N, bias, temperature, ignore_index, chunk_size)
    resolved = _pick_impl(impl, hidden_NH.device, hidden_NH.dtype, recompute=False)
    with torch.no_grad():
        logp, entropy, gh, gw, gb = _sweep(
            hidden_NH.detach().contiguous(), weight_VH.detach().contiguous(), _detach(bias),
            labels_N.to(torch.int64).contiguous(), impl=resolved, inv_temp=1.0 / temperature,
            ignore_index=ignore_index, with_entropy=with_entropy, chunk_size=chunk_size, grad_fn=grad_fn,
            need_weight=weight_VH.requires_grad, need_bias=bias is not None and bias.requires_grad,
        )  # fmt: skip
    return LinearLogprobsGrads(logp, entropy, gh, gw, gb)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None
