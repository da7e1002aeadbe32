"""The engine's sampler: top-k / top-p filters on hand-made cases, exact log-probs, the sampled
distribution matches the filtered softmax."""

from __future__ import annotations

import pytest
import torch

from fastrl.engine.sampling import filter_logits, sample_next


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
    # Ties at the k-th value are all kept.
    assert _kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)[0]) == {1, 2}


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
def test_logp_is_the_temperature_scaled_full_distribution(seed, temperature):
    logits = torch.randn(9, 101) * 3
    tokens, logp = sample_next(logits, temperature=temperature, top_k=7, top_p=0.9)
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
    scale = temperature if temperature > 0 else 1.0
    truth = torch.log_softmax(logits.double() / scale, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), truth, rtol=1e-6, atol=1e-6)
    if temperature == 0:
        assert torch.equal(tokens, logits.argmax(-1))
    else:
        assert bool(
            torch.isfinite(filter_logits(logits / temperature, top_k=7, top_p=0.9))
            .gather(-1, tokens[:, None])
            .all()
        )


def test_half_precision_logits(seed):
    logits = torch.randn(4, 33).bfloat16()
    tokens, logp = sample_next(logits, temperature=0.0)
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert logp.dtype == torch.float32


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
