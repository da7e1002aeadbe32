"""The GRPO loss family: ``grpo_loss(logp, old_logp, advantages, mask, ...) -> (loss, metrics)``.

Semantics follow TRL's ``GRPOTrainer`` (per-token loss, loss types, GSPO, delta, vLLM IS correction)::

    loss = sum_bt s_b * m_bt * (w_bt * P(r_bt, l_bt, A_bt) + beta * K_bt)

- ``r`` the policy ratio: ``exp(l - o)`` per token, or ``exp(masked mean over the sequence of l - o)``
  broadcast over its tokens (GSPO, Zheng et al. 2507.18071, ``importance_sampling_level="sequence"``).
- ``P`` the policy term of the loss type: the clipped surrogate (PPO; DAPO's clip-higher 2503.14476;
  INTELLECT-2's ``delta`` two-sided clip), CISPO's clipped-weight REINFORCE (2506.13585) or SAPO's soft
  gate (2511.20347). Formulas and gradients: ``fastrl.losses.grpo_math``.
- ``K = exp(ref - l) - (ref - l) - 1`` the k3 KL estimator (DeepSeekMath 2402.03300), when ``beta > 0``.
- ``w`` the engine importance-sampling weight (TRL's vLLM correction; Yao et al., "Your efficient RL
  framework secretly brings you off-policy RL training"), 1 without ``engine_logp``.
- ``s_b`` the normaliser of the loss type (``fastrl.losses.grpo_config``): grpo/sapo per-sequence mean,
  bnpo token mean, dr_grpo ``B * max_completion_length`` (Dr. GRPO 2503.20783), dapo/cispo
  ``num_items_in_batch``, so that micro-batches of one generation batch sum to the full-batch loss.
  TRL's division by the gradient-accumulation steps for grpo/bnpo/dr_grpo is left to the trainer.

Only ``logp`` gets a gradient; ``old_logp``, ``ref_logp``, ``engine_logp``, ``advantages`` are data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrl.losses.grpo_config import LOSS_TYPES, GRPOLossConfig, make_config, register_loss_type
from fastrl.losses.grpo_math import (
    compute_dtype,
    grpo_token_grad,
    grpo_token_terms,
    importance_weights,
    sequence_terms,
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
    is_weight: torch.Tensor | None  # [B, T] or [B, 1]
    is_outside: torch.Tensor | None
    seq_log_ratio: torch.Tensor | None  # [B], sequence level only
    seq_chain: torch.Tensor | None  # [B], sequence level only

    def token_tensors(self) -> dict[str, torch.Tensor | None]:
        """The per-token arguments of ``grpo_math.grpo_token_terms`` but logp and cfg, as [B, T] or
        broadcastable tensors (``old_logp`` None stands for logp itself)."""
        seq = self.seq_log_ratio is not None
        return dict(
            old_logp=self.old_logp,
            adv=self.adv,
            coef=self.coef,
            ref_logp=self.ref_logp,
            is_weight=self.is_weight,
            seq_ratio=torch.exp(self.seq_log_ratio)[:, None] if seq else None,
            seq_chain=self.mask.to(self.seq_chain.dtype) * self.seq_chain[:, None] if seq else None,
        )


def check_grpo_inputs(
    shape: tuple[int, int], old_logp, advantages, mask, ref_logp, engine_logp, cfg: GRPOLossConfig
) -> None:
    """ValueErrors for everything but logp, whose [B, T] shape is ``shape``."""
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("engine_logp", engine_logp)):
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
    check_same_device(
        old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, engine_logp=engine_logp
    )


def needs_full_logp(cfg: GRPOLossConfig, old_logp, engine_logp) -> bool:
    """Whether ``prepare_grpo`` needs the whole [B, T] logp before any token's gradient is known."""
    return cfg.importance_sampling_level == "sequence" or (old_logp is None and engine_logp is not None)


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
    dtype: torch.dtype = torch.float32,
) -> GRPOInputs:
    """Per-row normalisers, IS weights and (GSPO) sequence terms. ``logp`` (detached) is needed only for
    sequence-level ratios, or for IS weights when ``old_logp`` is None; pass None when neither applies."""
    m = mask.to(dtype)
    n_B = m.sum(-1)
    row_scale = LOSS_TYPES[cfg.loss_type].row_scale(n_B, cfg).to(dtype).contiguous()
    coef = m * row_scale[:, None]
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    old = None if old_logp is None else old_logp.detach()
    old_eff = logp if old is None else old
    w = outside = None
    if engine_logp is not None:
        assert old_eff is not None, "IS weights with old_logp=None need logp"
        w, outside = importance_weights(old_eff, engine_logp, mask, cfg)
    seq_log_ratio = seq_chain = None
    if cfg.importance_sampling_level == "sequence":
        assert logp is not None, "sequence-level ratios need logp"
        seq_log_ratio, seq_chain = sequence_terms(logp, old_eff, adv, mask, coef, cfg, is_weight=w)
    ref = None if ref_logp is None else ref_logp.detach()
    return GRPOInputs(cfg, mask, coef, row_scale, adv, old, ref, w, outside, seq_log_ratio, seq_chain)


