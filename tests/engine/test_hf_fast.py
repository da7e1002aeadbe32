"""HFEngine's fast paths change no completion: shared-prompt prefill against one prefill per completion,
finished-row compaction against none, sparse host checks; the compiled static decode stays one graph per
batch bucket (no graph break, no recompilation) across rounds and in-place weight updates."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from fastrl.engine import EngineConfig, SamplingParams
from fastrl.engine._lean import LeanDecoder
from fastrl.engine.hf import HFEngine, prompt_groups
from fastrl.engine.sampling import filter_logits
from fastrl.models.tiny import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# Stop ids covering 12 of the ~100 tokens: completions end at many different steps.
STOPS = list(range(20, 32))


def _model(tokenizer, seed):
    """float64: token comparisons must not hinge on rounding of near-ties. EOS's logit 0 is below the
    largest of ~100 others, so greedy never ends by itself (only at STOPS)."""
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1).double()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    return model


def _grpo_prompts(tokenizer, lengths, G):
    """Each prompt repeated G times in a row, as the GRPO trainer calls the engine."""
    return [p for n in lengths for p in [torch.randint(5, len(tokenizer), (n,)).tolist()] * G]


def _same(a, b, *, logp_tol=1e-6):  # fp64 models; the engine reports fp32 log-probs
    assert a.completion_ids == b.completion_ids
    assert a.truncated == b.truncated
    for x, y in zip(a.logprobs, b.logprobs):
        assert x == pytest.approx(y, abs=logp_tol)


def test_prompt_groups():
    assert prompt_groups([[1], [1], [2], [1], [1], [1]]) == [2, 1, 3]
    assert prompt_groups([[1, 2]]) == [1]
    assert prompt_groups([[1], [1, 1], [1]]) == [1, 1, 1]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_one_prefill_per_completion(tokenizer, seed, static, temperature):
    model = _model(tokenizer, seed)
    prompts = _grpo_prompts(tokenizer, [7, 3, 11], G=4)
    prompts.insert(5, prompts[0])  # [a a a a b a b b b c c c c]: the stable sort by length rejoins the a's
    base = dict(use_static_cache=static, cache_length_multiple=16, max_batch_size=8)
    shared = HFEngine(model, tokenizer, EngineConfig(**base))
    single = HFEngine(model, tokenizer, EngineConfig(**base, share_prompt_prefill=False))
    calls = []
    # (This hook on the model body also turns the lean decode step off: it bypasses the body's forward.
    # The lean step's own prefill sharing is tested in test_hf_lean.py.)
    model.model.register_forward_pre_hook(
        lambda m, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    params = SamplingParams(max_new_tokens=9, temperature=temperature, top_k=20, seed=seed)
    a = shared.generate(prompts, params)
    prefill_rows = [s[0] for s in calls if s[1] > 1]
    calls.clear()
    b = single.generate(prompts, params)
    assert prefill_rows == [2, 2]  # 13 rows sorted by length, batches of 8: [b b b b a a a a | a c c c c]
    assert [s[0] for s in calls if s[1] > 1] == [8, 5]
    _same(a, b)
    # And both are right: each row's log-probs are its own prompt's, recomputed one sequence at a time.
    with torch.no_grad():
        for p, c, lp in zip(prompts, a.completion_ids, a.logprobs):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            if temperature > 0:
                logits = filter_logits(logits / temperature, top_k=20)
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            assert lp == pytest.approx(want.tolist(), rel=1e-6, abs=1e-6)  # reported in fp32
    if temperature > 0:  # the G rows of a group sampled different completions from one prefill
        assert len({tuple(c) for c in a.completion_ids[:4]}) > 1


@pytest.mark.parametrize("path", ["lean", "eager", "static"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_compaction_changes_no_completion(tokenizer, seed, monkeypatch, path, temperature, top_k, top_p):
    """Each decode path: the lean step (default), the model's forward (``lean_decode=False``), static."""
    static = path == "static"
    model = _model(tokenizer, seed)
    # 17 rows: a 32-row cache, and one row finishing early is enough to move to the 16-row bucket (with 18
    # rows two had to, which some seeds' greedy runs did not give: seed 1581025012)
    prompts = _grpo_prompts(tokenizer, [5, 9], G=6) + _grpo_prompts(tokenizer, [2, 3, 4, 6, 7], G=1)
    params = SamplingParams(
        max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=STOPS
    )
    base = dict(use_static_cache=static, cache_length_multiple=16, check_every=2, lean_decode=path == "lean")
    compacting = HFEngine(model, tokenizer, EngineConfig(**base))
    plain = HFEngine(model, tokenizer, EngineConfig(**base, compact_finished=False))
    selected = []
    original = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache,
        "batch_select_indices",
        lambda self, idx: (selected.append(len(idx)), original(self, idx)),
    )
    lean_select = LeanDecoder.select
    monkeypatch.setattr(
        LeanDecoder, "select", lambda self, idx: (selected.append(len(idx)), lean_select(self, idx))
    )
    a = compacting.generate(prompts, params)
    shrinks, buckets = selected[:], sorted({b for b, _ in compacting._static_caches})
    b = plain.generate(prompts, params)
    _same(a, b)
    lengths = sorted(len(c) for c in a.completion_ids)
    assert lengths[0] < lengths[-1]  # rows finished at different steps: there was something to compact
    if static:
        assert len(buckets) > 1 and buckets[-1] == 32  # moved to smaller power-of-two caches
        assert sorted({b for b, _ in plain._static_caches}) == [32]
    else:
        assert any(n < len(prompts) for n in shrinks)  # finished rows left the batch
    # Sparse checks change nothing either (a finished row's later tokens are dropped).
    every_step = HFEngine(model, tokenizer, EngineConfig(**base | {"check_every": 1}))
    _same(a, every_step.generate(prompts, params))


