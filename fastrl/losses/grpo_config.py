"""``GRPOLossConfig`` and the ``loss_type`` registry of the GRPO loss family.

A loss type is two choices: the per-token policy term (``clip``, ``cispo``, ``sapo`` or ``vespo``, see
``fastrl.losses.grpo_math``) and the normaliser, written here as the per-row factor ``s_b`` with
``loss = sum_b s_b * sum_t m_bt * L_bt`` (``m`` the mask, ``L`` the per-token loss, ``n_b = sum_t m_bt``)::

    grpo, sapo     s_b = 1 / (B * max(n_b, 1))        mean over sequences of the per-sequence token mean
    bnpo           s_b = 1 / max(sum_b n_b, 1)         token mean over the micro-batch
    dr_grpo        s_b = 1 / (B * max_completion_length)
    luspo          s_b = 1 / B                         per-sequence sums (GSPO x length, LUSPO 2602.05261)
    dapo, cispo,   s_b = 1 / num_items_in_batch        (default: max(sum_b n_b, 1))
    vespo

A sequence with ``n_b = 0`` adds 0 to the numerator and, for ``grpo``/``sapo``, still counts in the B of
the mean (TRL clamps the denominator to 1 and averages over the whole batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

POLICIES = ("clip", "cispo", "sapo", "vespo")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass(frozen=True)
class LossType:
    name: str
    policy: str  # one of POLICIES
    row_scale: Callable[[torch.Tensor, GRPOLossConfig], torch.Tensor]  # (n_B, cfg) -> s_B


LOSS_TYPES: dict[str, LossType] = {}


def register_loss_type(name: str, *, policy: str):
    """Decorator: register ``fn(n_B, cfg) -> s_B`` (fp32 [B]) as the normaliser of loss type ``name``."""
    assert policy in POLICIES, policy

    def decorate(fn):
        assert name not in LOSS_TYPES, f"loss_type {name!r} registered twice"
        LOSS_TYPES[name] = LossType(name, policy, fn)
        return fn

    return decorate


def get_loss_type(name: str) -> LossType:
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {name!r}")
    return LOSS_TYPES[name]


@register_loss_type("grpo", policy="clip")
@register_loss_type("sapo", policy="sapo")
def _sequence_mean(n_B: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    return 1.0 / (n_B.numel() * n_B.clamp(min=1.0))


@register_loss_type("bnpo", policy="clip")
def _token_mean(n_B: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    return (1.0 / n_B.sum().clamp(min=1.0)).expand(n_B.shape)


@register_loss_type("dr_grpo", policy="clip")
def _fixed_length(n_B: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    if cfg.max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (an int > 0), got None")
    return torch.full_like(n_B, 1.0 / (max(n_B.numel(), 1) * cfg.max_completion_length))


@register_loss_type("luspo", policy="clip")
def _sequence_sum(n_B: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    # LUSPO: GSPO's per-sequence mean times the sequence length, i.e. the per-sequence sum, averaged over B.
    return torch.full_like(n_B, 1.0 / max(n_B.numel(), 1))


@register_loss_type("dapo", policy="clip")
@register_loss_type("cispo", policy="cispo")
@register_loss_type("vespo", policy="vespo")
def _global_tokens(n_B: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    items = cfg.num_items_in_batch
    if items is None:
        items = n_B.sum()
    items = torch.as_tensor(items, dtype=n_B.dtype, device=n_B.device)
    # A count of 0 means every mask is 0 as well, so the numerator is 0 and the clamp only avoids 0/0.
    return (1.0 / items.clamp(min=1.0)).expand(n_B.shape)


@dataclass(kw_only=True)
class GRPOLossConfig:
    """Options of ``grpo_loss`` and ``FusedLinearGRPOLoss`` (one line per field below).

    Defaults are TRL's ``GRPOConfig`` (1.16); TRL's ``epsilon`` is ``epsilon_low`` here and its
    ``vllm_importance_sampling_{mode,clip_min,clip_max}`` are ``is_{mode,clip_min,clip_max}``. Not here:
    TRL's adaptive entropy control (``use_adaptive_entropy``), a trainer-level controller of ``entropy_coef``.
    """

    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "Policy term + normaliser: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or vespo."
        },
    )
    epsilon_low: float = field(
        default=0.2, metadata={"help": "Lower clip width: the ratio is clipped below at 1 - epsilon_low."}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip width (clip above at 1 + epsilon_high); None means epsilon_low. For cispo it "
            "is the absolute cap on the ratio (ScaleRL recommends 5.0)."
        },
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Two-sided clipping (INTELLECT-2): cap the unclipped ratio at delta (> 1 + eps_high)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "Weight of the k3 KL penalty to the reference policy (needs ref_logp)."},
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={
            "help": "Multiply the per-token k3 KL by the token ratio exp(logp - old_logp) (DeepSeek-V3.2, "
            "2512.02556): the unbiased reverse-KL gradient. Token ratio at every importance_sampling_level."
        },
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "token: per-token ratio; sequence: GSPO ratio exp(masked mean log-ratio)."},
    )
    sapo_temperature_pos: float = field(
        default=1.0, metadata={"help": "SAPO gate temperature for tokens with positive advantage."}
    )
    sapo_temperature_neg: float = field(
        default=1.05, metadata={"help": "SAPO gate temperature for tokens with non-positive advantage."}
    )
    vespo_k_pos: float = field(
        default=2.0, metadata={"help": "VESPO gamma-weight power k for tokens with advantage >= 0."}
    )
    vespo_lambda_pos: float = field(
        default=3.0, metadata={"help": "VESPO gamma-weight decay lambda for tokens with advantage >= 0."}
    )
    vespo_k_neg: float = field(
        default=3.0, metadata={"help": "VESPO gamma-weight power k for tokens with advantage < 0."}
    )
    vespo_lambda_neg: float = field(
        default=2.0, metadata={"help": "VESPO gamma-weight decay lambda for tokens with advantage < 0."}
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Off-policy sequence mask (DeepSeek-V3.2 Eq. 9): drop sequences with advantage < 0 whose "
            "mean KL(engine or old || policy) exceeds this; None: off."
        },
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={
            "help": "Train the policy term on the top rho fraction of tokens by entropy (2506.01939; 0.2 "
            "recommended); 1: all tokens. Needs the per-token entropy."
        },
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "Entropy bonus: subtract entropy_coef x the masked mean token entropy from the loss."
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Fixed denominator length of dr_grpo (required there)."}
    )
    num_items_in_batch: int | float | torch.Tensor | None = field(
        default=None,
        metadata={
            "help": "dapo/cispo/vespo denominator: completion tokens of the whole generation batch (per "
            "process under DDP gradient averaging); None means this call's mask sum."
        },
    )
    is_mode: str = field(
        default="sequence_mask",
        metadata={"help": "Engine importance-sampling correction: token/sequence x truncate/mask."},
    )
    is_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the engine IS weight (None: no lower bound)."}
    )
    is_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the engine IS weight (None: no upper bound)."}
    )

    def __post_init__(self):
        get_loss_type(self.loss_type)
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low must lie in [0, 1), got {self.epsilon_low!r}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0.0:
            raise ValueError(f"epsilon_high must be None or >= 0, got {self.epsilon_high!r}")
        # delta <= 1 + eps_high would let the delta cap bite inside the trust region, a setting TRL warns
        # against; excluding it also keeps the closed-form gradient free of ties between the two caps.
        if self.delta is not None and not self.delta > 1.0 + self.eps_high:
            raise ValueError(
                f"delta must be None or > 1 + epsilon_high = {1 + self.eps_high}, got {self.delta!r}"
            )
        if not self.beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        for name in ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        opsm = self.off_policy_mask_threshold
        if opsm is not None and not opsm >= 0.0:
            raise ValueError(f"off_policy_mask_threshold must be None or >= 0, got {opsm!r}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile!r}")
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef!r}")
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0):
            raise ValueError(f"max_completion_length must be None or an int > 0, got {mcl!r}")
        items = self.num_items_in_batch
        if items is not None and not isinstance(items, torch.Tensor) and not items > 0:
            raise ValueError(f"num_items_in_batch must be None, a number > 0 or a tensor, got {items!r}")
        if self.is_mode not in IS_MODES:
            raise ValueError(f"is_mode must be one of {IS_MODES}, got {self.is_mode!r}")
        lo, hi = self.is_clip_min, self.is_clip_max
        if lo is not None and not lo >= 0.0:
            raise ValueError(f"is_clip_min must be None or >= 0, got {lo!r}")
        if hi is not None and not (hi > 0.0 and (lo is None or hi > lo)):
            raise ValueError(f"is_clip_max must be None or > max(0, is_clip_min), got {hi!r}")

    @property
    def eps_high(self) -> float:
        """``epsilon_high`` with None resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def policy(self) -> str:
        return LOSS_TYPES[self.loss_type].policy

    @property
    def uses_num_items(self) -> bool:
        """Whether the normaliser is ``num_items_in_batch`` (dapo, cispo, vespo)."""
        return LOSS_TYPES[self.loss_type].row_scale is _global_tokens

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss reads the per-token entropy (entropy quantile mask or entropy bonus)."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


# help() shows the class docstring, not the field metadata: append one line per field to it.
GRPOLossConfig.__doc__ += "\n    Fields:\n\n" + "\n".join(
    f"    - ``{f.name}`` (default ``{f.default!r}``): {f.metadata['help']}"
    for f in dataclasses.fields(GRPOLossConfig)
)


def make_config(config: GRPOLossConfig | None, options: dict) -> GRPOLossConfig:
    """``config`` with ``options`` (field names) overriding it; a fresh default config when None."""
    if config is not None and not isinstance(config, GRPOLossConfig):
        raise ValueError(f"config must be a GRPOLossConfig or None, got {type(config).__name__}")
    valid = sorted(f.name for f in dataclasses.fields(GRPOLossConfig))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown GRPO option(s) {unknown}; valid options are {valid}")
    if config is None:
        return GRPOLossConfig(**options)
    return dataclasses.replace(config, **options) if options else config