def _torch_terms(logp: torch.Tensor, p: GRPOInputs, need_grad: bool):
    args = p.token_tensors()
    if args["old_logp"] is None:
        args["old_logp"] = logp
    return grpo_token_terms(logp, cfg=p.cfg, need_grad=need_grad, **args)


def _triton_terms(logp: torch.Tensor, p: GRPOInputs, need_grad: bool):
    from fastrl.triton_kernels._runtime import interpreting, kernels

    cfg = p.cfg
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
        ref_BT=p.ref_logp,
        w_BT=None if p.is_weight is None else p.is_weight.expand(logp.shape),
        seq_log_ratio_B=p.seq_log_ratio,
        seq_chain_B=p.seq_chain,
        compute_grad=need_grad,
        interpret=interpreting(logp.device),
    )


class GRPOLossFunction(torch.autograd.Function):
    """Loss and its gradient in one forward pass; the backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, inputs: GRPOInputs, impl: str, need_grad: bool):
        if impl == "triton":
            loss, grad = _triton_terms(logp.detach(), inputs, need_grad)
        else:
            loss_t, grad = _torch_terms(logp.detach(), inputs, need_grad)
            loss = loss_t.sum()
        ctx.logp_dtype = logp.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logp_dtype), None, None, None


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
    return out


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    engine_logp: torch.Tensor | None = None,
    config: GRPOLossConfig | None = None,
    impl: str = "auto",
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family loss (module docstring) and its metrics.

    Args:
        logp: [B, T] per-token log-probs of the policy (float; gets the gradient).
        old_logp: [B, T] log-probs of the policy that generated the batch; None means ``logp.detach()``
            (one iteration per generation, ratio 1).
        advantages: [B] per-sequence, or [B, T] per-token advantages.
        mask: [B, T] completion mask (bool, int or float; float values weight the tokens).
        ref_logp: [B, T] reference log-probs; required when ``beta > 0``, and gives the ``kl`` metric.
        engine_logp: [B, T] log-probs of the generating engine: enables the IS correction (``is_mode``).
        config: a ``GRPOLossConfig``; ``**options`` (its field names) override it or build one.
        impl: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" (interpreted on the CPU) or "torch".

    Returns ``(loss, metrics)``: a scalar fp32 loss (fp64 for fp64 logp) and detached scalar metrics
    ``ratio/{mean,min,max}``, ``clip_ratio/{low,high,region}`` (clip types) or ``clip_ratio/cispo``,
    ``kl`` (with ref_logp), ``is_weight/mean`` and ``is_weight/{truncated,masked}_frac`` (with
    engine_logp); ``ratio/min``/``ratio/max`` are NaN when no token is unmasked. A sequence whose mask
    is all 0 contributes 0 to the loss (never NaN).
    """
    cfg = make_config(config, options)
    check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    check_grpo_inputs(tuple(logp.shape), old_logp, advantages, mask, ref_logp, engine_logp, cfg)
    check_same_device(logp=logp, mask=mask)
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
        dtype=compute_dtype(logp),
    )
    need_grad = torch.is_grad_enabled() and logp.requires_grad
    loss = GRPOLossFunction.apply(logp, inputs, impl, need_grad)
    return loss, grpo_metrics(logp.detach(), inputs)
