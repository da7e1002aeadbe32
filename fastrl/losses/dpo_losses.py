"""The DPO loss family as a registry keyed by ``loss_type``: one function per paper, per pair.

Notation (all per preference pair ``p``; ``σ`` is the logistic sigmoid, ``logσ`` its log, ``b`` = beta,
``ε`` = label_smoothing)::

    c = log π(y_w|x) - log π_ref(y_w|x)        chosen log-ratio   (sequence log-prob sums)
    r = log π(y_l|x) - log π_ref(y_l|x)        rejected log-ratio
    d = c - r                                  the DPO margin (policy log-ratio minus reference log-ratio)

With an f-divergence regulariser (f-DPO, Wang et al. 2023, arXiv:2309.16240) the log-ratios ``u`` in
``d`` (and in ipo / sigmoid_norm's ``c``, ``r``) become the scores ``f'(e^u)``: ``u`` (reverse_kl, the
default), ``1 - e^{-u}`` (forward_kl), ``log 2 + logσ(u)`` (js_divergence), ``(e^{(α-1)u} - 1)/(α-1)``
(alpha_divergence, α = f_alpha_divergence_coef; α = 1 is reverse_kl). Only the losses built on the
chosen-rejected difference accept one (``F_DIVERGENCE_LOSSES``): elsewhere the ``β log Z(x)`` of the
reparameterisation does not cancel.

Every function maps a :class:`PairTerms` to the per-pair loss ``[P]``; :func:`fastrl.losses.dpo.dpo_loss`
takes the weighted sum over loss types of the means over pairs. The formulas follow TRL's ``DPOTrainer``
(1.16); where TRL differs from the paper, or fastrl from TRL, it is said below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(kw_only=True)
class PairTerms:
    """What every DPO variant reads. Tensors are [P] in the compute dtype (fp32 or fp64)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    beta: float
    label_smoothing: float
    options: dict = field(default_factory=dict)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_scores(self) -> torch.Tensor:
        return f_divergence_score(self.chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def rejected_scores(self) -> torch.Tensor:
        return f_divergence_score(
            self.rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef
        )

    @property
    def score_margin(self) -> torch.Tensor:
        """``f'(chosen ratio) - f'(rejected ratio)``: the margin ``d`` under reverse_kl."""
        return self.chosen_scores - self.rejected_scores


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types whose formula only sees the chosen-rejected score difference (or sft, which sees none).
F_DIVERGENCE_LOSSES = ("discopop", "exo_pair", "hinge", "ipo", "robust", "sft", "sigmoid", "sigmoid_norm")
# exp's argument cap for alpha_divergence, as TRL's (fp32 overflows past ~88); fp64 goes much further.
_ALPHA_EXP_MAX = {torch.float32: 80.0, torch.float64: 700.0}


def f_divergence_score(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """``f'(e^u)`` of the f-divergence ``kind`` (module docstring) for log-ratios ``u``."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return u
    if kind == "forward_kl":
        return 1.0 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(u)
    assert kind == "alpha_divergence", kind
    # The cap (zero gradient beyond it) keeps exp finite where the loss would overflow anyway.
    t = ((alpha - 1.0) * u).clamp(max=_ALPHA_EXP_MAX[u.dtype])
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


@dataclass(frozen=True)
class LossSpec:
    """A registered variant: its formula, whether it reads ``label_smoothing``, and its extra options
    (name -> default)."""

    fn: Callable[[PairTerms], torch.Tensor]
    uses_label_smoothing: bool
    options: dict


DPO_LOSSES: dict[str, LossSpec] = {}


def register_dpo_loss(name: str, *, uses_label_smoothing: bool = False, options: dict | None = None):
    """Decorator: add a per-pair DPO loss under ``loss_type=name``."""

    def wrap(fn: Callable[[PairTerms], torch.Tensor]):
        assert name not in DPO_LOSSES, f"duplicate DPO loss_type {name!r}"
        DPO_LOSSES[name] = LossSpec(fn, uses_label_smoothing, dict(options or {}))
        return fn

    return wrap


def get_dpo_loss(loss_type: str) -> LossSpec:
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(DPO_LOSSES)}, got {loss_type!r}")
    return DPO_LOSSES[loss_type]


class BCORunningMean:
    """The running reward mean ``δ`` that ``bco_pair`` subtracts (BCO, Jung et al. 2024, arXiv:2404.04656).

    Each call of the loss first folds in the batch mean of the detached implicit rewards,
    ``m_k = mean([b*c, b*r])``, then uses ``δ = (m_1 + ... + m_k) / k``: every batch weighs the same, as in
    the ``RunningMoments`` object of earlier TRL versions. Keep one instance per training run (save
    ``mean``/``count`` with the checkpoint); under data parallelism all-reduce the batch means before
    calling if every rank must see the same ``δ``. The state is not differentiated.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, batch_mean: float) -> float:
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean


def _cdpo(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Conservative DPO's smoothed logistic loss: ``-(1-ε) logσ(z) - ε logσ(-z)``."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_dpo_loss("sigmoid", uses_label_smoothing=True)
def _sigmoid(t: PairTerms) -> torch.Tensor:
    """``-(1-ε) logσ(b d) - ε logσ(-b d)``: DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7) with the
    conservative-DPO label smoothing (Mitchell 2023, "A note on DPO with noisy preferences"); ε=0 is DPO.

    TRL >= 0.29 ignores ``label_smoothing`` here (it dropped cDPO; TRL 0.18 applied it as fastrl does).
    fastrl keeps it: cDPO is the maximum-likelihood loss when a fraction ε of the labels is flipped, it is
    opt-in (ε = 0 is exactly DPO), and ignoring a set option silently would be worse. A warning says so
    once per process when ε > 0 (``fastrl.losses.dpo.validate_dpo_options``)."""
    return _cdpo(t.beta * t.score_margin, t.label_smoothing)


@register_dpo_loss("hinge")
def _hinge(t: PairTerms) -> torch.Tensor:
    """``max(0, 1 - b d)``: SLiC-HF's calibration hinge (Zhao et al. 2023, arXiv:2305.10425; the margin
    is 1/b in d)."""
    return torch.relu(1 - t.beta * t.score_margin)


@register_dpo_loss("ipo", options={"chosen_lengths": None, "rejected_lengths": None})
def _ipo(t: PairTerms) -> torch.Tensor:
    """``(c/n_w - r/n_l - 1/(2b))^2``: IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17, b = τ).

    TRL divides each log-ratio by its completion token count ``n`` (chosen_lengths / rejected_lengths,
    [P]); pass them to match it. Without them ``n = 1``, the paper's sequence-level form.
    """
    c, r = t.chosen_scores, t.rejected_scores
    if t.options["chosen_lengths"] is not None:
        c = c / t.options["chosen_lengths"].to(c.dtype).clamp(min=1)
        r = r / t.options["rejected_lengths"].to(r.dtype).clamp(min=1)
    return (c - r - 1 / (2 * t.beta)) ** 2


@register_dpo_loss("robust", uses_label_smoothing=True)
def _robust(t: PairTerms) -> torch.Tensor:
    """``(-(1-ε) logσ(b d) + ε logσ(-b d)) / (1 - 2ε)``: robust DPO, an unbiased loss under preference
    flips with probability ε (Chowdhury et al. 2024, arXiv:2403.00409)."""
    z, eps = t.beta * t.score_margin, t.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register_dpo_loss("exo_pair", uses_label_smoothing=True)
def _exo_pair(t: PairTerms) -> torch.Tensor:
    """``σ(b d) (logσ(b d) - log(1-ε)) + σ(-b d) (logσ(-b d) - log ε)``: EXO-pref, the reverse KL from the
    policy's pair distribution to the smoothed label ``(1-ε, ε)`` (Ji et al. 2024, arXiv:2402.00856,
    Eq. 16 with K = 2). Needs ε > 0 (the paper recommends 1e-3)."""
    z, eps = t.beta * t.score_margin, t.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@register_dpo_loss("nca_pair")
def _nca_pair(t: PairTerms) -> torch.Tensor:
    """``-logσ(b c) - ½ logσ(-b c) - ½ logσ(-b r)``: NCA, noise-contrastive alignment on absolute rewards
    (Chen et al. 2024, arXiv:2402.05369, pairwise K = 2)."""
    zc, zr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


@register_dpo_loss("bco_pair", options={"bco_state": None})
def _bco_pair(t: PairTerms) -> torch.Tensor:
    """``-logσ(b c - δ) - logσ(-(b r - δ))``: BCO, a binary classifier on implicit rewards (Jung et al.
    2024, arXiv:2404.04656).

    ``δ`` is a running mean of the rewards kept in ``bco_state`` (a :class:`BCORunningMean`, updated by
    this call). Without a state ``δ = 0``, which is what TRL's current ``DPOTrainer`` computes.
    """
    zc, zr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    state: BCORunningMean | None = t.options["bco_state"]
    delta = 0.0
    if state is not None:
        delta = state.update(float(torch.cat([zc, zr]).detach().mean()))
    return -F.logsigmoid(zc - delta) - F.logsigmoid(-(zr - delta))


@register_dpo_loss("sppo_hard")
def _sppo_hard(t: PairTerms) -> torch.Tensor:
    """``(c - 1/(2b))^2 + (r + 1/(2b))^2``: SPPO with hard win probabilities (1 for the chosen, 0 for the
    rejected) (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 / Algorithm 1, η = 1/b)."""
    half = 0.5 / t.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2


@register_dpo_loss("aot", uses_label_smoothing=True)
def _aot(t: PairTerms) -> torch.Tensor:
    """``cdpo(b (sort(π_w - π_l) - sort(ref_w - ref_l)))``: AOT, paired form — first-order stochastic
    dominance of the policy's log-ratio distribution over the reference's, by matching sorted quantiles
    across the batch (Melnyk et al. 2024, arXiv:2406.05882). Sorting is ascending over the P pairs."""
    pi_sorted = torch.sort(t.chosen_logps - t.rejected_logps, dim=0).values
    ref_sorted = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0).values
    return _cdpo(t.beta * (pi_sorted - ref_sorted), t.label_smoothing)


@register_dpo_loss("aot_unpaired", uses_label_smoothing=True)
def _aot_unpaired(t: PairTerms) -> torch.Tensor:
    """``cdpo(b (sort(c) - sort(r)))``: AOT, unpaired form — the chosen log-ratio distribution dominates
    the rejected one (Melnyk et al. 2024, arXiv:2406.05882)."""
    c_sorted = torch.sort(t.chosen_logratios, dim=0).values
    r_sorted = torch.sort(t.rejected_logratios, dim=0).values
    return _cdpo(t.beta * (c_sorted - r_sorted), t.label_smoothing)


@register_dpo_loss("apo_zero")
def _apo_zero(t: PairTerms) -> torch.Tensor:
    """``1 - σ(b c) + σ(b r)``: APO-zero, raise the chosen and lower the rejected likelihood (D'Oosterlinck
    et al. 2024, arXiv:2408.06266, Eq. 7)."""
    return 1 - torch.sigmoid(t.beta * t.chosen_logratios) + torch.sigmoid(t.beta * t.rejected_logratios)


@register_dpo_loss("apo_down")
def _apo_down(t: PairTerms) -> torch.Tensor:
    """``σ(b c) + 1 - σ(b d)``: APO-down, lower both likelihoods, the rejected more (D'Oosterlinck et al.
    2024, arXiv:2408.06266, Eq. 8)."""
    return torch.sigmoid(t.beta * t.chosen_logratios) + 1 - torch.sigmoid(t.beta * t.margin)


@register_dpo_loss("discopop", options={"discopop_tau": 0.05})
def _discopop(t: PairTerms) -> torch.Tensor:
    """``(1 - m) (-logσ(z)) + m exp(-z)`` with ``z = b d`` and ``m = σ(z / τ)``: DiscoPOP's log-ratio
    modulated loss, a blend of the logistic and exponential losses (Chris Lu et al. 2024,
    arXiv:2406.08414, Eq. 5; τ = discopop_tau > 0)."""
    z = t.beta * t.score_margin
    m = torch.sigmoid(z / t.options["discopop_tau"])
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


_LENGTHS = {"chosen_lengths": None, "rejected_lengths": None}


@register_dpo_loss("sigmoid_norm", options=_LENGTHS)
def _sigmoid_norm(t: PairTerms) -> torch.Tensor:
    """``-logσ(b (c/n_w - r/n_l))``: DPO on length-normalised log-ratios (per-token mean rewards, as in
    SimPO's length normalisation, Meng et al. 2024, arXiv:2405.14734, with the reference kept); ``n`` the
    completion token counts (``chosen_lengths`` / ``rejected_lengths``, required, clamped to >= 1)."""
    n_w = t.options["chosen_lengths"].to(t.chosen_logps.dtype).clamp(min=1)
    n_l = t.options["rejected_lengths"].to(t.chosen_logps.dtype).clamp(min=1)
    return -F.logsigmoid(t.beta * (t.chosen_scores / n_w - t.rejected_scores / n_l))


@register_dpo_loss("sft", options={**_LENGTHS, "sft_chosen_logps": None})
def _sft(t: PairTerms) -> torch.Tensor:
    """``-sum_p S_p / sum_p n_p`` for every pair: the chosen completions' token-mean negative log-likelihood
    over the batch (an SFT term, as in RPO, Pang et al. 2024, arXiv:2404.19733, and MPO's mix), with ``S_p``
    the plain (never LD-weighted) chosen log-prob sum (``sft_chosen_logps``, default ``chosen_logps``) and
    ``n_p`` its token count (``chosen_lengths``, required). One batch scalar, repeated per pair as TRL does,
    so that WPO weights still scale it pair by pair."""
    s = t.chosen_logps if t.options["sft_chosen_logps"] is None else t.options["sft_chosen_logps"]
    s = s.to(t.chosen_logps.dtype)
    n = t.options["chosen_lengths"].to(s.dtype).sum().clamp(min=1)
    return (-s.sum() / n).expand(s.shape)
