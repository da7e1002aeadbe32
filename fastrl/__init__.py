"""fastrl: fused Triton kernels and thin trainers for RL post-training of language models.

Public API (imported lazily so that ``import fastrl`` stays cheap)::

    fastrl.logprobs(logits, labels, ...)              per-token log-probs from materialised logits
    fastrl.linear_logprobs(hidden, weight, labels, ...) the same from hidden states, no [N, V] logits
    fastrl.grpo_loss(logp, old_logp, advantages, mask, ...), fastrl.GRPOLossConfig
    fastrl.FusedLinearGRPOLoss
    fastrl.dpo_loss(...), fastrl.ld_sequence_logps(...), fastrl.FusedLinearDPOLoss
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


class FastRLWarning(UserWarning):
    """fastrl's own warnings (examples dropped, a reward that scored nothing); the CLI prints each as one
    line, ``fastrl: warning: ...``."""


_EXPORTS = {
    "logprobs": "fastrl.ops.logprobs",
    "linear_logprobs": "fastrl.ops.linear_logprobs",
    "grpo_loss": "fastrl.losses.grpo",
    "GRPOLossConfig": "fastrl.losses.grpo",
    "FusedLinearGRPOLoss": "fastrl.losses.fused_grpo",
    "dpo_loss": "fastrl.losses.dpo",
    "ld_sequence_logps": "fastrl.losses.dpo",
    "FusedLinearDPOLoss": "fastrl.losses.fused_dpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastrl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
