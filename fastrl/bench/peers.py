"""The computations fastrl is measured against, written here in plain PyTorch, and guarded imports of the
peer packages (Liger-Kernel, Cut Cross-Entropy).

- eager fp32: ``log_softmax`` of the logits upcast to fp32, then a gather.
- TRL-style ``selective_log_softmax``: the log-sum-exp taken one sequence (row of the batch) at a time in
  the input dtype, the label logit gathered, ``logp = logit[label] - logsumexp(logits)``; our own code with
  the same memory behaviour as TRL's loop (one row's temporaries alive at a time).
- GRPO loss on per-token log-probs (token-level ratio, two-sided PPO clip, k3 KL to the reference):
  ``r = exp(logp - old)``, ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref - logp) -
  (ref - logp) - 1)``, loss = ``sum(l * mask) / max(sum(mask), 1)`` (TRL's "bnpo" normalisation).
- DPO sigmoid loss on summed sequence log-probs: ``-mean(logsigmoid(beta ((c - c_ref) - (r - r_ref))))``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from fastrl.bench.harness import Skip

GRPO_BETA, GRPO_EPS = 0.04, 0.2
DPO_BETA = 0.1


def require(module: str):
    """Import a peer package or raise :class:`Skip` saying it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise Skip(f"{module} not installed ({type(err).__name__})") from err


def require_attr(module: str, name: str):
    mod = require(module)
    if not hasattr(mod, name):
        raise Skip(f"{module} {_version(module)} has no {name}")
    return getattr(mod, name)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return "?"


def peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("liger-kernel", "cut-cross-entropy", "trl", "triton"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------------------
# log-probs from logits


def eager_fp32_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(float(logits))[label]``: materialises an fp32 copy of the logits and its softmax."""
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def rowloop_logp(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """TRL-style: per batch row, ``logit[label] - logsumexp(logits)`` in the input dtype; fp32 result."""
    picked = logits_BTV.gather(-1, labels_BT.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits_BTV])
    return (picked - lse).float()


# ---------------------------------------------------------------------------------------------------------
# losses on per-token log-probs


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta=GRPO_BETA, eps=GRPO_EPS) -> torch.Tensor:
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    delta = ref_logp - logp
    per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta=DPO_BETA) -> torch.Tensor:
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def masked_sum(logp: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return (logp * (labels != ignore_index)).sum(-1)


def safe_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels with ignored positions set to 0, so a plain gather can run (their log-probs are masked)."""
    return labels.masked_fill(labels == ignore_index, 0)


# ---------------------------------------------------------------------------------------------------------
# peers


def cce_neg_logp(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, exact: bool):
    """Cut Cross-Entropy's per-token loss (``-logp``), gradient filtering on (its default) or off."""
    lce = require_attr("cut_cross_entropy", "linear_cross_entropy")
    opts = {"filter_eps": None} if exact else {}
    return lce(hidden, weight, labels, reduction="none", **opts)


def liger_cross_entropy():
    cls = require_attr("liger_kernel.transformers", "LigerCrossEntropyLoss")
    return cls(reduction="none")


def liger_grpo(**kwargs):
    cls = require_attr("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    return cls(**kwargs)


def liger_dpo(**kwargs):
    cls = require_attr("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss")
    return cls(**kwargs)


def first(out):
    """The loss of a module that returns ``loss`` or ``(loss, metrics...)``."""
    return out[0] if isinstance(out, (tuple, list)) else out
