"""Fully fused Triton kernels for per-token log-probs from hidden states and an lm_head (``recompute=True``).

``_fused_forward_kernel`` tiles ``h @ W^T`` with ``tl.dot`` and keeps an online log-sum-exp over
vocabulary tiles; ``_fused_backward_kernel`` recomputes each [BLOCK_N, BLOCK_V] logits tile and adds its
contribution to grad_hidden / grad_weight / grad_bias with fp32 atomics. No logits buffer of any size
exists. (The chunked path, with a bounded logits buffer and cuBLAS products, reuses the row kernels of
``fastrl.triton_kernels.logprobs``.)

Formulas, with z = (h W^T + b) / T (the product rounded to the input dtype first, as ``F.linear`` does),
lse = log sum_v exp(z_v), p = exp(z - lse), label y:
  logp = z_y - lse (0 where y == ignore_index),   entropy H = -sum_v p_v log p_v (every row),
  d loss / d logits_v = (g_logp ([v = y] - p_v) - g_H p_v (log p_v + H)) / T.
The forward keeps ``t = sum exp(z - m) (z - m)`` relative to the running max m, so H = log s - t / s does
not come out of the cancellation lse - E[z] of two numbers the size of the logits; when the max moves
from m to m' with a = exp(m - m'): s' = a s, t' = a (t + s (m - m')).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.sum / tl.max are @triton.jit functions of triton.language that the interpreted copy loaded for CPU
# tensors cannot call (see fastrl/triton_kernels/logprobs.py); tl.reduce with their combine functions is
# what they compile to and runs under the interpreter too.
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max


# ---------------------------------------------------------------------------------------------------------
# Fully fused kernels (recompute mode): no logits buffer
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``DTYPE``, returned as fp32 (operands for an fp32 tl.dot).

    The interpreter (Triton 3.9) truncates fp32 -> bf16 instead of rounding, so there the rounding is
    done on the bits: add 0x7FFF plus the lowest kept bit, clear the low 16 bits.
    """
    if tl.float32 == DTYPE:
        y = x
    elif INTERPRET and tl.bfloat16 == DTYPE:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, vcols, row_mask, vcol_mask, H, stride_hn, stride_wv, inv_temp,
    BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """z = (h[rows] @ W[vcols]^T + b[vcols]) / T as an fp32 [BLOCK_N, BLOCK_V] tile."""
    hcols = tl.arange(0, BLOCK_H)
    acc = tl.full((rows.shape[0], vcols.shape[0]), 0.0, tl.float32)
    for k in range(0, H, BLOCK_H):
        kmask = k + hcols < H
        h = tl.load(h_ptr + rows[:, None] * stride_hn + (k + hcols)[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + vcols[:, None] * stride_wv + (k + hcols)[None, :],
                    mask=vcol_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + vcols, mask=vcol_mask, other=0.0).to(tl.float32)[None, :]
    # Match the chunked path and PyTorch: the logits are rounded to the input dtype before the softmax.
    return _round_to(acc, h_ptr.dtype.element_ty, INTERPRET) * inv_temp


@triton.jit
def _fused_forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, logp_ptr, entropy_ptr,  # data
    N, V, H,  # shapes
    stride_hn, stride_wv,  # strides
    inv_temp, ignore_index,  # scalars
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.full((BLOCK_N,), 0.0, tl.float32)
    t = tl.full((BLOCK_N,), 0.0, tl.float32)
    z_label = tl.full((BLOCK_N,), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        vcols = start + tl.arange(0, BLOCK_V)
        vcol_mask = vcols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, vcols, row_mask, vcol_mask, H, stride_hn, stride_wv,
                         inv_temp, BLOCK_H, HAS_BIAS, INTERPRET, DOT_PRECISION)  # fmt: skip
        z = tl.where(vcol_mask[None, :], z, -float("inf"))
        z_label += tl.reduce(tl.where(vcols[None, :] == labels[:, None], z, 0.0), 1, _add)
        m_new = tl.maximum(m, tl.reduce(z, 1, _max))  # finite: every tile has a column in range
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            shift = tl.where(m == -float("inf"), 0.0, s * (m - m_new))
            t = alpha * (t + shift) + tl.reduce(tl.where(vcol_mask[None, :], e * d, 0.0), 1, _add)
        s = s * alpha + tl.reduce(e, 1, _add)
        m = m_new
    log_s = tl.log(s)
    # lse = m + log_s kept as the exact two-float sum hi + lo (TwoSum): log p = (z - hi) - lo then loses
    # nothing for the likeliest tokens, where z - lse would cost an ulp of |z| (several times PyTorch's
    # log_softmax error there at T = 0.5).
    hi = m + log_s
    bb = hi - m
    lo = (m - (hi - bb)) + (log_s - bb)
    tl.store(lse_ptr + rows, hi, mask=row_mask)
    tl.store(lse_ptr + N + rows, lo, mask=row_mask)
    logp = (z_label - hi) - lo
    tl.store(logp_ptr + rows, tl.where(labels != ignore_index, logp, 0.0), mask=row_mask)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, log_s - t / s, mask=row_mask)


