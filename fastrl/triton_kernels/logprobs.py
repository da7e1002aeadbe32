"""Triton kernels for per-token log-probs (and entropy) from materialised logits.

Rows are the flattened leading dimensions of ``logits[..., V]``; the launchers take the logits as a
``[A, B, V]`` strided view (last dimension contiguous), so ``logits[:, :-1]`` needs no copy.

Forward, one pass per row with an online log-sum-exp over vocabulary blocks, ``z = x / T``::

    m = running max of z,  s = sum_j exp(z_j - m),  t = sum_j exp(z_j - m) * (z_j - m)
    lse = m + log s,  logp = z_y - lse,  H = -sum_j p_j log p_j = log s - t / s

``t`` is kept relative to the running max (not ``sum e^(z-m) z``) so that H does not come out of the
cancellation ``lse - E[z]`` of two numbers of the size of the logits. When the max moves from m to m'
with ``a = exp(m - m')``: ``s' = a s``, ``t' = a (t + s (m - m'))``.

Backward, one pass per row that writes the logits gradient once (``p = exp(z - lse)``)::

    dL/dx_j = (g_logp * (1[j = y] - p_j) - g_H * p_j (log p_j + H)) / T

Only ``lse`` (and ``H``) are saved between the two. ``-inf`` logits are tokens of probability 0: they add
nothing to the entropy and get a zero gradient. A NaN or +inf logit poisons its own row only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastrl.triton_kernels import _lang

# Interpreter-safe helpers (tl.reduce combine functions, bf16 rounding), decorated in this module's mode:
# see _lang.py.
_L = _lang.load()
_add, _max, _to_bf16_rtne = _L.add, _L.maximum, _L.to_bf16_rtne


@triton.jit
def _row_offsets(rows, B, stride_a, stride_b):
    # int64: N * V exceeds 2**31 at realistic sizes (16384 x 151936).
    rows = rows.to(tl.int64)
    return (rows // B) * stride_a + (rows % B) * stride_b


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    # shapes
    N,
    V,
    B,
    # strides (elements) of the [A, B, V] logits view
    stride_a,
    stride_b,
    # scalars
    inv_temp,
    ignore_index,
    # constexprs
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    kept = labels != ignore_index
    # A row whose label is ignored needs no pass at all unless its entropy is wanted.
    if WITH_ENTROPY:
        active = row_ok
    else:
        active = row_ok & kept
    base = logits_ptr + _row_offsets(rows, B, stride_a, stride_b)

    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.full([BLOCK_N], 0.0, ACC)
    t = tl.full([BLOCK_N], 0.0, ACC)
    v_end = tl.where(tl.reduce(active.to(tl.int32), 0, _max) > 0, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = active[:, None] & (cols < V)[None, :]
        z = tl.load(base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(ACC) * inv_temp
        m_new = tl.maximum(m, tl.reduce(z, 1, _max))
        # Rows that have seen only -inf so far shift by 0, so exp() below sees -inf and not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        d = z - m_safe[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, s * (m - m_safe))
            t = alpha * (t + shift) + tl.reduce(tl.where(e == 0.0, 0.0, e * d), 1, _add)
        s = s * alpha + tl.reduce(e, 1, _add)
        m = m_new

    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    in_vocab = (labels >= 0) & (labels < V)
    z_y = tl.load(base + labels, mask=active & kept & in_vocab, other=0.0).to(ACC) * inv_temp
    logp = tl.where(kept, (z_y - m_safe) - log_s, 0.0)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, m_safe + log_s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, log_s - t / s, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    # shapes
    N,
    V,
    B,
    # strides (elements) of the [A, B, V] logits and gradient views
    stride_a,
    stride_b,
    stride_ga,
    stride_gb,
    # scalars
    inv_temp,
    ignore_index,
    # constexprs
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    kept = labels != ignore_index
    if HAS_GRAD_LOGP:
        # Ignored rows get no log-prob gradient whatever the upstream gradient says.
        g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok & kept, other=0.0).to(ACC)
        needed = row_ok & kept
    else:
        g_logp = tl.full([BLOCK_N], 0.0, ACC)
        needed = rows < 0  # all False
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        h = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        needed = row_ok
    # Rows with nothing to propagate read no logits; their lse is replaced so that p = exp(-inf) = 0.
    lse = tl.where(needed, tl.load(lse_ptr + rows, mask=row_ok, other=0.0), 0.0)
    base = logits_ptr + _row_offsets(rows, B, stride_a, stride_b)
    gbase = grad_ptr + _row_offsets(rows, B, stride_ga, stride_gb)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        z = tl.load(base[:, None] + cols[None, :], mask=needed[:, None] & col_ok, other=float("-inf"))
        log_p = z.to(ACC) * inv_temp - lse[:, None]
        p = tl.exp(log_p)
        g = tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
        if HAS_GRAD_ENTROPY:
            # p log p -> 0 as p -> 0; the where keeps -inf logits from making 0 * -inf = NaN.
            g -= g_h[:, None] * tl.where(p == 0.0, 0.0, p * (log_p + h[:, None]))
        g = g * inv_temp
        if INTERPRET and grad_ptr.dtype.element_ty == tl.bfloat16:
            g_out = _to_bf16_rtne(g)
        else:
            g_out = g.to(grad_ptr.dtype.element_ty)
        tl.store(gbase[:, None] + cols[None, :], g_out, mask=row_ok[:, None] & col_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration. Fixed by default: one row per program for large V (a row streams through a
# BLOCK_V tile), several rows per program for small V so that a program still covers ~TILE elements.
# The interpreter runs tiles as numpy arrays, where bigger tiles mean fewer Python-level steps.
# FASTRL_AUTOTUNE=1 searches a few configurations per (V, dtype) on CUDA instead.
# ---------------------------------------------------------------------------------------------------------


def _fixed_config(N: int, V: int, interpret: bool) -> dict:
    max_block_v, tile = (8192, 16384) if interpret else (4096, 4096)
    block_v = min(triton.next_power_of_2(V), max_block_v)
    block_n = max(1, min(tile // block_v, triton.next_power_of_2(N)))
    num_warps = 8 if block_n * block_v >= 4096 else 4
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "num_warps": num_warps}


def _candidates(V: int) -> list[triton.Config]:
    block_vs = sorted({min(triton.next_power_of_2(V), b) for b in (1024, 2048, 4096, 8192)})
    return [
        triton.Config({"BLOCK_N": max(1, 1024 // bv), "BLOCK_V": bv}, num_warps=w)
        for bv in block_vs
        for w in (4, 8, 16)
        if bv >= 32 * w  # at least one element per thread
    ] or [triton.Config({"BLOCK_N": max(1, 1024 // block_vs[0]), "BLOCK_V": block_vs[0]}, num_warps=4)]


@functools.cache
def _autotuned(kind: str, V: int):
    kernel = _logprobs_fwd_kernel if kind == "fwd" else _logprobs_bwd_kernel
    # The backward may write into the logits buffer (inplace_backward): restore it between trials.
    restore = ["grad_ptr"] if kind == "bwd" else []
    return triton.autotune(configs=_candidates(V), key=["V"], restore_value=restore)(kernel)


def _launch(kind: str, args: dict, N: int, V: int, interpret: bool) -> None:
    if os.environ.get("FASTRL_AUTOTUNE", "0") == "1" and not interpret:
        kernel = _autotuned(kind, V)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        kernel[grid](**args)
        return
    kernel = _logprobs_fwd_kernel if kind == "fwd" else _logprobs_bwd_kernel
    cfg = _fixed_config(N, V, interpret)
    num_warps = cfg.pop("num_warps")
    kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](**args, **cfg, num_warps=num_warps)


def _check_view(name: str, t: torch.Tensor) -> None:
    assert t.dim() == 3 and t.stride(-1) == 1, f"{name}: expected a [A, B, V] view, last dim contiguous"


def logprobs_forward(
    logits_ABV: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel. Returns ``(logp_N, lse_N, entropy_N or None)`` in the accumulation
    dtype (fp64 for fp64 logits, else fp32). ``lse`` of a row that needed no pass is ``-inf``."""
    _check_view("logits", logits_ABV)
    A, B, V = logits_ABV.shape
    N = A * B
    acc = torch.float64 if logits_ABV.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, device=logits_ABV.device, dtype=acc)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if N == 0:
        return logp, lse, entropy
    args = dict(
        logits_ptr=logits_ABV,
        labels_ptr=labels_N,
        logp_ptr=logp,
        lse_ptr=lse,
        entropy_ptr=entropy if with_entropy else lse,  # never written without WITH_ENTROPY
        N=N,
        V=V,
        B=B,
        stride_a=logits_ABV.stride(0),
        stride_b=logits_ABV.stride(1),
        inv_temp=inv_temp,
        ignore_index=ignore_index,
        WITH_ENTROPY=with_entropy,
    )
    _launch("fwd", args, N, V, interpret)
    return logp, lse, entropy


