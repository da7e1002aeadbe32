"""DPO losses on sequence log-probs, and LD-DPO's length-desensitised sequence sums.

``dpo_loss`` dispatches on ``loss_type`` through the registry in :mod:`fastrl.losses.dpo_losses`, where
every formula is written out with its paper. ``ld_sequence_logps`` turns per-token log-probs into the
sequence sums DPO consumes, down-weighting the tokens past the shorter completion of each pair.
"""

from __future__ import annotations

import math

import torch

from fastrl.losses.dpo_losses import DPO_LOSSES, BCORunningMean, PairTerms, get_dpo_loss, register_dpo_loss

__all__ = [
    "DPO_LOSSES",
    "BCORunningMean",
    "dpo_loss",
    "ld_sequence_logps",
    "ld_token_weights",
    "register_dpo_loss",
    "validate_dpo_options",
]


def validate_dpo_options(beta: float, loss_type: str, label_smoothing: float, options: dict) -> dict:
    """Check the scalar options of a DPO variant; returns its options with defaults filled in."""
    spec = get_dpo_loss(loss_type)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and not spec.uses_label_smoothing:
        users = sorted(k for k, s in DPO_LOSSES.items() if s.uses_label_smoothing)
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}; "
            f"it applies to {users}"
        )
    if loss_type == "exo_pair" and label_smoothing == 0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for loss_type={loss_type!r}; "
            f"it accepts {sorted(spec.options) or 'none'}"
        )
    merged = {**spec.options, **options}
    if loss_type == "discopop":
        tau = merged["discopop_tau"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"discopop_tau must be a number > 0, got {tau!r}")
    if loss_type == "bco_pair" and not isinstance(merged["bco_state"], (BCORunningMean, type(None))):
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
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss ``mean_p loss_type(c_p, r_p)`` over P preference pairs.

    Inputs are [P] sequence log-prob sums (policy and reference, chosen and rejected); with
    ``c = chosen_logps - ref_chosen_logps``, ``r = rejected_logps - ref_rejected_logps`` and ``d = c - r``
    the per-pair formulas (TRL ``DPOTrainer`` semantics, papers cited) are:

    ============== ===============================================================================
    sigmoid        ``-(1-ε) logσ(b d) - ε logσ(-b d)``  DPO arXiv:2305.18290, cDPO smoothing ε
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
    ============== ===============================================================================

    (``cdpo(z) = -(1-ε) logσ(z) - ε logσ(-z)``; sorts run over the batch of pairs.)

    Args:
        beta: b > 0. label_smoothing: ε in [0, 0.5); only sigmoid, robust, exo_pair (needs ε > 0),
        aot and aot_unpaired read it, any other type raises if it is non-zero.
        options: per-type extras — ``discopop_tau`` (default 0.05); ``bco_state`` (a
        :class:`BCORunningMean`, updated in place; None gives δ = 0 like current TRL);
        ``chosen_lengths`` / ``rejected_lengths`` for ipo ([P] completion token counts, as TRL divides by).

    Returns ``(loss, metrics)``: the scalar loss in fp32 (fp64 for fp64 inputs), and detached means
    ``rewards/chosen`` = mean b c, ``rewards/rejected`` = mean b r, ``rewards/accuracies`` = fraction of
    pairs with b c > b r, ``rewards/margins`` = mean b d, ``logps/chosen``, ``logps/rejected``.
    """
    spec = get_dpo_loss(loss_type)
    options = validate_dpo_options(beta, loss_type, label_smoothing, options)
    _check_vector("chosen_logps", chosen_logps, None)
    shape = chosen_logps.shape
    _check_vector("rejected_logps", rejected_logps, shape)
    _check_vector("ref_chosen_logps", ref_chosen_logps, shape)
    _check_vector("ref_rejected_logps", ref_rejected_logps, shape)
    if loss_type == "ipo":
        lengths = (options["chosen_lengths"], options["rejected_lengths"])
        if (lengths[0] is None) != (lengths[1] is None):
            raise ValueError("chosen_lengths and rejected_lengths must be given together for loss_type='ipo'")
        for name, n in zip(("chosen_lengths", "rejected_lengths"), lengths):
            if n is not None and (not isinstance(n, torch.Tensor) or n.shape != shape):
                raise ValueError(f"{name} must be a tensor of shape [P] = {tuple(shape)}")

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
    )
    loss = spec.fn(terms).mean()

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
    return loss, metrics


def _check_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")
    if mask.dtype != torch.bool:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 (or be bool)")
        mask = mask != 0
    return mask


def ld_token_weights(mask: torch.Tensor, other_mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-position weight for the sequence whose completion is ``mask`` [P, T] (bool), paired
    with ``other_mask`` [P, T'] (bool): 1 on the first ``l_p = min(|mask_p|, |other_mask_p|)`` completion
    positions, ``ld_alpha`` on the later ones, 0 outside the completion. fp32 [P, T]."""
    shared = torch.minimum(mask.sum(1), other_mask.sum(1)).unsqueeze(1)
    position = torch.cumsum(mask, dim=1)  # 1-based index among completion tokens, any padding side
    inside = torch.where(position <= shared, 1.0, float(ld_alpha))
    return torch.where(mask, inside, 0.0)


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
        w = ld_token_weights(mask, other, ld_alpha).to(logp.dtype)
        sums.append(torch.where(mask, logp * w, 0.0).sum(1))
    return sums[0], sums[1]
