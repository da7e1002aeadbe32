"""The next-token sampler of the embedded engine: temperature, top-k, top-p, then a seeded draw."""

from __future__ import annotations

import torch


def filter_logits(scaled_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``scaled_BV`` with the excluded tokens set to ``-inf`` (a new tensor; fp32 in, fp32 out).

    top-k keeps the tokens whose logit is at least the k-th largest (ties at the k-th value are all
    kept). top-p then keeps, in order of decreasing probability under the top-k-renormalised softmax, the
    smallest prefix whose cumulative probability reaches ``top_p``: a token is dropped when the mass of
    the tokens ranked strictly above it is already >= ``top_p``. The most likely token always survives.
    """
    out = scaled_BV.clone()
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out.masked_fill_(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(out, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        mass_above_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
        drop_sorted = mass_above_BV >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order_BV, drop_sorted)
        out.masked_fill_(drop, float("-inf"))
    return out


def sample_next(
    logits_BV: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns ``(tokens_B int64, logp_B fp32)``.

    ``temperature > 0``: ``tokens ~ softmax(filter_logits(logits / temperature))`` with
    ``torch.multinomial`` on ``generator``, and ``logp = log_softmax(logits / temperature)[token]``: the
    full temperature-scaled distribution, before top-k/top-p, which is what the trainer's policy computes
    (TRL/vLLM report the same). ``temperature == 0``: ``tokens = argmax(logits)`` (the lowest id among
    ties) and ``logp = log_softmax(logits)[token]``.
    """
    logits_BV = logits_BV.float()
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
    else:
        scaled_BV = logits_BV / temperature
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        if top_k or top_p < 1.0:
            probs_BV = torch.softmax(filter_logits(scaled_BV, top_k=top_k, top_p=top_p), dim=-1)
        else:
            probs_BV = logp_BV.exp()
        tokens_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