def logprobs_backward(
    logits_ABV: torch.Tensor,
    grad_ABV: torch.Tensor,
    labels_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor | None,
    grad_logp_N: torch.Tensor | None,
    grad_entropy_N: torch.Tensor | None,
    *,
    inv_temp: float,
    ignore_index: int,
    interpret: bool,
) -> None:
    """Launch the backward kernel: writes d(loss)/d(logits) into ``grad_ABV`` (which may be ``logits_ABV``
    itself: each element is read before it is overwritten, by the same program)."""
    _check_view("logits", logits_ABV)
    _check_view("grad", grad_ABV)
    A, B, V = logits_ABV.shape
    N = A * B
    assert grad_entropy_N is None or entropy_N is not None
    if N == 0:
        return
    args = dict(
        logits_ptr=logits_ABV,
        grad_ptr=grad_ABV,
        labels_ptr=labels_N,
        lse_ptr=lse_N,
        entropy_ptr=entropy_N if entropy_N is not None else lse_N,
        grad_logp_ptr=grad_logp_N if grad_logp_N is not None else lse_N,
        grad_entropy_ptr=grad_entropy_N if grad_entropy_N is not None else lse_N,
        N=N,
        V=V,
        B=B,
        stride_a=logits_ABV.stride(0),
        stride_b=logits_ABV.stride(1),
        stride_ga=grad_ABV.stride(0),
        stride_gb=grad_ABV.stride(1),
        inv_temp=inv_temp,
        ignore_index=ignore_index,
        HAS_GRAD_LOGP=grad_logp_N is not None,
        HAS_GRAD_ENTROPY=grad_entropy_N is not None,
        INTERPRET=interpret,
    )
    _launch("bwd", args, N, V, interpret)
