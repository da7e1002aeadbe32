"""``FusedLinearGRPOLoss``: hidden states and the lm_head weight straight to the GRPO loss.

With token-level ratios the GRPO gradient of a token, ``dloss/dlogp_t`` (``grpo_math.grpo_token_grad``),
depends only on that token's log-prob and on data known upfront (old/ref/engine log-probs, advantage,
mask, the normaliser, which comes from the mask or ``num_items_in_batch``). So the forward makes one
sweep over the vocabulary with ``fused_linear_logprobs_with_grad``: per chunk of tokens, logits, log-probs,
the GRPO gradient, the logits gradient and the two gradient products. The gradients to hidden, weight
and bias are stashed and the returned loss's backward only scales them by the upstream gradient
(Liger-style): there is no second pass over the vocabulary.

Sequence-level ratios (GSPO) need the sequence mean of the log-ratio before any token's gradient is
known, and so do sequence-level IS weights (and token-level ones without ``old_logp``, which then come
from logp itself). There a first no-grad sweep computes the log-probs (``linear_logprobs``, forward only:
one extra ``2NHV``), the sequence terms follow from it, and the one-pass sweep runs with them fixed;
the per-token parts use the log-probs of the second sweep, which are the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrl.losses.grpo import check_grpo_inputs, grpo_loss, needs_full_logp, prepare_grpo
from fastrl.losses.grpo_config import GRPOLossConfig, make_config
from fastrl.losses.grpo_math import grpo_token_grad
from fastrl.ops._common import IMPLS, check_same_device, check_temperature
from fastrl.ops.linear_logprobs import fused_linear_logprobs_with_grad, linear_logprobs


class _StashedGrads(torch.autograd.Function):
    """Returns ``loss``; its backward hands out gradients computed in the forward, times the upstream."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.hidden_shape = hidden.shape
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = ctx.grads
        ctx.grads = None  # a second backward has nothing left to hand out

        def scale(g):
            return None if g is None else g * grad_loss.to(g.dtype)

        gh = scale(gh)
        return None, None if gh is None else gh.view(ctx.hidden_shape), scale(gw), scale(gb), None, None, None


