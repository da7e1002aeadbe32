"""Per-token GRPO math in plain PyTorch, with its closed-form gradient written once.

Notation (per token; ``l`` = logp, ``o`` = old_logp, ``A`` = advantage, ``w`` = policy weight or 1)::

    r = exp(l - o)                                               token-level ratio
    r = exp(sum_t m_t (l_t - o_t) / max(n, 1))                   sequence level (GSPO), one r per sequence
    L = w * P(r, l, A) + beta * q * K,   K = exp(ref - l) - (ref - l) - 1     (k3 estimator, Schulman 2020)
    q = exp(l - o) (the token ratio, also at sequence level) with use_bias_correction_kl, else 1

``w`` multiplies the engine IS weight (not for vespo, whose phi already holds it), the off-policy sequence
mask and the entropy quantile mask (``fastrl.losses.grpo.prepare_grpo``); all are data (no gradient).

Policy terms ``P`` and their derivatives (``lo = 1 - eps_low``, ``hi = 1 + eps_high``)::

    clip   P = -min(min(r, delta) * A, clip(r, lo, hi) * A)       PPO / DAPO clip-higher, delta: INTELLECT-2
           dP/dr = -A * [r <= hi if A > 0 else r >= lo] * [r <= delta]
    cispo  P = -sg(min(r, eps_high)) * A * l                      MiniMax-M1 (2506.13585)
           dP/dl = -min(r, eps_high) * A   (the ratio is detached: dP/dr = 0)
    sapo   P = -(4 / tau) * sigmoid(tau * (r - 1)) * A,  tau = tau_pos if A > 0 else tau_neg   (2511.20347)
           dP/dr = -4 * s * (1 - s) * A,  s = sigmoid(tau * (r - 1))
    vespo  P = -sg(phi_b) * A * l,  phi_b the sequence's gamma weight (``vespo_weights``)   (2602.10693)
           dP/dl = -phi_b * A

The boundaries of the clip indicators are inclusive, matching what autograd gives for ``torch.min`` /
``torch.clamp`` (a tie between the two branches splits the gradient in halves that add back up).

The loss is ``sum_bt c_bt * L_bt`` with ``c_bt = m_bt * s_b`` (the normaliser, ``grpo_config``). Its
gradient with respect to ``l_bt`` (``dK/dl = 1 - exp(ref - l)``, ``dq/dl = q``)::

    token level      c * (w * (dP/dl + dP/dr * r) + beta * q * (K + 1 - exp(ref - l)))
    sequence level   c * (w * dP/dl + beta * q * (K + 1 - exp(ref - l))) + m_bt * chain_b,
                     chain_b = r_b / max(n_b, 1) * sum_t c_bt * w_bt * dP/dr(r_b, A_bt)

(without the bias correction the KL part is ``beta * (1 - exp(ref - l))``). Masked tokens (``m = 0``)
contribute exactly 0 to the loss and get a 0 gradient, whatever their values.
"""

from __future__ import annotations

import math

import torch

