"""The engine's sampler: top-k / top-p filters on hand-made cases, the log-prob contract (the distribution
actually sampled from) against float64, the sampled distribution matches the filtered softmax, per-row
draws, and its memory: one full-vocabulary copy at most without top-p."""

from __future__ import annotations

import pytest
import torch

from fastrl.bench.harness import cpu_peak_bytes
from fastrl.engine.sampling import filter_logits, sample_next, sampled_logprobs


def _kept(filtered):
    return set(torch.isfinite(filtered).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "top_p, expected", [(0.4, {3}), (0.75, {3, 0}), (0.85, {3, 0, 1}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_hand_case(top_p, expected):
    probs = torch.tensor([0.3, 0.15, 0.05, 0.5])
    assert _kept(filter_logits(probs.log()[None], top_p=top_p)[0]) == expected


def test_top_k_then_top_p_renormalises():
    # After top-k=2 the survivors have probabilities 0.5/0.8 and 0.3/0.8 = 0.625, 0.375.
    logits = torch.tensor([[0.3, 0.15, 0.05, 0.5]]).log()
    assert _kept(filter_logits(logits, top_k=2)[0]) == {0, 3}
    assert _kept(filter_logits(logits, top_k=2, top_p=0.6)[0]) == {3}
    assert _kept(filter_logits(logits, top_k=2, top_p=0.7)[0]) == {0, 3}
    # Exactly k survive, as torch.topk returns them (one of the tied 2.0s here).
    assert len(_kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)[0])) == 1


def test_filters_random(seed):
    logits = torch.randn(7, 53)
    kept = torch.isfinite(filter_logits(logits, top_k=5))
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, logits.topk(5, -1).indices, True))
    p = 0.8
    filtered = filter_logits(logits, top_p=p)
    probs = logits.softmax(-1)
    for row in range(7):
        keep = torch.isfinite(filtered[row])
        # The kept set is the most likely tokens, reaches p, and is minimal.
        assert probs[row][keep].min() >= torch.cat([probs[row][~keep], torch.zeros(1)]).max()
        assert probs[row][keep].sum() >= p
        assert probs[row][keep].sum() - probs[row][keep].min() < p
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0, 1.7])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (7, 1.0), (0, 0.9), (7, 0.9), (200, 0.5)])
def test_logp_is_the_sampled_distribution(seed, temperature, top_k, top_p):
    """logp = log softmax(filter(logits / T))[token], renormalised over the kept tokens; greedy: T=1, full."""
    logits = torch.randn(9, 101) * 3
    before = logits.clone()
    tokens, logp = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(logits, before)  # the caller's logits are never overwritten
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
    if temperature == 0:
        truth = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.equal(tokens, logits.argmax(-1))
    else:
        filtered = filter_logits(logits.double() / temperature, top_k=top_k, top_p=top_p).double()
        truth = torch.log_softmax(filtered, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert bool(torch.isfinite(truth).all())  # only kept tokens are drawn
    torch.testing.assert_close(logp.double(), truth, rtol=1e-6, atol=1e-6)
    ref = sampled_logprobs(logits, tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(ref.double(), truth, rtol=1e-6, atol=1e-6)


def test_logp_is_zero_for_a_single_survivor(seed):
    logits = torch.randn(5, 40)
    _, logp = sample_next(logits, temperature=0.9, top_k=1)
    assert torch.equal(logp, torch.zeros(5))
    _, logp = sample_next(logits, temperature=0.9, top_p=1e-6)
    assert torch.equal(logp, torch.zeros(5))


def test_each_row_draws_from_its_own_uniform(seed):
    """A row's token depends only on its logits and its uniform: shuffling the rows shuffles the tokens."""
    logits, u = torch.randn(16, 77) * 2, torch.rand(16)
    perm = torch.randperm(16)
    for top_k, top_p in [(0, 1.0), (9, 1.0), (0, 0.8), (9, 0.8)]:
        a, la = sample_next(logits, temperature=0.8, top_k=top_k, top_p=top_p, uniform_B=u)
        b, lb = sample_next(logits[perm], temperature=0.8, top_k=top_k, top_p=top_p, uniform_B=u[perm])
        assert torch.equal(a[perm], b) and torch.equal(la[perm], lb)
        # The inverse CDF: u = 0 draws the first kept token in the CDF order, u -> 1 the last.
        lo, _ = sample_next(logits, temperature=0.8, top_k=top_k, top_p=top_p, uniform_B=torch.zeros(16))
        hi, _ = sample_next(
            logits, temperature=0.8, top_k=top_k, top_p=top_p, uniform_B=torch.full((16,), 1 - 1e-7)
        )
        kept = torch.isfinite(filter_logits(logits / 0.8, top_k=top_k, top_p=top_p))
        if top_k or top_p < 1:  # sorted order: the most likely token first
            assert torch.equal(lo, logits.argmax(-1))
        else:  # vocabulary order: the lowest id (all kept)
            assert torch.equal(lo, torch.zeros(16, dtype=torch.long))
        assert bool(kept.gather(-1, hi[:, None]).all())


@pytest.mark.parametrize(
    "top_k, top_p, most", [(0, 1.0, 1.05), (50, 1.0, 0.05), (50, 0.9, 0.05), (0, 0.9, 4.05)]
)
def test_memory_per_step(top_k, top_p, most):
    """Extra bytes of one step in units of one fp32 [B, V] copy: one without filters, a small fraction
    with top-k (top-p then runs on the k survivors), a sort (values, int64 indices, its buffer) for top-p."""
    B, V = 4, 50_000
    logits = torch.randn(B, V)
    peak, _ = cpu_peak_bytes(lambda: sample_next(logits, temperature=0.8, top_k=top_k, top_p=top_p))
    assert peak / (B * V * 4) <= most


def test_half_precision_logits(seed):
    logits = torch.randn(4, 33).bfloat16()
    tokens, logp = sample_next(logits, temperature=0.0)
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert logp.dtype == torch.float32
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.9)]:
        tokens, logp = sample_next(logits, temperature=0.7, top_k=top_k, top_p=top_p)
        truth = sampled_logprobs(logits.double(), tokens, temperature=0.7, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(logp.double(), truth.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (6, 0.8)])
def test_sampled_frequencies(seed, top_k, top_p):
    n, temperature = 40_000, 0.8
    logits = torch.randn(12)
    expected = torch.softmax(filter_logits((logits / temperature)[None], top_k=top_k, top_p=top_p), -1)[0]
    gen = torch.Generator().manual_seed(seed)
    tokens, _ = sample_next(
        logits.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
    )
    freq = torch.bincount(tokens, minlength=12).double() / n
    assert bool((freq[expected == 0] == 0).all())
    bound = 5 * (expected * (1 - expected) / n).sqrt() + 1e-4  # five standard errors
    assert bool(((freq - expected).abs() <= bound).all()), (freq, expected)


def test_seeded_generator_reproduces(seed):
    logits = torch.randn(64, 30)
    draws = [
        sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(seed))[0]
        for _ in range(2)
    ]
    assert torch.equal(*draws)
    other = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(seed + 1))[0]
    assert not torch.equal(draws[0], other)
