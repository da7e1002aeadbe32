"""Triton kernel for the GRPO per-token loss and its gradient with respect to logp, in one pass.

The math (policy terms, normaliser, KL, engine IS weight, GSPO chain term) is that of
``fastrl.losses.grpo_math``, whose module docstring gives the formulas; this kernel is its fused form::

    loss_partial[b, j] = sum over the j-th block of row b of  c * (w * P + beta * q * K) + g_H * H
    grad[b, t]         = dloss / dlogp[b, t]

(``q`` the token ratio with the KL bias correction, else 1; ``g_H * H`` the entropy bonus, ``g_H`` its
per-token gradient, computed by the caller: the kernel only adds its value.)

Only builtins are used: ``tl.zeros``/``tl.sum``/``tl.sigmoid`` are ``@triton.jit`` helpers that the
interpreted copy of this module (``_runtime.kernels``) cannot call, so the sum is ``tl.reduce`` with the
combine function of ``_lang`` and constants come from ``tl.full``.

One program per (row, block of BLOCK_T tokens): every token is independent once the per-row quantities
(normaliser ``s_b``, and for sequence-level ratios ``log r_b`` and ``chain_b``) are known; the launcher's
caller computes those in PyTorch. Loads upcast to fp32 (fp64 for fp64 logp); masked tokens read nothing
but the mask, so padding may hold any value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrl.triton_kernels import _lang

POLICY_IDS = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}
_add = _lang.load().add  # tl.reduce combine function (see _lang.py)


@triton.jit
def _grpo_loss_kernel(
    # pointers
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    w_ptr,
    row_scale_ptr,
    seq_log_ratio_ptr,
    seq_chain_ptr,
    phi_ptr,
    ent_ptr,
    ent_grad_ptr,
    params_ptr,
    loss_ptr,
    grad_ptr,
    # shapes
    T,
    # strides (elements) of the [B, T] views; a stride of 0 broadcasts ([B] advantages, [B, 1] weights)
    stride_lb,
    stride_lt,
    stride_ob,
    stride_ot,
    stride_ab,
    stride_at,
    stride_mb,
    stride_mt,
    stride_rb,
    stride_rt,
    stride_wb,
    stride_wt,
    stride_pb,
    stride_pt,
    stride_hb,
    stride_ht,
    stride_gb,
    stride_gt,
    # constexprs
    POLICY: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_ENT: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty
    # Scalars come in a tensor of the compute dtype: Python floats would arrive as fp32 even for fp64 math.
    eps_low = tl.load(params_ptr + 0)
    eps_high = tl.load(params_ptr + 1)
    delta = tl.load(params_ptr + 2)
    beta = tl.load(params_ptr + 3)
    tau_pos = tl.load(params_ptr + 4)
    tau_neg = tl.load(params_ptr + 5)
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = t < T
    m = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=in_row, other=0).to(ACC)
    valid = m != 0.0
    logp = tl.load(logp_ptr + b * stride_lb + t * stride_lt, mask=valid, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + b * stride_ab + t * stride_at, mask=valid, other=0.0).to(ACC)
    coef = m * tl.load(row_scale_ptr + b).to(ACC)

    if SEQ_LEVEL:
        ratio = tl.full([BLOCK_T], 0.0, ACC) + tl.exp(tl.load(seq_log_ratio_ptr + b).to(ACC))
    else:
        old = tl.load(old_ptr + b * stride_ob + t * stride_ot, mask=valid, other=0.0).to(ACC)
        ratio = tl.exp(logp - old)
    if HAS_KL and KL_BIAS_CORRECTION:
        # The KL's importance weight is the token ratio, at the sequence level too.
        if SEQ_LEVEL:
            old = tl.load(old_ptr + b * stride_ob + t * stride_ot, mask=valid, other=0.0).to(ACC)
            token_ratio = tl.exp(logp - old)
        else:
            token_ratio = ratio

    # Policy term P, its direct derivative dP/dl and its derivative through the ratio dP/dr.
    zero = tl.full([BLOCK_T], 0.0, ACC)
    if POLICY == 0:  # clip
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        unclipped = ratio
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        p = -tl.minimum(unclipped * adv, clipped * adv)
        live = tl.where(adv > 0.0, ratio <= hi, ratio >= lo)
        if HAS_DELTA:
            live = live & (ratio <= delta)
        direct = zero
        d_ratio = tl.where(live, -adv, 0.0)
    elif POLICY == 1:  # cispo
        capped = tl.minimum(ratio, eps_high)
        p = -capped * adv * logp
        direct = -capped * adv
        d_ratio = zero
    elif POLICY == 3:  # vespo: the detached per-sequence gamma weight phi
        phi = tl.load(phi_ptr + b * stride_pb + t * stride_pt, mask=valid, other=0.0).to(ACC)
        p = -phi * adv * logp
        direct = -phi * adv
        d_ratio = zero
    else:  # sapo
        tau = tl.where(adv > 0.0, tau_pos, tau_neg).to(ACC)
        s = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
        p = -(4.0 / tau) * s * adv
        direct = zero
        d_ratio = -4.0 * s * (1.0 - s) * adv

    grad = direct
    if not SEQ_LEVEL:
        grad += d_ratio * ratio
    if HAS_W:
        w = tl.load(w_ptr + b * stride_wb + t * stride_wt, mask=valid, other=0.0).to(ACC)
        p = p * w
        grad = grad * w
    if HAS_KL:
        ref = tl.load(ref_ptr + b * stride_rb + t * stride_rt, mask=valid, other=0.0).to(ACC)
        d = ref - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        if KL_BIAS_CORRECTION:
            p += beta * token_ratio * kl
            grad += beta * token_ratio * (kl + 1.0 - e)
        else:
            p += beta * kl
            grad += beta * (1.0 - e)

    loss_t = coef * p
    if HAS_ENT:
        ent = tl.load(ent_ptr + b * stride_hb + t * stride_ht, mask=valid, other=0.0).to(ACC)
        ent_grad = tl.load(ent_grad_ptr + b * stride_gb + t * stride_gt, mask=valid, other=0.0).to(ACC)
        loss_t += ent_grad * ent
    tl.store(loss_ptr + b * tl.num_programs(1) + blk, tl.reduce(tl.where(valid, loss_t, 0.0), 0, _add))
    if COMPUTE_GRAD:
        grad = grad * coef
        if SEQ_LEVEL:
            grad += m * tl.load(seq_chain_ptr + b).to(ACC)
        tl.store(grad_ptr + b * T + t, tl.where(valid, grad, 0.0), mask=in_row)


def _block_t(T: int, interpret: bool) -> int:
    # The interpreter runs a tile as numpy arrays: bigger tiles mean fewer Python-level steps.
    return max(16, min(triton.next_power_of_2(T), 8192 if interpret else 1024))


def grpo_loss_fwd_bwd(
    logp_BT: torch.Tensor,
    old_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    row_scale_B: torch.Tensor,
    *,
    policy: str,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    tau_pos: float,
    tau_neg: float,
    kl_bias_correction: bool = False,
    ref_BT: torch.Tensor | None = None,
    w_BT: torch.Tensor | None = None,
    seq_log_ratio_B: torch.Tensor | None = None,
    seq_chain_B: torch.Tensor | None = None,
    phi_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
    entropy_grad_BT: torch.Tensor | None = None,
    compute_grad: bool = True,
    interpret: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel. ``adv_BT``/``w_BT``/``phi_BT`` may be stride-0 broadcast views; ``mask_BT`` any
    dtype. ``phi_BT`` is vespo's gamma weight (required there); ``entropy_BT`` with ``entropy_grad_BT`` adds
    the entropy bonus ``sum entropy_grad * entropy`` to the loss (its gradient is ``entropy_grad``).

    Returns ``(loss, grad)``: the scalar loss and ``dloss/dlogp`` [B, T] (None unless ``compute_grad``),
    both fp32 (fp64 for fp64 logp). ``row_scale_B``, ``seq_log_ratio_B`` and ``seq_chain_B`` must be
    contiguous in that dtype.
    """
    B, T = logp_BT.shape
    acc = torch.float64 if logp_BT.dtype == torch.float64 else torch.float32
    if B * T == 0:  # an empty grid is not a launch
        zeros = torch.zeros((B, T), dtype=acc, device=logp_BT.device)
        return zeros.sum(), zeros if compute_grad else None
    if mask_BT.dtype == torch.bool:
        mask_BT = mask_BT.view(torch.uint8)  # Triton pointers to bool are int1; bytes load the same values
    block_t = _block_t(T, interpret)
    n_blocks = triton.cdiv(T, block_t)
    partial = torch.empty((B, n_blocks), dtype=acc, device=logp_BT.device)
    grad = torch.empty((B, T), dtype=acc, device=logp_BT.device) if compute_grad else partial
    seq = seq_log_ratio_B is not None
    scalars = [eps_low, eps_high, 0.0 if delta is None else delta, beta, tau_pos, tau_neg]
    params = torch.tensor(scalars, dtype=acc, device=logp_BT.device)
    dummy = row_scale_B  # never read when its constexpr flag is off
    ref = ref_BT if beta != 0.0 else None
    assert (policy == "vespo") == (phi_BT is not None), "phi_BT goes with policy='vespo'"
    has_ent = entropy_grad_BT is not None
    assert not has_ent or entropy_BT is not None, "the entropy bonus needs entropy_BT"
    _grpo_loss_kernel[(B, n_blocks)](
        logp_BT,
        old_BT,
        adv_BT,
        mask_BT,
        dummy if ref is None else ref,
        dummy if w_BT is None else w_BT,
        row_scale_B,
        seq_log_ratio_B if seq else dummy,
        seq_chain_B if seq else dummy,
        dummy if phi_BT is None else phi_BT,
        entropy_BT if has_ent else dummy,
        entropy_grad_BT if has_ent else dummy,
        params,
        partial,
        grad,
        T,
        *logp_BT.stride(),
        *old_BT.stride(),
        *adv_BT.stride(),
        *mask_BT.stride(),
        *((0, 0) if ref is None else ref.stride()),
        *((0, 0) if w_BT is None else w_BT.stride()),
        *((0, 0) if phi_BT is None else phi_BT.stride()),
        *(entropy_BT.stride() if has_ent else (0, 0)),
        *(entropy_grad_BT.stride() if has_ent else (0, 0)),
        POLICY=POLICY_IDS[policy],
        HAS_DELTA=delta is not None,
        HAS_KL=ref is not None,
        KL_BIAS_CORRECTION=bool(kl_bias_correction) and ref is not None,
        HAS_W=w_BT is not None,
        HAS_ENT=has_ent,
        SEQ_LEVEL=seq,
        COMPUTE_GRAD=compute_grad,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return partial.sum(), grad if compute_grad else None
