"""The GRPO loss family: ``grpo_loss(logp, old_logp, advantages, mask, ...) -> (loss, metrics)``.

Semantics follow TRL's ``GRPOTrainer`` (1.16); the formula is written out in ``grpo_loss``'s docstring, the
per-token gradients in ``fastrl.losses.grpo_math``. Only ``logp`` (and ``entropy``, for the entropy bonus)
get a gradient; ``old_logp``, ``ref_logp``, ``engine_logp``, ``advantages`` are data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrl.losses.grpo_config import LOSS_TYPES, GRPOLossConfig, make_config, register_loss_type
from fastrl.losses.grpo_math import (
    compute_dtype,
    entropy_mask,
    grpo_token_grad,
    grpo_token_terms,
    importance_weights,
    off_policy_mask,
    sequence_terms,
    vespo_weights,
)
from fastrl.ops._common import check_float, check_same_device, resolve_impl

__all__ = [
    "GRPOLossConfig",
    "LOSS_TYPES",
    "grpo_loss",
    "grpo_token_grad",
    "prepare_grpo",
    "register_loss_type",
]


@dataclass
class GRPOInputs:
    """Everything but logp, ready for the per-token math: [B, T] (or broadcastable) tensors."""

    cfg: GRPOLossConfig
    mask: torch.Tensor  # as given (any dtype)
    coef: torch.Tensor  # c = m * s_b, compute dtype
    row_scale: torch.Tensor  # s_b [B], compute dtype
    adv: torch.Tensor  # [B, 1] or [B, T]
    old_logp: torch.Tensor | None  # None: logp.detach()
    ref_logp: torch.Tensor | None
    is_weight: torch.Tensor | None  # engine IS weight, [B, T] or [B, 1]
    is_outside: torch.Tensor | None
    seq_log_ratio: torch.Tensor | None  # [B], sequence level only
    seq_chain: torch.Tensor | None  # [B], sequence level only
    policy_weight: torch.Tensor | None = None  # w of grpo_math: IS weight x off-policy mask x entropy mask
    phi: torch.Tensor | None = None  # vespo gamma weights, [B, 1] or [B, T]
    keep_off_policy: torch.Tensor | None = None  # off-policy mask, [B, 1] or [B, T]
    keep_entropy: torch.Tensor | None = None  # entropy quantile mask, [B, T]
    entropy_grad: torch.Tensor | None = None  # dloss/dentropy [B, T] of the entropy bonus
    nan_engine: torch.Tensor | None = None  # count of valid tokens with a NaN engine log-prob

    def token_tensors(self) -> dict[str, torch.Tensor | None]:
        """The per-token arguments of ``grpo_math.grpo_token_terms`` but logp and cfg, as [B, T] or
        broadcastable tensors (``old_logp`` None stands for logp itself)."""
        seq = self.seq_log_ratio is not None
        return dict(
            old_logp=self.old_logp,
            adv=self.adv,
            coef=self.coef,
            ref_logp=self.ref_logp,
            is_weight=self.policy_weight,
            seq_ratio=torch.exp(self.seq_log_ratio)[:, None] if seq else None,
            seq_chain=self.mask.to(self.seq_chain.dtype) * self.seq_chain[:, None] if seq else None,
            phi=self.phi,
        )


def check_grpo_inputs(
    shape: tuple[int, int],
    old_logp,
    advantages,
    mask,
    ref_logp,
    engine_logp,
    cfg: GRPOLossConfig,
    entropy=None,
    *,
    entropy_given: bool = False,
) -> None:
    """ValueErrors for everything but logp, whose [B, T] shape is ``shape``. ``entropy_given``: the caller
    computes the entropy itself (the fused module), so ``entropy`` None is fine."""
    tensors = (
        ("old_logp", old_logp),
        ("ref_logp", ref_logp),
        ("engine_logp", engine_logp),
        ("entropy", entropy),
    )
    for name, t in tensors:
        if t is not None:
            check_float(name, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have the [B, T] shape {shape}, got {tuple(t.shape)}")
    check_float("advantages", advantages)
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(
            f"advantages must have shape [B] = ({shape[0]},) or [B, T] = {shape}, "
            f"got {tuple(advantages.shape)}"
        )
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of the [B, T] shape {shape}, got {got}")
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} > 0 needs ref_logp (the reference policy's log-probs), got None")
    if cfg.needs_entropy and entropy is None and not entropy_given:
        raise ValueError(
            f"top_entropy_quantile={cfg.top_entropy_quantile} / entropy_coef={cfg.entropy_coef} need entropy "
            "(the [B, T] per-token entropy of the policy), got None"
        )
    if cfg.policy == "vespo" and engine_logp is not None and cfg.is_mode.startswith("sequence"):
        raise ValueError(
            f"loss_type='vespo' folds token-level engine IS weights into its gamma weight: is_mode must be "
            f"token_truncate or token_mask, got {cfg.is_mode!r}"
        )
    check_same_device(
        old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, engine_logp=engine_logp
    )


def needs_full_logp(cfg: GRPOLossConfig, old_logp, engine_logp) -> bool:
    """Whether ``prepare_grpo`` needs the whole [B, T] logp before any token's gradient is known: sequence
    ratios, IS weights from logp itself, vespo's sequence ratio, the off-policy mask's sequence KL."""
    return (
        cfg.importance_sampling_level == "sequence"
        or (old_logp is None and engine_logp is not None)
        or (cfg.policy == "vespo" and old_logp is not None)
        or (cfg.off_policy_mask_threshold is not None and (old_logp is not None or engine_logp is not None))
    )


@torch.no_grad()
def prepare_grpo(
    logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    engine_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> GRPOInputs:
    """Per-row normalisers, IS weights, masks, vespo weights and (GSPO) sequence terms. ``logp`` (detached)
    is needed where ``needs_full_logp`` says so, ``entropy`` for ``top_entropy_quantile < 1`` or an
    ``entropy_coef``; pass None where they do not apply."""
    m = mask.to(dtype)
    n_B = m.sum(-1)
    row_scale = LOSS_TYPES[cfg.loss_type].row_scale(n_B, cfg).to(dtype).contiguous()
    coef = m * row_scale[:, None]
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    old = None if old_logp is None else old_logp.detach()
    old_eff = logp if old is None else old
    w = outside = nan_engine = None
    if engine_logp is not None:
        assert old_eff is not None, "IS weights with old_logp=None need logp"
        w, outside, nan_engine = importance_weights(old_eff, engine_logp, mask, cfg)
    # The policy weight: every data factor of the policy term (grpo_math's w).
    factors = [] if w is None or cfg.policy == "vespo" else [w]
    keep_op = keep_ent = None
    if cfg.off_policy_mask_threshold is not None:
        sampling = engine_logp if engine_logp is not None else old_eff
        if sampling is None:  # old_logp None and no engine: sampled by the policy itself, KL 0
            keep_op = torch.ones_like(adv, dtype=dtype)
        else:
            keep_op = off_policy_mask(logp, sampling, adv.to(dtype), mask, cfg.off_policy_mask_threshold)
        factors.append(keep_op)
    if cfg.top_entropy_quantile < 1.0:
        keep_ent = entropy_mask(entropy, mask, cfg.top_entropy_quantile).to(dtype)
        factors.append(keep_ent)
    policy_weight = None
    for f in factors:
        policy_weight = f if policy_weight is None else policy_weight * f
    phi = None
    if cfg.policy == "vespo":
        phi = vespo_weights(logp, old, adv, mask, cfg, is_weight=w).to(dtype)
    entropy_grad = None
    if cfg.entropy_coef != 0.0:
        # Bonus = entropy_coef * mean of H over the tokens the policy term trains on.
        eff = m if keep_ent is None else m * keep_ent
        entropy_grad = -cfg.entropy_coef * eff / eff.sum().clamp(min=1.0)
    seq_log_ratio = seq_chain = None
    if cfg.importance_sampling_level == "sequence":
        assert logp is not None, "sequence-level ratios need logp"
        seq_log_ratio, seq_chain = sequence_terms(
            logp, old_eff, adv, mask, coef, cfg, is_weight=policy_weight
        )
    ref = None if ref_logp is None else ref_logp.detach()
    return GRPOInputs(
        cfg, mask, coef, row_scale, adv, old, ref, w, outside, seq_log_ratio, seq_chain,
        policy_weight=policy_weight, phi=phi, keep_off_policy=keep_op, keep_entropy=keep_ent,
        entropy_grad=entropy_grad, nan_engine=nan_engine,
    )  # fmt: skip


def _torch_terms(logp: torch.Tensor, p: GRPOInputs, need_grad: bool):
    args = p.token_tensors()
    if args["old_logp"] is None:
        args["old_logp"] = logp
    return grpo_token_terms(logp, cfg=p.cfg, need_grad=need_grad, **args)


def _triton_terms(logp: torch.Tensor, p: GRPOInputs, entropy: torch.Tensor | None, need_grad: bool):
    from fastrl.triton_kernels._runtime import interpreting, kernels

    cfg = p.cfg
    w = p.policy_weight
    return kernels("grpo", logp.device).grpo_loss_fwd_bwd(
        logp,
        logp if p.old_logp is None else p.old_logp,
        p.adv.expand(logp.shape),
        p.mask,
        p.row_scale,
        policy=cfg.policy,
        eps_low=cfg.epsilon_low,
        eps_high=cfg.eps_high,
        delta=cfg.delta,
        beta=cfg.beta,
        tau_pos=cfg.sapo_temperature_pos,
        tau_neg=cfg.sapo_temperature_neg,
        kl_bias_correction=cfg.use_bias_correction_kl,
        ref_BT=p.ref_logp,
        w_BT=None if w is None else w.expand(logp.shape),
        seq_log_ratio_B=p.seq_log_ratio,
        seq_chain_B=p.seq_chain,
        phi_BT=None if p.phi is None else p.phi.expand(logp.shape),
        entropy_BT=None if p.entropy_grad is None else entropy,
        entropy_grad_BT=p.entropy_grad,
        compute_grad=need_grad,
        interpret=interpreting(logp.device),
    )


class GRPOLossFunction(torch.autograd.Function):
    """Loss and its gradient in one forward pass; the backward scales the stored gradient. The entropy
    bonus is linear in the entropy: its gradient is the constant ``inputs.entropy_grad``."""

    @staticmethod
    def forward(ctx, logp, entropy, inputs: GRPOInputs, impl: str, need_grad: bool):
        if impl == "triton":
            loss, grad = _triton_terms(logp.detach(), inputs, entropy, need_grad)
        else:
            loss_t, grad = _torch_terms(logp.detach(), inputs, need_grad)
            loss = loss_t.sum()
            if inputs.entropy_grad is not None:
                loss = loss + (inputs.entropy_grad * entropy.detach().to(loss.dtype)).sum()
        ctx.logp_dtype = logp.dtype
        ctx.entropy_dtype = None if entropy is None else entropy.dtype
        ctx.entropy_grad = inputs.entropy_grad
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logp = grad_entropy = None
        if ctx.saved_tensors:  # empty when logp needs no gradient (only the entropy does)
            grad_logp = (ctx.saved_tensors[0] * grad_loss).to(ctx.logp_dtype)
        if ctx.entropy_dtype is not None and ctx.entropy_grad is not None:
            grad_entropy = (ctx.entropy_grad * grad_loss).to(ctx.entropy_dtype)
        return grad_logp, grad_entropy, None, None, None


def _masked_extreme(x: torch.Tensor, valid: torch.Tensor, fill: float) -> torch.Tensor:
    # The fill value doubles as a sentinel element so that amin/amax also work on empty batches.
    return torch.cat([torch.where(valid, x, fill).reshape(-1), x.new_full((1,), fill)])


@torch.no_grad()
def grpo_metrics(logp: torch.Tensor, p: GRPOInputs) -> dict[str, torch.Tensor]:
    """Detached masked means over the tokens (mask weights): ratio stats, clip fractions, KL, IS stats."""
    cfg = p.cfg
    dt = p.coef.dtype
    m = p.mask.to(dt)
    valid = m != 0
    n = m.sum().clamp(min=1.0)
    lp = torch.where(valid, logp.to(dt), 0.0)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (torch.where(valid, x.to(dt).expand(m.shape), 0.0) * m).sum() / n

    if p.seq_log_ratio is not None:
        ratio = torch.exp(p.seq_log_ratio)[:, None].expand(m.shape)
    elif p.old_logp is None:
        ratio = torch.ones_like(lp)
    else:
        ratio = torch.exp(lp - torch.where(valid, p.old_logp.to(dt), 0.0))
    nan = torch.full((), float("nan"), dtype=dt, device=m.device)
    any_valid = valid.any()
    out = {
        "ratio/mean": mean(ratio),
        "ratio/min": torch.where(any_valid, _masked_extreme(ratio, valid, float("inf")).amin(), nan),
        "ratio/max": torch.where(any_valid, _masked_extreme(ratio, valid, float("-inf")).amax(), nan),
    }
    adv = p.adv.to(dt)
    if cfg.policy == "clip":
        low = (ratio < 1.0 - cfg.epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + cfg.eps_high) & (adv > 0)
        out["clip_ratio/low"] = mean(low)
        out["clip_ratio/high"] = mean(high)
        out["clip_ratio/region"] = mean(low | high)
    elif cfg.policy == "cispo":
        out["clip_ratio/cispo"] = mean((ratio > cfg.eps_high) & (adv > 0))
    if p.ref_logp is not None:
        d = torch.where(valid, p.ref_logp.to(dt), 0.0) - lp
        out["kl"] = mean(torch.exp(d) - d - 1.0)
    if p.is_weight is not None:
        out["is_weight/mean"] = mean(p.is_weight)
        key = "is_weight/truncated_frac" if cfg.is_mode.endswith("truncate") else "is_weight/masked_frac"
        out[key] = mean(p.is_outside)
        out["is_weight/nan_engine_logp"] = p.nan_engine  # a count of tokens, not a fraction
    if p.phi is not None:
        out["vespo/phi_mean"] = mean(p.phi)
    if p.keep_off_policy is not None:
        out["off_policy_mask/masked_frac"] = mean(1.0 - p.keep_off_policy)
    if p.keep_entropy is not None:
        out["entropy_mask/kept_frac"] = mean(p.keep_entropy)
    return out


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    engine_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    config: GRPOLossConfig | None = None,
    impl: str = "auto",
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family loss and its metrics (TRL ``GRPOTrainer`` semantics)::

        loss = sum_bt s_b * m_bt * (w_bt * P(r_bt, l_bt, A_bt) + beta * q_bt * K_bt)  -  entropy_coef * H_bar

    - ``l`` = logp, ``o`` = old_logp, ``m`` = mask, ``A`` = advantages.
    - ``r`` the policy ratio: ``exp(l - o)`` per token, or ``exp(sum_t m (l - o) / max(n_b, 1))`` broadcast
      over the sequence (GSPO, Zheng et al. 2507.18071, ``importance_sampling_level="sequence"``).
    - ``P`` the policy term of ``loss_type`` (``fastrl.losses.grpo_math`` has each and its gradient):
      grpo/bnpo/dr_grpo/dapo/luspo: ``-min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)``
      (PPO; DAPO's clip-higher 2503.14476; INTELLECT-2's ``delta``); cispo: ``-sg(min(r, eps_high)) A l``
      (MiniMax-M1 2506.13585); sapo: ``-(4 / tau) sigmoid(tau (r - 1)) A`` (2511.20347); vespo:
      ``-sg(phi_b) A l`` with ``phi_b = exp(lambda + k log w_b - lambda w_b)``, ``w_b`` the clamped sequence
      ratio ``prod_t r_t`` times the token engine IS weights (VESPO 2602.10693; ``grpo_math.vespo_weights``).
    - ``K = exp(ref - l) - (ref - l) - 1`` the k3 KL estimator (DeepSeekMath 2402.03300), when
      ``beta > 0``; ``q = exp(l - o)`` (differentiated) with ``use_bias_correction_kl`` (TRL's default,
      DeepSeek-V3.2 2512.02556), else 1. ``q`` is the token ratio at both levels: under GSPO, TRL
      multiplies K by the sequence ratio instead (its open issue #6586), which is not the importance
      weight of a per-token KL sample.
    - ``w`` the policy weight, the product of: the engine IS weight (TRL's vLLM correction; Yao et al.,
      "Your efficient RL framework secretly brings you off-policy RL training"; ``is_mode``; a NaN engine
      log-prob on a valid token counts as weight 1 and is counted in ``is_weight/nan_engine_logp``; not for
      vespo, where it is inside ``phi``), the off-policy sequence mask ``[A >= 0 or mean_t m (s - l) <=
      off_policy_mask_threshold]`` (DeepSeek-V3.2 Eq. 9, ``s`` the engine log-probs, else old_logp) and the
      entropy mask ``[H >= quantile(H over valid tokens, 1 - top_entropy_quantile)]`` (2506.01939).
    - ``s_b`` the normaliser (``fastrl.losses.grpo_config``): grpo/sapo ``1 / (B max(n_b, 1))``, bnpo
      ``1 / max(sum n, 1)``, dr_grpo ``1 / (B max_completion_length)`` (Dr. GRPO 2503.20783), luspo
      ``1 / B`` (LUSPO 2602.05261), dapo/cispo/vespo ``1 / num_items_in_batch``, so that micro-batches of
      one generation batch sum to the full-batch loss.
    - ``H_bar = sum_bt e_bt H_bt / max(sum_bt e_bt, 1)``, ``e = m * entropy mask``: the entropy bonus, the
      mean entropy of the tokens the policy term trains on, whatever the loss type (as TRL).

    TRL divides grpo, bnpo, dr_grpo, sapo, luspo and the entropy bonus by the gradient-accumulation steps;
    here that division is the caller's (fastrl's trainer divides every loss by them, with dapo/cispo/vespo's
    ``num_items_in_batch`` counted per accumulation window).

    Args:
        logp: [B, T] per-token log-probs of the policy (float; gets the gradient).
        old_logp: [B, T] log-probs of the policy that generated the batch; None means ``logp.detach()``
            (one iteration per generation, ratio 1).
        advantages: [B] per-sequence, or [B, T] per-token advantages.
        mask: [B, T] completion mask (bool, int or float; float values weight the tokens).
        ref_logp: [B, T] reference log-probs; required when ``beta > 0``, and gives the ``kl`` metric.
        engine_logp: [B, T] log-probs of the generating engine: enables the IS correction (``is_mode``).
        entropy: [B, T] per-token entropy of the policy; required with ``top_entropy_quantile < 1`` or
            ``entropy_coef != 0``; gets the entropy bonus's gradient when it requires grad.
        config: a ``GRPOLossConfig``; ``**options`` (its field names) override it or build one.
        impl: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" (interpreted on the CPU) or "torch".

    Returns ``(loss, metrics)``: a scalar fp32 loss (fp64 for fp64 logp) and detached scalar metrics
    ``ratio/{mean,min,max}``, ``clip_ratio/{low,high,region}`` (clip types) or ``clip_ratio/cispo``,
    ``kl`` (with ref_logp; the unweighted K), ``is_weight/mean``, ``is_weight/{truncated,masked}_frac`` and
    ``is_weight/nan_engine_logp`` (with engine_logp), ``vespo/phi_mean``, ``off_policy_mask/masked_frac``,
    ``entropy_mask/kept_frac`` (when those apply); ``ratio/min``/``ratio/max`` are NaN when no token is
    unmasked. A sequence whose mask is all 0 contributes 0 to the loss (never NaN).
    """
    cfg = make_config(config, options)
    check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    check_grpo_inputs(tuple(logp.shape), old_logp, advantages, mask, ref_logp, engine_logp, cfg, entropy)
    check_same_device(logp=logp, mask=mask, entropy=entropy)
    impl = resolve_impl(impl, logp.device)
    need_full_logp = needs_full_logp(cfg, old_logp, engine_logp)
    inputs = prepare_grpo(
        logp.detach() if need_full_logp else None,
        old_logp,
        advantages,
        mask,
        cfg,
        ref_logp=ref_logp,
        engine_logp=engine_logp,
        entropy=None if entropy is None else entropy.detach(),
        dtype=compute_dtype(logp),
    )
    if not cfg.needs_entropy:
        entropy = None  # not read: no gradient to it either
    need_grad = torch.is_grad_enabled() and logp.requires_grad
    loss = GRPOLossFunction.apply(logp, entropy, inputs, impl, need_grad)
    return loss, grpo_metrics(logp.detach(), inputs)