from fastrl.losses.grpo_config import GRPOLossConfig


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The math runs in fp32, or in fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def policy_terms(
    ratio: torch.Tensor,
    logp: torch.Tensor,
    adv: torch.Tensor,
    cfg: GRPOLossConfig,
    phi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(P, dP/dl direct or None, dP/dr or None)`` elementwise, for ``cfg.policy`` (``phi``: vespo)."""
    policy = cfg.policy
    if policy == "vespo":
        assert phi is not None, "vespo needs its gamma weights"
        return -phi * adv * logp, -phi * adv, None
    if policy == "clip":
        lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.eps_high
        unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        loss = -torch.minimum(unclipped * adv, ratio.clamp(lo, hi) * adv)
        live = torch.where(adv > 0, ratio <= hi, ratio >= lo)
        if cfg.delta is not None:
            live = live & (ratio <= cfg.delta)
        return loss, None, torch.where(live, -adv, 0.0)
    if policy == "cispo":
        capped = ratio.clamp(max=cfg.eps_high)
        return -capped * adv * logp, -capped * adv, None
    assert policy == "sapo", policy
    # 0-d tensors, not Python floats: torch.where would round those to the default (fp32) dtype.
    tau_pos, tau_neg = (ratio.new_tensor(t) for t in (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg))
    tau = torch.where(adv > 0, tau_pos, tau_neg)
    s = torch.sigmoid(tau * (ratio - 1.0))
    return -(4.0 / tau) * s * adv, None, -4.0 * s * (1.0 - s) * adv


def grpo_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    coef: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    seq_ratio: torch.Tensor | None = None,
    seq_chain: torch.Tensor | None = None,
    phi: torch.Tensor | None = None,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``(c * L, dloss/dlogp)`` (module docstring), the gradient None when not ``need_grad``.

    All tensors broadcast to ``logp``'s shape: ``coef`` is ``c = m * s_b``; ``seq_ratio`` (sequence level)
    is ``r_b`` and ``seq_chain`` the ``m_bt * chain_b`` term, both from ``sequence_terms``; ``is_weight`` is
    the policy weight ``w``; ``phi`` the vespo gamma weight. The math runs in
    fp32 (fp64 for fp64 ``logp``); the results are in that dtype.
    """
    dt = compute_dtype(logp)
    lp, o, a, c = logp.to(dt), old_logp.to(dt), adv.to(dt), coef.to(dt)
    valid = c != 0
    # Masked tokens may hold anything (padding, -inf): zero them before any exp.
    lp, o = torch.where(valid, lp, 0.0), torch.where(valid, o, 0.0)
    ratio = torch.exp(lp - o) if seq_ratio is None else seq_ratio.to(dt)
    p, direct, d_ratio = policy_terms(ratio, lp, a, cfg, None if phi is None else phi.to(dt))
    grad = None
    if need_grad:
        grad = torch.zeros_like(lp) if direct is None else direct
        if d_ratio is not None and seq_ratio is None:
            grad = grad + d_ratio * ratio
    if is_weight is not None:
        w = is_weight.to(dt)
        p = p * w
        grad = None if grad is None else grad * w
    if cfg.beta != 0.0:
        assert ref_logp is not None
        d = torch.where(valid, ref_logp.to(dt), 0.0) - lp
        e = torch.exp(d)
        kl, d_kl = e - d - 1.0, 1.0 - e
        if cfg.use_bias_correction_kl:
            q = torch.exp(lp - o)  # the token ratio, whatever the importance-sampling level
            kl, d_kl = q * kl, q * (kl + d_kl)
        p = p + cfg.beta * kl
        grad = None if grad is None else grad + cfg.beta * d_kl
    loss_t = torch.where(valid, c * p, 0.0)
    if grad is not None:
        grad = grad * c
        if seq_chain is not None:
            grad = grad + seq_chain.to(dt)
        grad = torch.where(valid, grad, 0.0)
    return loss_t, grad


def grpo_token_grad(logp, old_logp, adv, coef, cfg, **kwargs) -> torch.Tensor:
    """``dloss/dlogp`` per token: the closed form of ``grpo_token_terms`` (same arguments)."""
    return grpo_token_terms(logp, old_logp, adv, coef, cfg, need_grad=True, **kwargs)[1]


def importance_weights(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cfg: GRPOLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Engine importance-sampling weights ``(w, outside, nan_count)`` (``w`` [B, T], or [B, 1] for sequence
    modes; ``nan_count`` a 0-d count of valid tokens whose engine log-prob is NaN).

    ``diff = old_logp - engine_logp`` on valid tokens, 0 elsewhere; a NaN engine log-prob on a valid token
    (an engine that could not score it: vLLM returns None there) also gives 0, i.e. weight 1, "no
    correction", as TRL does (its PR #6693). Token modes: ``w = exp(diff)``; sequence modes:
    ``w = exp(sum_t m diff)``. ``*_truncate`` clamps w to ``[is_clip_min, is_clip_max]``; ``*_mask`` sets w
    to 0 outside it. ``outside`` flags the weights that were changed. Detached.
    """
    dt = compute_dtype(old_logp)
    valid = mask != 0
    engine = engine_logp.detach().to(dt)
    unscored = valid & torch.isnan(engine)
    diff = torch.where(valid & ~unscored, old_logp.detach().to(dt) - engine, 0.0)
    if cfg.is_mode.startswith("sequence"):
        diff = (diff * mask.to(dt)).sum(-1, keepdim=True)
    w = torch.exp(diff)
    lo = 0.0 if cfg.is_clip_min is None else cfg.is_clip_min
    hi = float("inf") if cfg.is_clip_max is None else cfg.is_clip_max
    outside = (w < lo) | (w > hi)
    if cfg.is_mode.endswith("truncate"):
        w = w.clamp(min=lo, max=hi)
    else:
        w = torch.where(outside, 0.0, w)
    return w, outside, unscored.sum().to(dt)


def vespo_weights(
    logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    is_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """VESPO's gamma weights ``phi`` ([B, 1], or [B, T] for [B, T] advantages); detached.

    With ``u = log 1e-8``, ``clamp`` elementwise::

        log w_b = clamp(sum_t m_t clamp(l_t - o_t, -20, 20) + sum_t [m_t != 0] clamp(log is_t, u, 20), u, 20)
        phi     = exp(lambda + k log w_b - lambda w_b)        (phi(1) = 1; NaN or inf -> 0)

    ``(k, lambda) = (vespo_k_pos, vespo_lambda_pos)`` where ``A >= 0``, else the ``_neg`` pair, lambda floored
    at 1e-4; ``is_t`` the token-level engine IS weight (the engine correction enters phi, not the loss).
    ``logp`` None (or ``old_logp`` None: ratio 1) drops the first sum. [B, T] inputs; TRL's clamps.
    """
    dt = compute_dtype(adv if logp is None else logp)
    m = mask.to(dt)
    valid = m != 0
    lower = math.log(1e-8)
    log_w = torch.zeros(m.shape[0], 1, dtype=dt, device=m.device)
    if logp is not None and old_logp is not None:
        lr = torch.where(valid, logp.detach().to(dt) - old_logp.detach().to(dt), 0.0)
        log_w = log_w + (lr.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    if is_weight is not None:
        assert is_weight.shape == m.shape, "vespo takes token-level IS weights"
        log_is = torch.log(is_weight.to(dt)).clamp(lower, 20.0)
        log_w = log_w + torch.where(valid, log_is, 0.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(lower, 20.0)
    a = adv.to(dt)
    nonneg = a >= 0
    k = torch.where(nonneg, log_w.new_tensor(cfg.vespo_k_pos), log_w.new_tensor(cfg.vespo_k_neg))
    lam = torch.where(nonneg, log_w.new_tensor(cfg.vespo_lambda_pos), log_w.new_tensor(cfg.vespo_lambda_neg))
    lam = lam.clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(
    logp: torch.Tensor, sampling_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (2512.02556, Eq. 9): 1 = keep, 0 = drop; detached.

    ``keep = [A >= 0] or [sum_t m_t (s_t - l_t) / max(n, 1) <= threshold]`` with ``s`` the log-probs the
    batch was sampled with (the engine's, else old_logp); a NaN ``s`` on a valid token counts 0 (no
    evidence). [B, 1] (or [B, T] for [B, T] advantages), in the compute dtype.
    """
    dt = compute_dtype(logp)
    m = mask.to(dt)
    valid = m != 0
    s = sampling_logp.detach().to(dt)
    kl = torch.where(valid & ~torch.isnan(s), s - logp.detach().to(dt), 0.0)
    mean_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).to(dt)


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """The top-``rho`` entropy tokens (Wang et al. 2025, "Beyond the 80/20 Rule", 2506.01939), detached.

    ``keep_t = [m_t != 0] * [H_t >= quantile({H_s : m_s != 0}, 1 - rho)]`` with ``torch.quantile``'s linear
    interpolation over this call's valid tokens (TRL: over all ranks' valid tokens of the micro-batch); a
    tie at the threshold is kept. All 0 when no token is valid. [B, T] in the compute dtype.
    """
    dt = compute_dtype(entropy)
    valid = mask != 0
    h = entropy.detach().to(dt)
    if not bool(valid.any()):
        return torch.zeros_like(h)
    threshold = torch.quantile(h[valid], 1.0 - top_quantile)
    return (valid & (h >= threshold)).to(dt)


def sequence_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    coef: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: ``(log r_b [B], chain_b [B])`` for ``grpo_token_terms`` (``seq_chain = m * chain_b``).

    ``log r_b = sum_t m (l - o) / max(n_b, 1)``; ``chain_b`` as in the module docstring. [B, T] inputs.
    """
    dt = compute_dtype(logp)
    m = mask.to(dt)
    valid = m != 0
    n = m.sum(-1).clamp(min=1.0)
    log_ratio = torch.where(valid, logp.detach().to(dt) - old_logp.detach().to(dt), 0.0)
    log_r = (log_ratio * m).sum(-1) / n
    r = torch.exp(log_r)
    if cfg.policy in ("cispo", "vespo"):  # no gradient flows through the ratio (detached, or unused)
        return log_r, torch.zeros_like(log_r)
    lp = torch.where(valid, logp.detach().to(dt), 0.0)
    _, _, d_ratio = policy_terms(r[:, None].expand_as(lp), lp, adv.to(dt).expand_as(lp), cfg)
    per_token = coef.to(dt) * d_ratio
    if is_weight is not None:
        per_token = per_token * is_weight.to(dt)
    return log_r, r / n * torch.where(valid, per_token, 0.0).sum(-1)
