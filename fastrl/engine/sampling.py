"""The next-token sampler of the embedded engine: temperature, top-k, top-p, then an inverse-CDF draw.

The log-prob contract (every engine's): a sampled token's log-prob is taken under the distribution it was
actually drawn from, ``log q(token)`` with ``q = softmax(filter(logits / T))`` renormalised over the kept
tokens. Greedy (``T == 0``) is the one exception, see :func:`sample_next`.

Cost per step on a ``[B, V]`` logits tensor (V up to ~150k):

- no filter: one fp32 copy (``logits / T``) that is exponentiated and cumulated in place;
- top-k: ``torch.topk`` (``[B, k]`` out, no full-vocabulary copy), top-p then works on the k survivors;
- top-p alone: one sort of the scaled logits (values and indices), then in-place work on the sorted copy.

Each row draws from one uniform number ``u`` by inverting its CDF in a fixed token order, so a row's token
depends only on its own logits and its own ``u``: the engine hands every row its own ``u`` (drawn in the
caller's row order), which makes the draws independent of which other rows share the batch (shared-prompt
prefill and finished-row compaction change no completion).
"""

from __future__ import annotations

import torch


def filter_logits(scaled_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The plain reference of the filters: ``scaled_BV`` with the excluded tokens set to ``-inf`` (a new
    tensor, fp32 or fp64).

    top-k keeps the k tokens ``torch.topk`` returns (one of equal logits at the k-th value may be left out).
    top-p then keeps, in order of decreasing probability under the top-k-renormalised softmax, the
    smallest prefix whose cumulative probability reaches ``top_p``: a token is dropped when the mass of
    the tokens ranked strictly above it is already >= ``top_p``. The most likely token always survives.
    """
    out = scaled_BV.to(torch.promote_types(scaled_BV.dtype, torch.float32)).clone()  # fp64 stays fp64
    V = out.shape[-1]
    if 0 < top_k < V:
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(
            -1, torch.topk(out, top_k, dim=-1).indices, True
        )
        out.masked_fill_(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(out, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        mass_above_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
        drop_sorted = mass_above_BV >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order_BV, drop_sorted)
        out.masked_fill_(drop, float("-inf"))
    return out


def sampled_logprobs(
    logits_BV: torch.Tensor, tokens_B: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Reference of the contract: ``log_softmax(filter_logits(logits / T))[token]`` (fp32; ``-inf`` for a
    token the filters exclude); ``T == 0``: ``log_softmax(logits)[token]``. For tests and other engines."""
    if temperature == 0:
        return torch.log_softmax(logits_BV.float(), -1).gather(-1, tokens_B[:, None]).squeeze(-1)
    filtered = filter_logits(logits_BV.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.log_softmax(filtered, -1).gather(-1, tokens_B[:, None]).squeeze(-1)


def _draw(cdf_BK: torch.Tensor, total_B1: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each (unnormalised, non-decreasing) CDF row that exceeds ``u * total``:
    entry j is drawn with probability ``(cdf[j] - cdf[j-1]) / total``, never a zero-probability one."""
    target_B1 = (u_B[:, None].to(cdf_BK.dtype) * total_B1).contiguous()
    idx_B = torch.searchsorted(cdf_BK, target_B1, right=True).squeeze(-1)
    return idx_B.clamp_(max=cdf_BK.shape[-1] - 1)  # u * total rounded up to total: the last entry


def _top_p_cut(cdf_BK: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """On a descending-sorted unnormalised CDF: (kept count n [B, 1], kept mass [B, 1]). Entry j is kept when
    the mass strictly above it, ``cdf[j-1] / cdf[-1]``, is < top_p; entry 0 always."""
    threshold_B1 = cdf_BK[:, -1:] * top_p
    n_B1 = torch.searchsorted(cdf_BK[:, :-1].contiguous(), threshold_B1, right=False) + 1
    return n_B1, cdf_BK.gather(-1, n_B1 - 1)


def sample_next(
    logits_BV: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns ``(tokens_B int64, logp_B fp32)``. ``logits_BV`` is not modified;
    the arithmetic is fp32 (fp64 for fp64 logits).

    ``temperature > 0``: ``tokens ~ q = softmax(filter_logits(logits / temperature, top_k, top_p))`` by
    inverting each row's CDF at ``uniform_B`` (drawn from ``generator``, or torch's global RNG, when None),
    and ``logp = log q(token)``: the log-prob under the distribution actually sampled from, renormalised
    over the kept tokens (``log_softmax(logits / T)[token] - log(kept mass)``).

    ``temperature == 0`` (greedy): ``tokens = argmax(logits)`` (the lowest id among ties) and ``logp =
    log_softmax(logits)[token]`` at temperature 1 over the full vocabulary. Greedy's own distribution is a
    point mass (log-prob 0, which says nothing); this value is the model's confidence in its choice. GRPO
    never samples greedily (``grpo.temperature > 0``), so no importance weight is ever built from it.
    """
    B, V = logits_BV.shape
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
        work = torch.promote_types(logits_BV.dtype, torch.float32)
        x_B = logits_BV.gather(-1, tokens_B[:, None]).squeeze(-1).to(work)
        return tokens_B, (x_B - torch.logsumexp(logits_BV.to(work), dim=-1)).float()
    if uniform_B is None:
        uniform_B = torch.rand(B, generator=generator, device=logits_BV.device)
    top_k = top_k if 0 < top_k < V else 0
    if top_k:  # [B, k] survivors, sorted descending; top-p (if any) runs on them only
        vals_BK, order_BK = torch.topk(logits_BV, top_k, dim=-1)
    elif top_p < 1.0:  # scaling by 1/T > 0 keeps the order: sort the logits themselves
        vals_BK, order_BK = torch.sort(logits_BV, dim=-1, descending=True)
    else:
        vals_BK, order_BK = logits_BV, None
    # The one full-vocabulary copy (none under top-k); everything after it works in place.
    work = torch.promote_types(logits_BV.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
    x_BK = vals_BK.to(work).div_(temperature) if order_BK is not None else vals_BK.to(work) / temperature
    # x_BK's row maximum: its first entry when sorted, else a reduction.
    max_B1 = x_BK[:, :1].clone() if order_BK is not None else x_BK.amax(-1, keepdim=True)
    # Gather the drawn token's scaled logit later from the source (x_BK is overwritten now).
    cdf_BK = x_BK.sub_(max_B1).exp_()  # unnormalised probabilities, in place
    if order_BK is not None and top_p < 1.0:
        cdf_BK.cumsum_(-1)
        n_B1, kept_B1 = _top_p_cut(cdf_BK, top_p)
        idx_B = torch.minimum(_draw(cdf_BK, kept_B1, uniform_B), n_B1.squeeze(-1) - 1)
    else:
        kept_B1 = cdf_BK.sum(-1, keepdim=True)  # pairwise sum: a more accurate total than the scan's end
        cdf_BK.cumsum_(-1)
        idx_B = _draw(cdf_BK, cdf_BK[:, -1:], uniform_B)
    tokens_B = idx_B if order_BK is None else order_BK.gather(-1, idx_B[:, None]).squeeze(-1)
    x_B = logits_BV.gather(-1, tokens_B[:, None]).squeeze(-1).to(work) / temperature
    return tokens_B, (x_B - max_B1.squeeze(-1) - kept_B1.squeeze(-1).log()).float()
