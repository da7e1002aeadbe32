"""DPO losses on sequence log-probs, and LD-DPO's length-desensitised sequence sums.

``dpo_loss`` dispatches on ``loss_type`` through the registry in :mod:`fastrl.losses.dpo_losses`, where
every formula is written out with its paper. ``ld_sequence_logps`` turns per-token log-probs into the
sequence sums DPO consumes, down-weighting the tokens past the shorter completion of each pair.
"""

from __future__ import annotations

import math
import warnings

import torch

from fastrl.losses.dpo_losses import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    BCORunningMean,
    PairTerms,
    get_dpo_loss,
    register_dpo_loss,
)

__all__ = [
    "DPO_LOSSES",
    "BCORunningMean",
    "dpo_loss",
    "ld_sequence_logps",
    "ld_token_weights",
    "register_dpo_loss",
    "validate_dpo_options",
    "wpo_weights",
]


_warned_cdpo = False


def loss_types_of(loss_type: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``loss_type`` as a tuple of names (one string, or a non-empty list of distinct names)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types or not all(isinstance(t, str) for t in types) or len(set(types)) != len(types):
        raise ValueError(f"loss_type must be a name or a non-empty list of distinct names, got {loss_type!r}")
    for t in types:
        get_dpo_loss(t)
    return types


def validate_dpo_options(
    beta: float,
    loss_type: str | list[str],
    label_smoothing: float,
    options: dict,
    *,
    loss_weights: list[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> dict:
    """Check the scalar options of a DPO variant (or of several combined); returns their options with
    defaults filled in. Warns once per process when sigmoid's cDPO label smoothing is on (TRL ignores it)."""
    global _warned_cdpo
    types = loss_types_of(loss_type)
    specs = [get_dpo_loss(t) for t in types]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and not any(spec.uses_label_smoothing for spec in specs):
        users = sorted(k for k, s in DPO_LOSSES.items() if s.uses_label_smoothing)
        shown = types[0] if len(types) == 1 else list(types)
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={shown!r}; it applies to {users}"
        )
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
    if label_smoothing and "sigmoid" in types and not _warned_cdpo:
        _warned_cdpo = True
        warnings.warn(
            f"label_smoothing={label_smoothing} with loss_type='sigmoid': fastrl applies conservative DPO "
            "(cDPO), as TRL <= 0.28 did; TRL >= 0.29 ignores label_smoothing for sigmoid",
            UserWarning,
            stacklevel=3,
        )
    if loss_weights is not None:
        ok = isinstance(loss_weights, (list, tuple)) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in loss_weights
        )
        if not ok or len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must be a list of {len(types)} finite numbers (one per loss_type), "
                f"got {loss_weights!r}"
            )
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSSES):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} applies only to loss types "
            f"{list(F_DIVERGENCE_LOSSES)}, got {list(types)}"
        )
    a = f_alpha_divergence_coef
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {a!r}")
    allowed = {k: v for spec in specs for k, v in spec.options.items()}
    unknown = set(options) - set(allowed)
    if unknown:
        shown = types[0] if len(types) == 1 else list(types)
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for loss_type={shown!r}; "
            f"it accepts {sorted(allowed) or 'none'}"
        )
    merged = {**allowed, **options}
    if "discopop" in types:
        tau = merged["discopop_tau"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"discopop_tau must be a number > 0, got {tau!r}")
    if "bco_pair" in types and not isinstance(merged["bco_state"], (BCORunningMean, type(None))):
        raise ValueError(
            f"bco_state must be a BCORunningMean or None, got {type(merged['bco_state']).__name__}"
        )
    return merged