@triton.jit
def _fused_backward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, entropy_ptr, dlogp_ptr, dentropy_ptr,  # inputs
    grad_h_ptr, grad_w_ptr, grad_b_ptr,  # fp32 outputs, accumulated with atomics
    N, V, H,  # shapes
    stride_hn, stride_wv,  # strides (the fp32 gradients are contiguous [N, H] and [V, H])
    inv_temp, ignore_index,  # scalars
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, INTERPRET: tl.constexpr,
    GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    vcols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    vcol_mask = vcols < V
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (labels != ignore_index)
    lse_hi = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    lse_lo = tl.load(lse_ptr + N + rows, mask=row_mask, other=0.0)
    g_logp = tl.where(valid, tl.load(dlogp_ptr + rows, mask=row_mask, other=0.0), 0.0)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, vcols, row_mask, vcol_mask, H, stride_hn, stride_wv,
                     inv_temp, BLOCK_H, HAS_BIAS, INTERPRET, DOT_PRECISION)  # fmt: skip
    log_p = (z - lse_hi[:, None]) - lse_lo[:, None]
    p = tl.where(vcol_mask[None, :], tl.exp(log_p), 0.0)
    g = tl.where(vcols[None, :] == labels[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if WITH_ENTROPY:  # every row in range has an entropy, ignored or not
        g_ent = tl.load(dentropy_ptr + rows, mask=row_mask, other=0.0)
        h_ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g -= g_ent[:, None] * p * (log_p + h_ent[:, None])
    # Round the logits gradient to the input dtype, as PyTorch's backward does, before the bias sum and
    # the products: a bf16 grad_bias summed from unrounded values can round to the other neighbour.
    g = _round_to(g * inv_temp, h_ptr.dtype.element_ty, INTERPRET)
    if GRAD_B:
        tl.atomic_add(grad_b_ptr + vcols, tl.reduce(g, 0, _add), mask=vcol_mask)
    if not INTERPRET:  # on the GPU the products run in the input dtype with fp32 accumulation
        g = g.to(h_ptr.dtype.element_ty)
    hcols = tl.arange(0, BLOCK_H)
    for k in range(0, H, BLOCK_H):
        kcols = k + hcols
        kmask = kcols < H
        if GRAD_H:
            w = tl.load(w_ptr + vcols[:, None] * stride_wv + kcols[None, :],
                        mask=vcol_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if INTERPRET:
                w = w.to(tl.float32)
            gh = tl.dot(g, w, input_precision=DOT_PRECISION)
            tl.atomic_add(grad_h_ptr + rows[:, None] * H + kcols[None, :], gh,
                          mask=row_mask[:, None] & kmask[None, :])  # fmt: skip
        if GRAD_W:
            h = tl.load(h_ptr + rows[:, None] * stride_hn + kcols[None, :],
                        mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if INTERPRET:
                h = h.to(tl.float32)
            gw = tl.dot(tl.trans(g), h, input_precision=DOT_PRECISION)
            tl.atomic_add(grad_w_ptr + vcols[:, None] * H + kcols[None, :], gw,
                          mask=vcol_mask[:, None] & kmask[None, :])  # fmt: skip


def _fused_blocks(interpret: bool, dtype: torch.dtype) -> dict:
    # One fixed config per mode (no autotuning, STYLE.md 8). The interpreter runs each program in numpy, so
    # small tiles keep it quick; on the GPU 64x128 tiles with a 64-wide reduction fit shared memory for
    # every dtype (32 for fp32, whose tiles are twice the bytes). fp32 products use exact fp32 (no TF32),
    # like torch.mm by default; the half types take Triton's default (their own tensor-core products).
    precision = "ieee" if dtype == torch.float32 or interpret else None
    if interpret:
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, DOT_PRECISION=precision)
    block_h = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=block_h, DOT_PRECISION=precision, num_warps=8)


def fused_forward(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    *,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, logp, entropy or None) without any logits buffer; row-contiguous inputs. logp, entropy: fp32
    [N]; lse: fp32 [2, N], the log-sum-exp as the exact sum lse[0] + lse[1] (what fused_backward takes)."""
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    assert hidden_NH.stride(1) == 1 and weight_VH.stride(1) == 1 and labels_N.is_contiguous()
    lse = torch.empty(2, N, device=hidden_NH.device, dtype=torch.float32)
    logp = torch.empty(N, device=hidden_NH.device, dtype=torch.float32)
    entropy = torch.empty_like(logp) if with_entropy else logp
    blocks = _fused_blocks(interpret, hidden_NH.dtype)
    if N:
        _fused_forward_kernel[(triton.cdiv(N, blocks["BLOCK_N"]),)](
            hidden_NH, weight_VH, bias_V if bias_V is not None else hidden_NH, labels_N, lse, logp, entropy,
            N, V, H, hidden_NH.stride(0), weight_VH.stride(0), inv_temp, ignore_index,
            HAS_BIAS=bias_V is not None, WITH_ENTROPY=with_entropy, INTERPRET=interpret, **blocks,
        )  # fmt: skip
    return lse, logp, (entropy if with_entropy else None)


def fused_backward(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor | None,
    dlogp_N: torch.Tensor,
    dentropy_N: torch.Tensor | None,
    *,
    inv_temp: float,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    interpret: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]), each None when not asked for.

    ``lse_N`` is fused_forward's [2, N] two-float log-sum-exp; ``dentropy_N`` None drops the entropy
    term. The gradients are fp32 because they are summed with atomics over vocabulary tiles
    (grad_hidden) and row tiles (grad_weight, grad_bias).
    """
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    dev = hidden_NH.device
    gh = torch.zeros(N, H, device=dev, dtype=torch.float32) if grad_hidden else None
    gw = torch.zeros(V, H, device=dev, dtype=torch.float32) if grad_weight else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if grad_bias else None
    with_entropy = dentropy_N is not None
    blocks = _fused_blocks(interpret, hidden_NH.dtype)
    if N and (grad_hidden or grad_weight or grad_bias):
        grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(V, blocks["BLOCK_V"]))
        _fused_backward_kernel[grid](
            hidden_NH, weight_VH, bias_V if bias_V is not None else hidden_NH, labels_N, lse_N,
            entropy_N if with_entropy else lse_N, dlogp_N, dentropy_N if with_entropy else dlogp_N,
            gh if gh is not None else lse_N, gw if gw is not None else lse_N, gb if gb is not None else lse_N,
            N, V, H, hidden_NH.stride(0), weight_VH.stride(0), inv_temp, ignore_index,
            HAS_BIAS=bias_V is not None, WITH_ENTROPY=with_entropy, INTERPRET=interpret,
            GRAD_H=grad_hidden, GRAD_W=grad_weight, GRAD_B=grad_bias, **blocks,
        )  # fmt: skip
    return gh, gw, gb
