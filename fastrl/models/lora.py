"""LoRA through PEFT: the adapter on the decoder's linear layers, never on the lm_head.

Under LoRA the reference policy is the base model, so it needs no second copy of the weights: the
reference log-probs are the policy's forward inside ``adapter_disabled(model)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from fastrl.models.heads import causal_lm, peft_model


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters (Hu et al., 2021): ``W x + (alpha / r) * B A x``, ``A`` [r, in], ``B`` [out, r]."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=16, metadata={"help": "Adapter rank."})
    alpha: float = field(default=32, metadata={"help": "Scale numerator: the update is (alpha / r) * B A."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every linear layer but the lm_head) or a list of module names."},
    )

    def __post_init__(self) -> None:
        # bool is an int to Python: r=True would silently mean rank 1.
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
        if not number(self.alpha) or not 0 < self.alpha < math.inf:  # `not` also refuses NaN
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ValueError(f"target_modules must be 'all-linear' or a list of names, got {targets!r}")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {targets!r}")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with fresh LoRA adapters; returns ``model`` unchanged when
    ``cfg.enabled`` is False. Only the adapter weights stay trainable. ``B`` starts at zero, so the wrapped
    model computes exactly what the base model did."""
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"cfg must be a LoraConfig, got {type(cfg).__name__}")
    if not cfg.enabled:
        return model
    if peft_model(model) is not None:
        raise ValueError("model already has PEFT adapters")
    import peft

    lm = causal_lm(model)
    head_names = {n for n, m in lm.named_modules() if m is lm.get_output_embeddings()}
    if isinstance(cfg.target_modules, list):
        on_head = [t for t in cfg.target_modules if any(h == t or h.endswith("." + t) for h in head_names)]
        if on_head:
            # The fused loss multiplies hidden states by the plain lm_head weight (lm_head_params).
            raise ValueError(f"target_modules must not include the lm_head, got {on_head}")
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,  # peft's "all-linear" already leaves out the output layer
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def get_peft_model(model: nn.Module, peft_cfg) -> nn.Module:
    """``peft.get_peft_model`` without its deprecation warning. PEFT 0.21 reads
    ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``, a property transformers 5 deprecated (a
    FutureWarning on every LoRA run). The read is PEFT's, not ours, so the one fix open to us is to silence
    exactly that warning for exactly this call."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (the reference policy under LoRA): inside the block every forward, including
    ``backbone_hidden`` and ``lm_head_params``, skips the adapters. Raises ``ValueError`` on a model
    without PEFT adapters, where there is nothing to disable (keep a separate reference model then)."""
    peft = peft_model(model)
    if peft is None:
        raise ValueError(
            "adapter_disabled needs a model with LoRA adapters (apply_lora); this model has none, so the "
            "reference policy must be a separate model"
        )
    with peft.disable_adapter():
        yield model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters with ``requires_grad``."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
