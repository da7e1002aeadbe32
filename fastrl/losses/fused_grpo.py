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
from logp itself), vespo's gamma weights (a sequence sum of log-ratios) and the off-policy mask (a
sequence mean of the sampling KL). There a first no-grad sweep computes the log-probs
(``linear_logprobs``, forward only: one extra ``2NHV``), the sequence terms follow from it, and the
one-pass sweep runs with them fixed;
the per-token parts use the log-probs of the second sweep, which are the same numbers.

``return_entropy=True`` adds the per-token entropy ``H_t = -sum_v p_v log p_v``, ``p = softmax(z_t)``, of
the same logits ``z = (h W^T + b) / temperature`` to the metrics, taken from a sweep that runs anyway:
the loss-only forward, else the first no-grad sweep where there is one, else the one-pass sweep. Where
there are two sweeps the first one takes it: its row pass costs the same in either, but it runs before
the gradient buffers exist, so the entropy's chunk-sized temporaries do not raise the one-pass sweep's
memory peak.

The entropy options of the loss (``grpo_loss``'s docstring):

- ``entropy_coef != 0`` (the entropy bonus) alone: its gradient ``dL/dH_t = -entropy_coef * m_t / sum m``
  is known upfront, so the one-pass sweep takes it as well (``fused_linear_logprobs_with_grad``'s entropy
  gradient, ``-dL/dH_t * p (log p + H_t)`` per logit row): no extra sweep, the entropy row pass added.
- ``top_entropy_quantile < 1``: which tokens train depends on a quantile of the whole batch's entropies,
  so no token's gradient is known before every entropy is. The first no-grad sweep therefore runs
  (forward only, ``2NHV`` plus the entropy row pass) with the entropy on, then the mask is fixed and the
  one-pass sweep runs with it; where a first sweep runs anyway (GSPO, vespo, the off-policy mask) the
  quantile costs only its entropy row pass. The result is exact, not an approximation from stale
  entropies: both sweeps compute the same logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrl.losses._fused import AttachGrads, check_fused_options
from fastrl.losses.grpo import check_grpo_inputs, grpo_loss, needs_full_logp, prepare_grpo
from fastrl.losses.grpo_config import GRPOLossConfig, make_config
from fastrl.losses.grpo_math import compute_dtype, grpo_token_grad
from fastrl.ops._common import check_same_device
from fastrl.ops.linear_logprobs import fused_linear_logprobs_with_grad, linear_logprobs


class FusedLinearGRPOLoss(nn.Module):
    """GRPO loss from hidden states: ``grpo_loss(linear_logprobs(hidden, weight, labels), ...)`` in one pass.

    ``config``/``**options``: as ``grpo_loss`` (a ``GRPOLossConfig`` and field overrides). ``temperature``
    divides the logits; ``chunk_size`` is the tokens per logits chunk (None: ``linear_logprobs``' rule);
    ``impl`` as in the ops. The labels' ignore_index is -100. ``return_entropy``: also put the detached
    per-token entropy of ``softmax(logits / temperature)`` into ``metrics["entropy"]`` ([B, T], fp32; fp64
    for fp64 inputs), computed in a sweep over the vocabulary that runs anyway (module docstring). It
    covers every position, ignored ones included, as ``linear_logprobs(..., return_entropy=True)`` does:
    masking it is the caller's job. ``skip_ignored``: positions that carry nothing to the loss (label
    -100 and mask 0) are left out of the vocabulary sweeps (a rollout's right padding: the sweeps' cost is
    proportional to the rows swept); the loss, its gradients and the log-probs are the same, the returned
    entropy is 0 there.
    """

    def __init__(
        self,
        config: GRPOLossConfig | None = None,
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        impl: str = "auto",
        return_entropy: bool = False,
        skip_ignored: bool = False,
        **options,
    ):
        super().__init__()
        check_fused_options(temperature, impl, chunk_size)
        if not isinstance(return_entropy, bool):
            raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
        if not isinstance(skip_ignored, bool):
            raise ValueError(f"skip_ignored must be a bool, got {skip_ignored!r}")
        self.skip_ignored = skip_ignored
        self.config = make_config(config, options)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.impl = impl
        self.return_entropy = return_entropy

    def extra_repr(self) -> str:
        return (
            f"{self.config}, temperature={self.temperature}, chunk_size={self.chunk_size}, "
            f"impl={self.impl!r}, return_entropy={self.return_entropy}, skip_ignored={self.skip_ignored}"
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
        """``(loss, metrics)`` as ``grpo_loss``; ``metrics["logp"]`` is the detached fp32 [B, T] logp, and
        with ``return_entropy`` ``metrics["entropy"]`` the detached fp32 [B, T] entropy (fp64 inputs: fp64).

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
        check_grpo_inputs((B, T), old_logp, advantages, mask, ref_logp, engine_logp, cfg, entropy_given=True)
        check_same_device(hidden_BTH=hidden_BTH, mask=mask)
        ll_kwargs = dict(bias=bias, temperature=self.temperature, impl=self.impl, chunk_size=self.chunk_size)

        trainable = [t for t in (hidden_BTH, weight_VH, bias) if t is not None and t.requires_grad]
        want_entropy = self.return_entropy or cfg.needs_entropy
        keep = None  # the flat [B * T] rows the sweeps cover (None: all of them)
        if self.skip_ignored:
            kept = ((labels_BT != -100) | (mask != 0)).reshape(B * T)
            if not bool(kept.all()):
                keep = kept.nonzero().squeeze(1)
        if not (torch.is_grad_enabled() and trainable):
            # Loss only: one forward sweep and the elementwise loss.
            with torch.no_grad():
                logp, entropy = self._forward_sweep(
                    hidden_BTH, weight_VH, labels_BT, ll_kwargs, want_entropy, keep
                )
                loss, metrics = self._loss_and_metrics(
                    logp, old_logp, advantages, mask, ref_logp, engine_logp, entropy
                )
            return loss, metrics

        logp0 = entropy = None
        quantile = cfg.top_entropy_quantile < 1.0
        if quantile or needs_full_logp(cfg, old_logp, engine_logp):
            with torch.no_grad():  # the first sweep of the module docstring: forward only
                logp0, entropy = self._forward_sweep(
                    hidden_BTH, weight_VH, labels_BT, ll_kwargs, self.return_entropy or quantile, keep
                )
        # The math in the dtype of the log-probs (fp64 for fp64 inputs), as grpo_loss does.
        p = prepare_grpo(
            logp0, old_logp, advantages, mask, cfg, ref_logp=ref_logp, engine_logp=engine_logp,
            entropy=entropy, dtype=compute_dtype(hidden_BTH),
        )  # fmt: skip
        hidden_NH = hidden_BTH.reshape(B * T, H)
        # The entropy comes from this sweep when there was no first one (module docstring), and its
        # row pass runs here whenever the entropy bonus sends a gradient through it.
        with_entropy = (want_entropy and entropy is None) or cfg.entropy_coef != 0.0
        labels_N = labels_BT.reshape(B * T)
        swept = hidden_NH if keep is None else hidden_NH.detach().index_select(0, keep)
        res = fused_linear_logprobs_with_grad(
            swept, weight_VH, labels_N if keep is None else labels_N[keep], _chunk_grad_fn(p, B, T, keep),
            with_entropy=with_entropy, **ll_kwargs,
        )  # fmt: skip
        logp = _scatter_rows(res.logp, keep, B * T).view(B, T)
        if entropy is None and with_entropy:
            entropy = _scatter_rows(res.entropy, keep, B * T).view(B, T)
        grad_hidden = _scatter_rows(res.grad_hidden, keep, B * T)
        with torch.no_grad():
            loss, metrics = self._loss_and_metrics(
                logp, old_logp, advantages, mask, ref_logp, engine_logp, entropy
            )
        loss = AttachGrads.apply(
            loss, hidden_NH, weight_VH, bias, grad_hidden, res.grad_weight, res.grad_bias
        )
        return loss, metrics

    def _forward_sweep(self, hidden_BTH, weight_VH, labels_BT, ll_kwargs, with_entropy: bool, keep=None):
        """(logp, entropy or None) [B, T] from one forward-only sweep (over the flat rows ``keep`` only,
        0 elsewhere, when given)."""
        B, T, H = hidden_BTH.shape
        if keep is not None:
            hidden = hidden_BTH.reshape(B * T, H).index_select(0, keep)[None]
            labels = labels_BT.reshape(B * T)[keep][None]
        else:
            hidden, labels = hidden_BTH, labels_BT
        out = linear_logprobs(hidden, weight_VH, labels, return_entropy=with_entropy, **ll_kwargs)
        logp, entropy = out if with_entropy else (out, None)
        if keep is not None:
            logp = _scatter_rows(logp[0], keep, B * T).view(B, T)
            entropy = None if entropy is None else _scatter_rows(entropy[0], keep, B * T).view(B, T)
        return logp, entropy

    def _loss_and_metrics(self, logp, old_logp, advantages, mask, ref_logp, engine_logp, entropy):
        loss, metrics = grpo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, engine_logp=engine_logp,
            entropy=entropy if self.config.needs_entropy else None, config=self.config, impl="torch",
        )  # fmt: skip
        metrics["logp"] = logp.detach()
        if entropy is not None and self.return_entropy:
            metrics["entropy"] = entropy.detach()
        return loss, metrics


def _scatter_rows(t: torch.Tensor | None, keep: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``t`` ([K, ...], the rows ``keep`` of n) back to [n, ...], zeros elsewhere; ``t`` itself when
    ``keep`` is None."""
    if t is None or keep is None:
        return t
    return t.new_zeros((n, *t.shape[1:])).index_copy_(0, keep, t)


def _chunk_grad_fn(p, B: int, T: int, keep: torch.Tensor | None = None):
    """``grad_fn(rows, logp_C, entropy_C)`` over the flat [B * T] tokens (or the rows ``keep`` of them),
    from ``prepare_grpo``'s output."""

    def flatten(t):
        t = t.expand(B, T).reshape(B * T)
        return t if keep is None else t[keep]

    flat = {k: None if t is None else flatten(t) for k, t in p.token_tensors().items()}
    ent_grad = None if p.entropy_grad is None else flatten(p.entropy_grad)

    def grad_fn(rows: slice, logp_C: torch.Tensor, entropy_C: torch.Tensor | None):
        chunk = {k: None if t is None else t[rows] for k, t in flat.items()}
        if chunk["old_logp"] is None:  # old_logp=None means logp.detach()
            chunk["old_logp"] = logp_C
        return grpo_token_grad(logp_C, cfg=p.cfg, **chunk), None if ent_grad is None else ent_grad[rows]

    return grad_fn