class FusedLinearGRPOLoss(nn.Module):
    """GRPO loss from hidden states: ``grpo_loss(linear_logprobs(hidden, weight, labels), ...)`` in one pass.

    ``config``/``**options``: as ``grpo_loss`` (a ``GRPOLossConfig`` and field overrides). ``temperature``
    divides the logits; ``chunk_size`` is the tokens per logits chunk (None: ``linear_logprobs``' rule);
    ``impl`` as in the ops. The labels' ignore_index is -100.
    """

    def __init__(
        self,
        config: GRPOLossConfig | None = None,
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        impl: str = "auto",
        **options,
    ):
        super().__init__()
        check_temperature(temperature)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size <= 0):  # fmt: skip
            raise ValueError(f"chunk_size must be None or an int > 0, got {chunk_size!r}")
        self.config = make_config(config, options)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.impl = impl

    def extra_repr(self) -> str:
        return (
            f"{self.config}, temperature={self.temperature}, chunk_size={self.chunk_size}, impl={self.impl!r}"
        )

    def forward(
        self,
        hidden_BTH: torch.Tensor,
        weight_VH: torch.Tensor,
        labels_BT: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        engine_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` as ``grpo_loss``; ``metrics["logp"]`` is the detached fp32 [B, T] logp.

        hidden_BTH [B, T, H], weight_VH [V, H], labels_BT [B, T] (-100 ignored), bias [V] or None; the
        other tensors as in ``grpo_loss``. Gradients flow to hidden, weight and bias (those requiring it).
        """
        cfg = self.config
        if not isinstance(hidden_BTH, torch.Tensor) or hidden_BTH.dim() != 3:
            got = getattr(hidden_BTH, "shape", type(hidden_BTH).__name__)
            raise ValueError(f"hidden_BTH must be a tensor of shape [B, T, H], got {got}")
        B, T, H = hidden_BTH.shape
        if not isinstance(labels_BT, torch.Tensor) or tuple(labels_BT.shape) != (B, T):
            got = tuple(labels_BT.shape) if isinstance(labels_BT, torch.Tensor) else type(labels_BT).__name__
            raise ValueError(f"labels_BT must have shape [B, T] = {(B, T)}, got {got}")
        check_grpo_inputs((B, T), old_logp, advantages, mask, ref_logp, engine_logp, cfg)
        check_same_device(hidden_BTH=hidden_BTH, mask=mask)
        ll_kwargs = dict(bias=bias, temperature=self.temperature, impl=self.impl, chunk_size=self.chunk_size)

        trainable = [t for t in (hidden_BTH, weight_VH, bias) if t is not None and t.requires_grad]
        if not (torch.is_grad_enabled() and trainable):
            # Loss only: one forward sweep and the elementwise loss.
            with torch.no_grad():
                logp = linear_logprobs(hidden_BTH, weight_VH, labels_BT, **ll_kwargs)
                loss, metrics = self._loss_and_metrics(
                    logp, old_logp, advantages, mask, ref_logp, engine_logp
                )
            return loss, metrics

        logp0 = None
        if needs_full_logp(cfg, old_logp, engine_logp):
            with torch.no_grad():  # the first sweep of the module docstring: forward only
                logp0 = linear_logprobs(hidden_BTH, weight_VH, labels_BT, **ll_kwargs)
        p = prepare_grpo(logp0, old_logp, advantages, mask, cfg, ref_logp=ref_logp, engine_logp=engine_logp)
        grad_fn = _chunk_grad_fn(p, B, T)
        res = fused_linear_logprobs_with_grad(
            hidden_BTH.reshape(B * T, H), weight_VH, labels_BT.reshape(B * T), grad_fn, **ll_kwargs
        )
        logp = res.logp.view(B, T)
        with torch.no_grad():
            loss, metrics = self._loss_and_metrics(logp, old_logp, advantages, mask, ref_logp, engine_logp)
        grad_hidden = res.grad_hidden if hidden_BTH.requires_grad else None
        grad_bias = res.grad_bias if bias is not None and bias.requires_grad else None
        loss = _StashedGrads.apply(loss, hidden_BTH, weight_VH, bias, grad_hidden, res.grad_weight, grad_bias)
        return loss, metrics

    def _loss_and_metrics(self, logp, old_logp, advantages, mask, ref_logp, engine_logp):
        loss, metrics = grpo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, engine_logp=engine_logp, config=self.config,
            impl="torch",
        )  # fmt: skip
        metrics["logp"] = logp.detach()
        return loss, metrics


def _chunk_grad_fn(p, B: int, T: int):
    """``grad_fn(rows, logp_C, entropy_C)`` over the flat [B * T] tokens, from ``prepare_grpo``'s output."""

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(B, T).reshape(B * T)

    old, adv, coef, ref, w = flat(p.old_logp), flat(p.adv), flat(p.coef), flat(p.ref_logp), flat(p.is_weight)
    seq_ratio = seq_chain = None
    if p.seq_log_ratio is not None:
        seq_ratio = flat(torch.exp(p.seq_log_ratio)[:, None])
        seq_chain = flat(p.mask.to(p.seq_chain.dtype) * p.seq_chain[:, None])

    def take(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if t is None else t[rows]

    def grad_fn(rows: slice, logp_C: torch.Tensor, entropy_C: torch.Tensor | None):
        g = grpo_token_grad(
            logp_C,
            logp_C if old is None else old[rows],
            adv[rows],
            coef[rows],
            p.cfg,
            ref_logp=take(ref, rows),
            is_weight=take(w, rows),
            seq_ratio=take(seq_ratio, rows),
            seq_chain=take(seq_chain, rows),
        )
        return g, None

    return grad_fn