def _check_vector(name: str, t: torch.Tensor, shape: torch.Size | None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor of shape [P]")
    if t.dim() != 1 or (shape is not None and t.shape != shape):
        want = "[P]" if shape is None else f"[P] = {tuple(shape)}"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss ``sum_k λ_k mean_p ω_p loss_k(c_p, r_p)`` over P preference pairs.

    ``loss_type`` is one name or a list (``[sigmoid, sft]``, MPO-style mixes), ``loss_weights`` the λ_k
    (default all 1), ``pair_weights`` the ω_p (default 1; WPO's weights, see :func:`wpo_weights`).
    Inputs are [P] sequence log-prob sums (policy and reference, chosen and rejected); with
    ``c = chosen_logps - ref_chosen_logps``, ``r = rejected_logps - ref_rejected_logps`` and ``d = c - r``
    the per-pair formulas (TRL ``DPOTrainer`` semantics, papers cited) are:

    ============== ===============================================================================
    sigmoid        ``-(1-ε) logσ(b d) - ε logσ(-b d)``  DPO arXiv:2305.18290, cDPO smoothing ε (*)
    hinge          ``max(0, 1 - b d)``                  SLiC arXiv:2305.10425
    ipo            ``(c/n_w - r/n_l - 1/(2b))^2``       IPO arXiv:2310.12036 Eq. 17 (n: lengths, opt.)
    robust         ``(-(1-ε) logσ(b d) + ε logσ(-b d)) / (1-2ε)``  rDPO arXiv:2403.00409
    exo_pair       ``σ(bd)(logσ(bd) - log(1-ε)) + σ(-bd)(logσ(-bd) - log ε)``  EXO arXiv:2402.00856
    nca_pair       ``-logσ(b c) - ½logσ(-b c) - ½logσ(-b r)``  NCA arXiv:2402.05369
    bco_pair       ``-logσ(b c - δ) - logσ(δ - b r)``    BCO arXiv:2404.04656 (δ: running reward mean)
    sppo_hard      ``(c - 1/(2b))^2 + (r + 1/(2b))^2``  SPPO arXiv:2405.00675
    aot            ``cdpo(b (sort(π_w-π_l) - sort(ref_w-ref_l)))``  AOT arXiv:2406.05882
    aot_unpaired   ``cdpo(b (sort(c) - sort(r)))``       AOT arXiv:2406.05882
    apo_zero       ``1 - σ(b c) + σ(b r)``               APO arXiv:2408.06266 Eq. 7
    apo_down       ``σ(b c) + 1 - σ(b d)``               APO arXiv:2408.06266 Eq. 8
    discopop       ``(1-m)(-logσ(z)) + m e^{-z}``, z = b d, m = σ(z/τ)  DiscoPOP arXiv:2406.08414 Eq. 5
    sigmoid_norm   ``-logσ(b (c/n_w - r/n_l))``          length-normalised DPO (n: lengths, required)
    sft            ``-sum_p S_p / sum_p n_w,p``          chosen token-mean NLL (RPO arXiv:2404.19733)
    ============== ===============================================================================

    (``cdpo(z) = -(1-ε) logσ(z) - ε logσ(-z)``; sorts run over the batch of pairs.) (*) TRL >= 0.29
    ignores ``label_smoothing`` for sigmoid; fastrl applies cDPO (as TRL 0.18 did) and warns once.
    ``f_divergence_type`` (f-DPO arXiv:2309.16240) replaces the log-ratios ``u`` inside d (and ipo /
    sigmoid_norm's c, r) by ``f'(e^u)``: forward_kl ``1 - e^{-u}``, js_divergence ``log 2 + logσ(u)``,
    alpha_divergence ``(e^{(α-1)u} - 1)/(α-1)`` (α = ``f_alpha_divergence_coef``); only for sigmoid,
    sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft.

    Args:
        beta: b > 0. label_smoothing: ε in [0, 0.5); only sigmoid, robust, exo_pair (needs ε > 0),
        aot and aot_unpaired read it, any other type raises if it is non-zero.
        pair_weights: [P] detached per-pair weights (not with aot / aot_unpaired, whose sorts would
        misalign them).
        options: per-type extras — ``discopop_tau`` (default 0.05); ``bco_state`` (a
        :class:`BCORunningMean`, updated in place; None gives δ = 0 like current TRL);
        ``chosen_lengths`` / ``rejected_lengths`` ([P] completion token counts) for ipo (optional, as TRL
        divides by them), sigmoid_norm (both required) and sft (chosen required); ``sft_chosen_logps``
        ([P], sft's plain chosen sums when ``chosen_logps`` are LD-weighted; default ``chosen_logps``).

    Returns ``(loss, metrics)``: the scalar loss in fp32 (fp64 for fp64 inputs), and detached means
    ``rewards/chosen`` = mean b c, ``rewards/rejected`` = mean b r, ``rewards/accuracies`` = fraction of
    pairs with b c > b r, ``rewards/margins`` = mean b d, ``logps/chosen``, ``logps/rejected``.
    """
    types = loss_types_of(loss_type)
    options = validate_dpo_options(
        beta, loss_type, label_smoothing, options, loss_weights=loss_weights,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    _check_vector("chosen_logps", chosen_logps, None)
    shape = chosen_logps.shape
    _check_vector("rejected_logps", rejected_logps, shape)
    _check_vector("ref_chosen_logps", ref_chosen_logps, shape)
    _check_vector("ref_rejected_logps", ref_rejected_logps, shape)
    _check_lengths(types, options, shape)
    if options.get("sft_chosen_logps") is not None:
        _check_vector("sft_chosen_logps", options["sft_chosen_logps"], shape)
    if pair_weights is not None:
        if set(types) & {"aot", "aot_unpaired"}:
            raise ValueError(
                "pair_weights do not apply to aot / aot_unpaired (their sorts reorder the pairs)"
            )
        _check_vector("pair_weights", pair_weights, shape)

    # Half-precision sums lose whole units at typical sequence log-probs: do the loss math in fp32.
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    terms = PairTerms(
        chosen_logps=chosen_logps.to(dtype),
        rejected_logps=rejected_logps.to(dtype),
        ref_chosen_logps=ref_chosen_logps.to(dtype),
        ref_rejected_logps=ref_rejected_logps.to(dtype),
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        options=options,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=float(f_alpha_divergence_coef),
    )
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    omega = None if pair_weights is None else pair_weights.detach().to(dtype)
    loss = None
    for name, lam in zip(types, weights):
        per_pair = get_dpo_loss(name).fn(terms)
        if omega is not None:
            per_pair = per_pair * omega
        term = lam * per_pair.mean()
        loss = term if loss is None else loss + term

    with torch.no_grad():
        chosen_rewards = beta * terms.chosen_logratios
        rejected_rewards = beta * terms.rejected_logratios
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": terms.chosen_logps.mean(),
            "logps/rejected": terms.rejected_logps.mean(),
        }
        if omega is not None:
            metrics["pair_weights/mean"] = omega.mean()
    return loss, metrics


def _check_lengths(types: tuple[str, ...], options: dict, shape: torch.Size) -> None:
    lengths = (options.get("chosen_lengths"), options.get("rejected_lengths"))
    need = {"sigmoid_norm": ("chosen_lengths", "rejected_lengths"), "sft": ("chosen_lengths",)}
    for t in types:
        for name in need.get(t, ()):
            if options.get(name) is None:
                raise ValueError(f"loss_type={t!r} needs {name} ([P] completion token counts), got None")
    if "ipo" in types and (lengths[0] is None) != (lengths[1] is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together for loss_type='ipo'")
    for name, n in zip(("chosen_lengths", "rejected_lengths"), lengths):
        if n is not None and (not isinstance(n, torch.Tensor) or n.shape != shape):
            raise ValueError(f"{name} must be a tensor of shape [P] = {tuple(shape)}")


@torch.no_grad()
def wpo_weights(
    chosen_token_logp: torch.Tensor,
    chosen_log_sum_sq: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logp: torch.Tensor,
    rejected_log_sum_sq: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> torch.Tensor:
    """WPO's per-pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, Eq. 2, in TRL's aligned form), detached, [P]::

        ω_p = v(y_w) v(y_l),   v(y) = exp( sum_t m_t (log π(y_t) - log sum_v π(v)^2) / max(n, 1) )

    ``*_log_sum_sq`` [P, T] is ``log sum_v π(v | prefix)^2`` per position (the policy's own probability of
    sampling twice the same token, which aligns the weights to the policy's sharpness). Positions outside
    the masks are ignored whatever they hold.
    """
    out = []
    for logp, lss, mask in (
        (chosen_token_logp, chosen_log_sum_sq, chosen_mask),
        (rejected_token_logp, rejected_log_sum_sq, rejected_mask),
    ):
        valid = mask != 0
        dt = torch.promote_types(logp.dtype, torch.float32)
        aligned = torch.where(valid, logp.to(dt) - lss.to(dt), 0.0).sum(1)
        out.append(torch.exp(aligned / valid.sum(1).clamp(min=1)))
    return out[0] * out[1]


def _check_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")
    if mask.dtype != torch.bool:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 (or be bool)")
        mask = mask != 0
    return mask


def ld_token_weights(
    mask: torch.Tensor, other_mask: torch.Tensor, ld_alpha: float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """LD-DPO's per-position weight for the sequence whose completion is ``mask`` [P, T] (bool), paired
    with ``other_mask`` [P, T'] (bool): 1 on the first ``l_p = min(|mask_p|, |other_mask_p|)`` completion
    positions, ``ld_alpha`` on the later ones, 0 outside the completion. [P, T] in ``dtype`` (``ld_alpha``
    is rounded to ``dtype`` only: fp64 callers get it to fp64 precision)."""
    shared = torch.minimum(mask.sum(1), other_mask.sum(1)).unsqueeze(1)
    position = torch.cumsum(mask, dim=1)  # 1-based index among completion tokens, any padding side
    one, alpha = (torch.tensor(v, dtype=dtype, device=mask.device) for v in (1.0, float(ld_alpha)))
    inside = torch.where(position <= shared, one, alpha)
    return torch.where(mask, inside, torch.zeros((), dtype=dtype, device=mask.device))


def ld_sequence_logps(
    chosen_token_logp: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logp: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO sequence log-probs (Liu et al. 2024, "Length Desensitization in Direct Preference
    Optimization", arXiv:2409.06411).

    With ``l_p = min(|y_w|, |y_l|)`` the shorter completion length of pair ``p`` (counted from the masks)
    and ``k`` the 1-based index of a token among its sequence's completion tokens::

        chosen_sum_p = sum_{k <= l_p} logp_k + ld_alpha * sum_{k > l_p} logp_k        (same for rejected)

    Args: ``*_token_logp`` [P, T] (chosen and rejected may differ in T) per-token log-probs; ``*_mask``
    [P, T] completion masks (bool or 0/1; prompt and padding are 0, padding on either side);
    ``ld_alpha`` in [0, 1] (1: plain sums, 0: only the shared-length prefix). Positions outside the mask
    contribute nothing even when their log-prob is not finite. Apply it to the policy and the reference
    alike. Differentiable in the log-probs; returns [P] sums in the log-probs' dtype.
    """
    if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0 <= ld_alpha <= 1:
        raise ValueError(f"ld_alpha must be a number in [0, 1], got {ld_alpha!r}")
    for name, t in (("chosen_token_logp", chosen_token_logp), ("rejected_token_logp", rejected_token_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a floating-point tensor of shape [P, T]")
    if rejected_token_logp.shape[0] != chosen_token_logp.shape[0]:
        raise ValueError(
            f"chosen_token_logp and rejected_token_logp must have the same number of pairs P, got "
            f"{chosen_token_logp.shape[0]} and {rejected_token_logp.shape[0]}"
        )
    chosen_mask = _check_mask("chosen_mask", chosen_mask, chosen_token_logp.shape)
    rejected_mask = _check_mask("rejected_mask", rejected_mask, rejected_token_logp.shape)
    sums = []
    for logp, mask, other in (
        (chosen_token_logp, chosen_mask, rejected_mask),
        (rejected_token_logp, rejected_mask, chosen_mask),
    ):
        w = ld_token_weights(mask, other, ld_alpha, dtype=logp.dtype)
        sums.append(torch.where(mask, logp * w, 0.0).sum(1))
    return sums[0], sums[1]