def test_host_syncs_once_per_check(tokenizer, seed, monkeypatch):
    """The decode loop reads the device only at checks: ``done.cpu()`` every ``check_every`` steps."""
    model = _model(tokenizer, seed)  # EOS unlikely: every row runs to the limit
    engine = HFEngine(model, tokenizer, EngineConfig(check_every=4))
    reads = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda self, *a, **k: (reads.append(self.dtype), original(self, *a, **k))[1]
    )
    out = engine.generate(
        _grpo_prompts(tokenizer, [4], G=3), SamplingParams(max_new_tokens=17, temperature=0)
    )
    assert all(len(c) == 17 for c in out.completion_ids)
    assert reads.count(torch.bool) == 4  # after steps 4, 8, 12, 16; none at the last one (17)


def _dynamo_counts():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_decode_stays_compiled(tokenizer, seed):
    """3 rounds with optimizer steps (in place) between them: no graph break, one graph per batch bucket
    (compaction visits several), none recompiled; the compiled engine still matches the eager one."""
    torch._dynamo.reset()
    model = _model(tokenizer, seed).float()
    cfg = dict(use_static_cache=True, cache_length_multiple=32, check_every=2, max_batch_size=8)
    compiled = HFEngine(model, tokenizer, EngineConfig(**cfg, compile=True, compile_backend="aot_eager"))
    eager = HFEngine(model, tokenizer, EngineConfig(**cfg))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    prompts = _grpo_prompts(tokenizer, [4, 2], G=4)
    breaks0, graphs0 = _dynamo_counts()
    buckets = set()
    for r in range(3):
        params = SamplingParams(
            max_new_tokens=20, temperature=0.0 if r == 0 else 1.0, seed=seed + r, stop_token_ids=STOPS
        )
        got = compiled.generate(prompts, params)
        buckets |= {b for b, _ in compiled._static_caches}
        assert got.completion_ids == eager.generate(prompts, params).completion_ids
        model.train()
        batch = torch.tensor([prompts[0] + prompts[4]])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    breaks, graphs = _dynamo_counts()
    assert breaks == breaks0
    assert 1 < graphs - graphs0 == len(buckets) <= 4  # buckets 8, 4, 2, 1 at most


def test_compile_refuses_fsdp(tokenizer, seed, monkeypatch):
    model = _model(tokenizer, seed)
    engine = HFEngine(model, tokenizer, EngineConfig(use_static_cache=True, compile=True))
    monkeypatch.setattr("fastrl.engine.hf._is_fsdp", lambda m: True)
    with pytest.raises(ValueError, match="FSDP"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_across_rounds(tokenizer, seed):
    """reduce-overhead (CUDA graphs) on the GPU: same greedy tokens as the eager dynamic engine over
    3 rounds with in-place weight updates between them, one graph per bucket, no graph break."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1, hidden_size=128, num_heads=2).cuda()
    cfg = dict(use_static_cache=True, cache_length_multiple=64, check_every=4, max_batch_size=16)
    compiled = HFEngine(model, tokenizer, EngineConfig(**cfg, compile=True))
    eager = HFEngine(model, tokenizer)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    prompts = _grpo_prompts(tokenizer, [5, 17], G=8)
    breaks0, graphs0 = _dynamo_counts()
    for _ in range(3):
        params = SamplingParams(max_new_tokens=32, temperature=0, stop_token_ids=STOPS)
        assert (
            compiled.generate(prompts, params).completion_ids
            == eager.generate(prompts, params).completion_ids
        )
        model.train()
        batch = torch.tensor([prompts[0] + prompts[-1]], device="cuda")
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    breaks, graphs = _dynamo_counts()
    assert breaks == breaks0 and graphs - graphs0 <= 5  # buckets 16, 8, 4, 2, 1 at most


def test_shared_prefix_attention_equals_full_attention(seed):
    """Against softmax over [prefix; own positions] with each row's prefix copied out, in float64: left
    padding masked, uneven groups (also after rows leave), GQA (4 query heads on 2 KV heads)."""
    import types

    from fastrl.engine._kv import SharedPrefixCache, shared_prefix_attention

    U, P, t, H, kvh, d = 3, 6, 4, 4, 2, 8
    Kp, Vp = torch.randn(U, kvh, P, d).double(), torch.randn(U, kvh, P, d).double()
    mask = torch.ones(U, P)
    mask[1, :2] = mask[2, :5] = 0  # left padding
    row_prompt = [0, 0, 0, 1, 2, 2]
    cache = SharedPrefixCache([(Kp, Vp)], mask, row_prompt, capacity=t)
    module = types.SimpleNamespace(layer_idx=0)
    for rows in (None, torch.tensor([1, 3, 5])):  # then a compaction: prefix 0 and 2 keep one row each
        if rows is not None:
            cache.batch_select_indices(rows)
            row_prompt = [row_prompt[i] for i in rows.tolist()]
        n = len(row_prompt)
        q = torch.randn(n, H, 1, d).double()
        Ks, Vs = torch.randn(n, kvh, t, d).double(), torch.randn(n, kvh, t, d).double()
        got, _ = shared_prefix_attention(module, q, Ks, Vs, None, scaling=0.3, fastrl_shared=cache)
        src = torch.tensor(row_prompt)
        K = torch.cat([Kp[src], Ks], 2).repeat_interleave(H // kvh, 1)
        V = torch.cat([Vp[src], Vs], 2).repeat_interleave(H // kvh, 1)
        visible = torch.cat([mask[src], torch.ones(n, t)], 1).bool()[:, None, None, :]
        scores = (q @ K.transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
        want = (scores.softmax(-1) @ V).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
