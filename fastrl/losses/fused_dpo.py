"""DPO straight from hidden states: lm_head, per-token log-probs, (LD-)sequence sums and any DPO loss in one
call, without materialising the [N, V] logits, with exact gradients to hidden, weight and bias.

Why two sweeps over the vocabulary for the policy: a DPO variant's gradient with respect to a token's
log-prob is ``dL/dlogp_t = dL/dS_p * w_t`` where ``S_p`` is its sequence's (LD-weighted) log-prob sum and
``w_t`` is 1 (or LD-DPO's ``ld_alpha`` past the shorter completion). ``dL/dS_p`` depends on the whole
sequence, so it is unknown until every token of the pair is seen. The module therefore runs

1. a no-grad log-prob sweep (1 matmul, ``linear_logprobs``) over policy rows — and, in the same call when
   the reference shares the weight, the reference rows — giving the sequence sums;
2. the loss and ``dL/dS`` on the [2P] sums (tiny);
3. the one-pass primitive ``fused_linear_logprobs_with_grad`` with the now known per-token gradient:
   logits again, then ``grad_hidden`` and ``grad_weight`` (3 matmuls).

Policy: 4 vocabulary matmuls (the logits of step 1 are not kept: that would be [N, V]); reference: 1
(none when its log-probs are precomputed). WPO weighting (``use_weighting``) adds one no-grad sweep over
the policy rows (1 matmul): WPO needs ``log sum_v p_v^2`` per token, and since
``log sum_v p_v^2 = 2 logp_T - logp_{T/2}`` (``logp_τ`` the label's log-prob at temperature τ, as
``lse(2z/T) - 2 lse(z/T)`` rewrites), WPO's aligned log-prob ``logp_T - log sum_v p_v^2`` is exactly
``logp_{T/2} - logp_T``: a log-prob sweep at half the temperature, no new kernel. The ``sft`` term's
gradient is 1 per chosen token (never LD-weighted), added to the LD-weighted DPO gradient.
Only completion rows (labels != ignore_index) enter any matmul,
so prompt and padding tokens cost nothing. Without a gradient to take (``torch.no_grad`` or frozen
inputs) step 3 is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrl.losses._fused import AttachGrads, check_fused_options
from fastrl.losses.dpo import (
    dpo_loss,
    ld_sequence_logps,
    ld_token_weights,
    loss_types_of,
    validate_dpo_options,
    wpo_weights,
)
from fastrl.ops._common import check_float, check_labels, check_same_device


def _check_hidden(name: str, hidden: torch.Tensor, dims: tuple[int | None, ...]) -> None:
    check_float(name, hidden)
    ok = hidden.dim() == 3 and all(d is None or d == s for d, s in zip(dims, hidden.shape))
    if not ok:
        want = ", ".join("T" if d is None else str(d) for d in dims)
        raise ValueError(f"{name} must have shape [{want}], got {tuple(hidden.shape)}")


def _check_head(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float(f"{prefix}weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape [V, H], got {tuple(weight.shape)}")
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{prefix}bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )


class FusedLinearDPOLoss(nn.Module):
    """``dpo_loss`` of the (LD-)sequence log-probs of ``hidden @ weight.T + bias``, fused (see module doc).

    Options (keyword-only): ``beta``, ``loss_type`` (a name or a list), ``loss_weights``,
    ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef`` and per-type ``options`` as in
    :func:`fastrl.losses.dpo.dpo_loss` (for ``ipo``, ``sigmoid_norm`` and ``sft`` the completion token
    counts, and sft's plain chosen sums, are passed for you, as TRL does); ``use_weighting``: WPO's
    per-pair weights (:func:`fastrl.losses.dpo.wpo_weights`) from the policy; ``ld_alpha`` None (plain
    sums) or in [0, 1] (LD-DPO, applied to policy and in-call reference); ``temperature`` divides the
    logits of the policy and of the in-call reference;
    ``ignore_index`` marks prompt and padding labels; ``chunk_size`` and ``impl`` go to the log-prob ops.
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: list[float] | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        impl: str = "auto",
        **options,
    ) -> None:
        super().__init__()
        taken = {"chosen_lengths", "rejected_lengths", "sft_chosen_logps"} & set(options)
        if taken:
            raise ValueError(f"{sorted(taken)} are taken from the labels and log-probs; do not pass them")
        self.div = dict(
            loss_weights=None if loss_weights is None else list(loss_weights),
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
        )
        self.options = validate_dpo_options(beta, loss_type, label_smoothing, options, **self.div)
        self.types = loss_types_of(loss_type)
        if not isinstance(use_weighting, bool):
            raise ValueError(f"use_weighting must be a bool, got {use_weighting!r}")
        if use_weighting and set(self.types) & {"aot", "aot_unpaired"}:
            raise ValueError(
                "use_weighting does not apply to aot / aot_unpaired (their sorts reorder the pairs)"
            )
        self.use_weighting = use_weighting
        if ld_alpha is not None and (
            isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0 <= ld_alpha <= 1
        ):
            raise ValueError(f"ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
        check_fused_options(temperature, impl, chunk_size)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.ld_alpha, self.temperature, self.ignore_index = ld_alpha, temperature, ignore_index
        self.chunk_size, self.impl = chunk_size, impl

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.div.items())}, use_weighting={self.use_weighting}, "
            f"ld_alpha={self.ld_alpha}, temperature={self.temperature}, impl={self.impl!r}"
        )

    def forward(
        self,
        hidden_chosen: torch.Tensor,
        hidden_rejected: torch.Tensor,
        weight: torch.Tensor,
        labels_chosen: torch.Tensor,
        labels_rejected: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ref_hidden_chosen: torch.Tensor | None = None,
        ref_hidden_rejected: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args: ``hidden_*`` [P, T, H] (chosen and rejected may differ in T) final hidden states;
        ``labels_*`` [P, T] already shifted (``labels[p, t]`` is the token scored from ``hidden[p, t]``),
        ``ignore_index`` on prompt and padding; ``weight`` [V, H], ``bias`` [V] the lm_head. The reference
        is either ``ref_chosen_logps`` / ``ref_rejected_logps`` [P] (precomputed sums, LD-weighted if
        ``ld_alpha`` is set) or ``ref_hidden_chosen`` / ``ref_hidden_rejected`` shaped like the policy's
        in T, scored with ``ref_weight`` / ``ref_bias`` (default: the policy's ``weight`` / ``bias``)
        under no_grad. Returns ``(loss, metrics)`` as ``dpo_loss`` does.
        """
        P, Tc, H = self._check(
            hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected, bias, ref_chosen_logps,
            ref_rejected_logps, ref_weight, ref_bias, ref_hidden_chosen, ref_hidden_rejected,
        )  # fmt: skip
        Tr = hidden_rejected.shape[1]
        mask_c, mask_r = labels_chosen != self.ignore_index, labels_rejected != self.ignore_index
        alpha = 1.0 if self.ld_alpha is None else self.ld_alpha
        # The log-probs' dtype: fp32, or fp64 for fp64 inputs (so the loss math keeps fp64 precision).
        acc = torch.float64 if hidden_chosen.dtype == torch.float64 else torch.float32
        idx_c, idx_r = mask_c.reshape(-1).nonzero().squeeze(1), mask_r.reshape(-1).nonzero().squeeze(1)
        # Every row below is one completion token: chosen rows first, then rejected. ``seq`` maps a row to
        # its sequence in the [2P] vector of sums (chosen p -> p, rejected p -> P + p).
        labels_n = torch.cat([labels_chosen.reshape(-1)[idx_c], labels_rejected.reshape(-1)[idx_r]])
        seq_n = torch.cat([idx_c // Tc, P + idx_r // Tr])
        w_n = torch.cat(
            [
                ld_token_weights(mask_c, mask_r, alpha, dtype=acc).reshape(-1)[idx_c],
                ld_token_weights(mask_r, mask_c, alpha, dtype=acc).reshape(-1)[idx_r],
            ]
        )

        def rows(hc: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
            return torch.cat([hc.reshape(-1, hc.shape[-1])[idx_c], hr.reshape(-1, hr.shape[-1])[idx_r]])

        def sums(logp_n: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(2 * P, dtype=acc, device=logp_n.device)
            return out.index_add_(0, seq_n, logp_n.to(acc) * w_n.to(acc))

        hidden_n = rows(hidden_chosen, hidden_rejected)
        head = dict(temperature=self.temperature, ignore_index=self.ignore_index, chunk_size=self.chunk_size)
        with torch.no_grad():
            ref_rows = None if ref_hidden_chosen is None else rows(ref_hidden_chosen, ref_hidden_rejected)
            if ref_rows is not None and ref_weight is None and ref_rows.dtype == hidden_n.dtype:
                # Same lm_head for both: one sweep over policy and reference rows together.
                logp_2n = self._logprobs(
                    torch.cat([hidden_n, ref_rows]), weight, labels_n.repeat(2), bias, head
                )
                logp_n, ref_logp_n = logp_2n.split(labels_n.numel())
                ref_seq = sums(ref_logp_n)
            else:
                logp_n = self._logprobs(hidden_n, weight, labels_n, bias, head)
                if ref_rows is not None:
                    ref_w, ref_b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
                    ref_seq = sums(self._logprobs(ref_rows, ref_w, labels_n, ref_b, head))
                else:
                    ref_seq = torch.cat([ref_chosen_logps, ref_rejected_logps]).to(acc)

        options = dict(self.options)
        if set(self.types) & {"ipo", "sigmoid_norm", "sft"}:
            options.update(chosen_lengths=mask_c.sum(1), rejected_lengths=mask_r.sum(1))
        pair_weights = None
        if self.use_weighting:
            with torch.no_grad():  # WPO: logp at half the temperature (module docstring)
                half = dict(head, temperature=self.temperature / 2)
                aligned = self._logprobs(hidden_n, weight, labels_n, bias, half).to(acc) - logp_n.to(acc)
                n_seq = torch.zeros(2 * P, dtype=acc, device=aligned.device)
                n_seq.index_add_(0, seq_n, torch.ones_like(aligned))
                v = torch.zeros_like(n_seq).index_add_(0, seq_n, aligned).div_(n_seq.clamp(min=1)).exp_()
                pair_weights = v[:P] * v[P:]
        seq = sums(logp_n).requires_grad_()
        wrt = [seq]
        if "sft" in self.types and self.ld_alpha is not None:
            # sft reads the plain chosen sums, not the LD-weighted ones
            plain = torch.zeros(P, dtype=acc, device=logp_n.device)
            plain = plain.index_add_(0, seq_n[: idx_c.numel()], logp_n[: idx_c.numel()].to(acc))
            options["sft_chosen_logps"] = plain.requires_grad_()
            wrt.append(options["sft_chosen_logps"])
        with torch.enable_grad():
            loss, metrics = dpo_loss(
                seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing, pair_weights=pair_weights, **self.div, **options,
            )  # fmt: skip
            if loss.requires_grad:
                grads_seq = torch.autograd.grad(loss, wrt, allow_unused=True)
            else:
                grads_seq = [None] * len(wrt)
        loss = loss.detach()
        grad_seq = torch.zeros_like(seq) if grads_seq[0] is None else grads_seq[0]
        grad_n = grad_seq[seq_n] * w_n
        if len(wrt) == 2 and grads_seq[1] is not None:  # sft's weight-1 gradient on the chosen rows
            grad_n[: idx_c.numel()] += grads_seq[1][seq_n[: idx_c.numel()]]

        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden_n, weight, bias)
        )
        if not needs_grad:
            return loss, metrics
        grads = self._grads(hidden_n, weight, labels_n, bias, grad_n, head)
        return AttachGrads.apply(loss, hidden_n, weight, bias, *grads), metrics

    def _logprobs(self, hidden_n, weight, labels_n, bias, head) -> torch.Tensor:
        from fastrl.ops.linear_logprobs import linear_logprobs

        if hidden_n.shape[0] == 0:
            return hidden_n.new_zeros(
                0, dtype=torch.float64 if hidden_n.dtype == torch.float64 else torch.float32
            )
        return linear_logprobs(
            hidden_n.detach(), weight.detach(), labels_n, bias=None if bias is None else bias.detach(),
            impl=self.impl, **head,
        )  # fmt: skip

    def _grads(self, hidden_n, weight, labels_n, bias, grad_logp_n, head):
        """(grad_hidden [n, H], grad_weight | None, grad_bias | None) of ``sum_n grad_logp_n * logp_n``."""
        from fastrl.ops.linear_logprobs import fused_linear_logprobs_with_grad

        weight_d = weight.detach().requires_grad_(weight.requires_grad)
        bias_d = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        if hidden_n.shape[0] == 0:
            zeros = lambda t: None if t is None or not t.requires_grad else torch.zeros_like(t)
            return torch.zeros_like(hidden_n), zeros(weight_d), zeros(bias_d)
        grad_fn = lambda rows, logp, entropy: (grad_logp_n[rows], None)
        out = fused_linear_logprobs_with_grad(
            hidden_n.detach(), weight_d, labels_n, grad_fn, bias=bias_d, impl=self.impl, **head
        )
        return out.grad_hidden, out.grad_weight, out.grad_bias

    def _check(
        self, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected, bias,
        ref_chosen_logps, ref_rejected_logps, ref_weight, ref_bias, ref_hidden_chosen, ref_hidden_rejected,
    ) -> tuple[int, int, int]:  # fmt: skip
        _check_head("", weight, bias)
        V, H = weight.shape
        _check_hidden("hidden_chosen", hidden_chosen, (None, None, H))
        P = hidden_chosen.shape[0]
        _check_hidden("hidden_rejected", hidden_rejected, (P, None, H))
        check_labels("labels_chosen", labels_chosen, hidden_chosen.shape[:2], V, self.ignore_index)
        check_labels("labels_rejected", labels_rejected, hidden_rejected.shape[:2], V, self.ignore_index)
        has_logps = (ref_chosen_logps is not None, ref_rejected_logps is not None)
        has_hidden = (ref_hidden_chosen is not None, ref_hidden_rejected is not None)
        if (
            not (all(has_logps) ^ all(has_hidden))
            or any(has_logps) != all(has_logps)
            or (any(has_hidden) != all(has_hidden))
        ):
            raise ValueError(
                "give the reference either as ref_chosen_logps and ref_rejected_logps or as "
                "ref_hidden_chosen and ref_hidden_rejected (exactly one pair)"
            )
        if all(has_logps):
            if ref_weight is not None or ref_bias is not None:
                raise ValueError("ref_weight/ref_bias apply only with ref_hidden_chosen/ref_hidden_rejected")
            for name, t in (
                ("ref_chosen_logps", ref_chosen_logps),
                ("ref_rejected_logps", ref_rejected_logps),
            ):
                check_float(name, t)
                if t.shape != (P,):
                    raise ValueError(f"{name} must have shape [P] = [{P}], got {tuple(t.shape)}")
        else:
            if ref_weight is None and ref_bias is not None:
                raise ValueError(
                    "ref_bias needs ref_weight (without it the policy's weight and bias are used)"
                )
            if ref_weight is not None:
                _check_head("ref_", ref_weight, ref_bias)
                if ref_weight.shape[0] != V:
                    raise ValueError(
                        f"ref_weight must have V = {V} rows like weight, got {ref_weight.shape[0]}"
                    )
            ref_h = H if ref_weight is None else ref_weight.shape[1]
            _check_hidden("ref_hidden_chosen", ref_hidden_chosen, (P, hidden_chosen.shape[1], ref_h))
            _check_hidden("ref_hidden_rejected", ref_hidden_rejected, (P, hidden_rejected.shape[1], ref_h))
        check_same_device(
            hidden_chosen=hidden_chosen, hidden_rejected=hidden_rejected, weight=weight, bias=bias,
            labels_chosen=labels_chosen, labels_rejected=labels_rejected, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ref_weight=ref_weight, ref_bias=ref_bias,
            ref_hidden_chosen=ref_hidden_chosen, ref_hidden_rejected=ref_hidden_rejected,
        )  # fmt: skip
        return P, hidden_chosen.shape[1], H


# The keyword tensors of FusedLinearDPOLoss.forward.
_FORWARD_TENSORS = (
    "bias", "ref_chosen_logps", "ref_rejected_logps", "ref_weight", "ref_bias", "ref_hidden_chosen",
    "ref_hidden_rejected",
)  # fmt: skip


def linear_dpo_reference(
    hidden_chosen: torch.Tensor,
    hidden_rejected: torch.Tensor,
    weight: torch.Tensor,
    labels_chosen: torch.Tensor,
    labels_rejected: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain PyTorch composition ``linear_logprobs_reference`` (materialised logits) -> (LD-)masked sums
    -> ``dpo_loss``, differentiated by autograd: what :class:`FusedLinearDPOLoss` computes, for tests and
    benchmarks. ``kwargs`` are the keyword arguments of the module's constructor and of its ``forward``
    together (``chunk_size`` and ``impl`` are accepted and unused)."""
    from fastrl.ops.linear_logprobs import linear_logprobs_reference

    t = {k: kwargs.pop(k, None) for k in _FORWARD_TENSORS}
    m = FusedLinearDPOLoss(**kwargs)  # the module's option checks and per-type defaults
    alpha = 1.0 if m.ld_alpha is None else m.ld_alpha

    mask_c, mask_r = labels_chosen != m.ignore_index, labels_rejected != m.ignore_index

    def token_logps(hc, hr, w, b):
        logps = []
        for h, y in ((hc, labels_chosen), (hr, labels_rejected)):
            logp = linear_logprobs_reference(
                h.reshape(-1, h.shape[-1]), w, y.reshape(-1), bias=b, temperature=m.temperature,
                ignore_index=m.ignore_index,
            )  # fmt: skip
            logps.append(logp.reshape(y.shape))
        return logps

    def seq_logps(hc, hr, w, b):
        logps = token_logps(hc, hr, w, b)
        return ld_sequence_logps(logps[0], mask_c, logps[1], mask_r, alpha)

    chosen, rejected = seq_logps(hidden_chosen, hidden_rejected, weight, t["bias"])
    ref_chosen, ref_rejected = t["ref_chosen_logps"], t["ref_rejected_logps"]
    if ref_chosen is None:
        with torch.no_grad():
            w, b = (weight, t["bias"]) if t["ref_weight"] is None else (t["ref_weight"], t["ref_bias"])
            ref_chosen, ref_rejected = seq_logps(t["ref_hidden_chosen"], t["ref_hidden_rejected"], w, b)
    options = dict(m.options)
    if set(m.types) & {"ipo", "sigmoid_norm", "sft"}:
        options["chosen_lengths"] = mask_c.sum(1)
        options["rejected_lengths"] = mask_r.sum(1)
    if "sft" in m.types and m.ld_alpha is not None:
        plain = token_logps(hidden_chosen, hidden_rejected, weight, t["bias"])[0]
        options["sft_chosen_logps"] = torch.where(mask_c, plain, 0.0).sum(1)
    pair_weights = None
    if m.use_weighting:
        with torch.no_grad():  # WPO from the materialised logits: log sum_v p_v^2 = logsumexp(2 log p)
            parts = []
            for h, y in ((hidden_chosen, labels_chosen), (hidden_rejected, labels_rejected)):
                z = h @ weight.T if t["bias"] is None else h @ weight.T + t["bias"]
                z = z.to(torch.promote_types(z.dtype, torch.float32)) / m.temperature
                log_p = torch.log_softmax(z, -1)
                lp = log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0]
                parts += [lp, torch.logsumexp(2 * log_p, -1)]
            pair_weights = wpo_weights(parts[0], parts[1], mask_c, parts[2], parts[3], mask_r)
    return dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=m.beta, loss_type=m.loss_type,
        label_smoothing=m.label_smoothing, pair_weights=pair_weights, **m.div, **options,
    )  # fmt: skip
