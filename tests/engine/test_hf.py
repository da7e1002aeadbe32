"""HFEngine against Hugging Face generate and a teacher-forced recomputation."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch

from fastrl.engine import EngineConfig, SamplingParams, build_engine
from fastrl.engine.hf import HFEngine
from fastrl.engine.sampling import filter_logits
from fastrl.models.lora import adapter_disabled
from fastrl.models.tiny import build_tiny_model
from tests.engine.conftest import prompts_of
from tests.helpers import assert_close_to_truth


def _hf_greedy(model, tokenizer, prompts, max_new_tokens):
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    model.eval()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    model.train()
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]  # generate pads after EOS
        rows.append(row)
    return rows


def _teacher_forced_logp(model, prompts, completions, temperature, top_k=0, top_p=1.0):
    """The log-prob contract, recomputed one unpadded sequence at a time: log q(token), q the softmax of
    the filtered logits / T renormalised over the kept tokens (greedy: log_softmax(logits) at T=1)."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            if temperature > 0:
                logits = filter_logits(logits.double() / temperature, top_k=top_k, top_p=top_p).double()
            out.append(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return torch.cat(out)


def _eos_when_greedy_says(model, tokenizer, completions, start):
    """Swap the lm_head rows of EOS and a token greedy produced: wherever greedy picked that token, EOS now
    has its logit (strictly the largest) and greedy stops there. A swap, not a copy: a copied row made an
    exact tie whose winner hung on the matrix product rounding the two columns alike, which it does not
    at every batch size (seed 2105844587 took the token in a batch of 2, EOS alone). The token: in the
    longest completion that has one, the first at ``start`` or later with an id above EOS's. Returns
    (row, position) of the first place greedy now stops in that row."""
    eos = tokenizer.eos_token_id
    rows = sorted(range(len(completions)), key=lambda i: -len(completions[i]))
    row, pos = next(
        (r, i) for r in rows for i in range(start, len(completions[r])) if completions[r][i] > eos
    )
    ids = completions[row]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eos, ids[pos]]] = w[[ids[pos], eos]].clone()
    return row, ids.index(ids[pos])


def test_greedy_equals_hf_generate(model, tokenizer):
    prompts = prompts_of(tokenizer, [5, 1, 12, 7])
    engine = build_engine(EngineConfig(), model, tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    first = engine.generate(prompts, params)
    assert first.completion_ids == _hf_greedy(model, tokenizer, prompts, 12)
    # Now make greedy stop at EOS in some rows.
    row, stop_at = _eos_when_greedy_says(model, tokenizer, first.completion_ids, 4)
    out = engine.generate(prompts, params)
    assert out.completion_ids == _hf_greedy(model, tokenizer, prompts, 12)
    stopped = [tokenizer.eos_token_id in c for c in out.completion_ids]
    assert stopped[row]
    assert out.completion_ids[row] == first.completion_ids[row][:stop_at] + [tokenizer.eos_token_id]
    for ids, logp, trunc, stop in zip(out.completion_ids, out.logprobs, out.truncated, stopped):
        assert trunc == (not stop)
        assert len(logp) == len(ids)
        if stop:
            assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        else:
            assert len(ids) == 12


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 0.9), (0.7, 7, 1.0), (1.0, 0, 0.8)],
)
def test_logprobs_equal_teacher_forcing(model, tokenizer, seed, temperature, top_k, top_p):
    prompts = prompts_of(tokenizer, [3, 9, 6])
    engine = build_engine(EngineConfig(max_batch_size=2), model, tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    out = engine.generate(prompts, params)
    got = torch.tensor([x for row in out.logprobs for x in row])
    reference = _teacher_forced_logp(model, prompts, out.completion_ids, temperature, top_k, top_p)
    truth = _teacher_forced_logp(model.double(), prompts, out.completion_ids, temperature, top_k, top_p)
    assert_close_to_truth("engine logp", got, reference.float(), truth, dtype=torch.float32)


def test_top_k_one_is_greedy(model, tokenizer, seed):
    prompts = prompts_of(tokenizer, [4, 8])
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1, seed=seed))
    assert top1.completion_ids == greedy.completion_ids
    tiny_p = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6))
    assert tiny_p.completion_ids == greedy.completion_ids


def test_seeded_sampling_reproduces(model, tokenizer, seed):
    prompts = prompts_of(tokenizer, [4, 8, 2])
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert a == b
    c = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed + 1))
    assert c.completion_ids != a.completion_ids
    # seed=None draws from torch's global RNG, so torch.manual_seed reproduces it.
    unseeded = SamplingParams(max_new_tokens=12)
    torch.manual_seed(seed)
    d = engine.generate(prompts, unseeded)
    torch.manual_seed(seed)
    assert engine.generate(prompts, unseeded) == d


def test_stop_token_ids(model, tokenizer):
    prompts = prompts_of(tokenizer, [6, 3])
    with torch.no_grad():  # EOS logit 0, below the largest of ~100 others: greedy never ends by itself
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    engine = HFEngine(model, tokenizer)
    full = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert full.truncated == [True, True]
    stop = full.completion_ids[0][3]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop]))
    for ids, logp, trunc, ref_ids, ref_logp, ref_trunc in zip(
        out.completion_ids, out.logprobs, out.truncated, full.completion_ids, full.logprobs, full.truncated
    ):
        cut = ref_ids.index(stop) + 1 if stop in ref_ids else len(ref_ids)
        assert ids == ref_ids[:cut] and logp == pytest.approx(ref_logp[:cut], abs=1e-6)
        assert trunc == (ref_trunc and stop not in ref_ids)
    assert out.completion_ids[0][-1] == stop and len(out.completion_ids[0]) <= 4


@pytest.mark.parametrize("max_batch_size", [64, 2])
def test_left_padding_equals_one_by_one(tokenizer, seed, max_batch_size):
    # float64: the token comparison must not hinge on fp32 rounding of near-ties.
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1).double()
    prompts = prompts_of(tokenizer, [7, 1, 13, 4, 9])
    engine = HFEngine(model, tokenizer, EngineConfig(max_batch_size=max_batch_size))
    params = SamplingParams(max_new_tokens=9, temperature=0)
    _eos_when_greedy_says(model, tokenizer, engine.generate(prompts, params).completion_ids, 3)
    batched = engine.generate(prompts, params)
    singles = [engine.generate([p], params) for p in prompts]
    assert batched.completion_ids == [s.completion_ids[0] for s in singles]
    assert batched.truncated == [s.truncated[0] for s in singles]
    assert not all(batched.truncated)
    for row, s in zip(batched.logprobs, singles):
        assert row == pytest.approx(s.logprobs[0], abs=1e-9)


def test_static_cache_equals_dynamic(tokenizer, seed):
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1).double()
    dynamic = HFEngine(model, tokenizer)
    # Three prompts run as a batch of four (one dummy row); every row draws its own uniforms, so the
    # dummy row changes no sampled completion either. Compaction off: one cache shape, reused.
    static = HFEngine(
        model,
        tokenizer,
        EngineConfig(use_static_cache=True, cache_length_multiple=16, compact_finished=False),
    )
    for prompts, params in (
        (prompts_of(tokenizer, [5, 11, 2]), SamplingParams(max_new_tokens=10, temperature=0)),
        (prompts_of(tokenizer, [5, 11, 2]), SamplingParams(max_new_tokens=7, temperature=1.0, seed=seed)),
    ):
        a, b = dynamic.generate(prompts, params), static.generate(prompts, params)
        assert a.completion_ids == b.completion_ids and a.truncated == b.truncated
        for x, y in zip(a.logprobs, b.logprobs):
            assert x == pytest.approx(y, abs=1e-9)
    assert list(static._static_caches) == [(4, 32)]  # both calls fit one cache shape, reused


def test_weights_are_shared(model, tokenizer):
    prompts = prompts_of(tokenizer, [4, 6])
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    before = engine.generate(prompts, params)
    with torch.no_grad():  # an in-place "optimizer step": every logit 0, so greedy picks id 0
        model.lm_head.weight.zero_()
    assert engine.sync_weights(model) is None
    after = engine.generate(prompts, params)
    assert after.completion_ids != before.completion_ids
    assert after.completion_ids == [[0] * 6] * 2
    uniform = -torch.tensor(float(len(tokenizer))).log().item()
    assert all(lp == pytest.approx([uniform] * 6, abs=1e-6) for lp in after.logprobs)


def test_eval_mode_no_grad_and_restore(model, tokenizer):
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda mod, args, out: seen.append((mod.training, torch.is_grad_enabled()))
    )
    engine = HFEngine(model, tokenizer)
    model.train()
    engine.generate(prompts_of(tokenizer, [3]), SamplingParams(max_new_tokens=3))
    assert seen and all(s == (False, False) for s in seen)
    assert model.training
    model.eval()
    engine.generate(prompts_of(tokenizer, [3]), SamplingParams(max_new_tokens=3))
    assert not model.training
    # Mixed modes come back module by module (review fix: model.train(True) used to flip this one back).
    model.train()
    model.model.layers[0].eval()
    engine.generate(prompts_of(tokenizer, [3]), SamplingParams(max_new_tokens=3))
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training and not model.model.layers[0].self_attn.training


def test_lora_model(model, tokenizer, seed):
    prompts = prompts_of(tokenizer, [4, 7])
    params = SamplingParams(max_new_tokens=8, temperature=0)
    base_out = HFEngine(model, tokenizer).generate(prompts, params)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    engine = build_engine(EngineConfig(), lora, tokenizer)
    out = engine.generate(prompts, params)
    assert out.completion_ids == _hf_greedy(lora, tokenizer, prompts, 8)
    assert out.completion_ids != base_out.completion_ids
    with adapter_disabled(lora):
        assert engine.generate(prompts, params).completion_ids == base_out.completion_ids


def test_bad_inputs(model, tokenizer):
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=2)
    for bad, match in [
        ([[]], r"prompt_ids\[0\]"),
        ([[5], [len(tokenizer)]], r"prompt_ids\[1\]"),
        ([[5, -1]], r"prompt_ids\[0\]"),
        ([[5, None]], r"prompt_ids\[0\].*None"),
        ([[5, 6.0]], r"prompt_ids\[0\]"),
        ([[5, True]], r"prompt_ids\[0\].*True"),  # a bool is no token id (review fix)
        ("abc", "prompt_ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(bad, params)
    with pytest.raises(ValueError, match="params"):
        engine.generate([[5]], {"max_new_tokens": 2})
    assert engine.generate([], params).completion_ids == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        # Review fixes: each of these used to pass silently or fail with a TypeError.
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"top_k": 2.0}, "top_k"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_config(model, tokenizer):
    with pytest.raises(ValueError, match="kind"):
        EngineConfig(kind="sglang")
    with pytest.raises(ValueError, match="use_static_cache"):
        EngineConfig(compile=True)
    with pytest.raises(ValueError, match="base_url"):
        EngineConfig(kind="vllm_server")
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    # Review fixes: these used to raise TypeError or pass silently.
    for bad, match in [
        ({"kind": ["hf"]}, "kind"),
        ({"gpu_memory_utilization": "0.5"}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": float("nan")}, "gpu_memory_utilization"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"use_static_cache": "yes"}, "use_static_cache"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"compile_mode": ""}, "compile_mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)
    if importlib.util.find_spec("vllm") is None:  # the vllm kinds say which extra installs them
        with pytest.raises(ImportError, match="fastrl\\[vllm"):
            build_engine(EngineConfig(kind="vllm"), model, tokenizer)
    with pytest.raises(ValueError, match="EngineConfig"):
        build_engine({"kind": "hf"}, model, tokenizer)
    assert isinstance(build_engine(EngineConfig(), model, tokenizer), HFEngine)
    # Review fix: these used to fail with AttributeError.
    with pytest.raises(ValueError, match="tokenizer"):
        HFEngine(model, None)
    with pytest.raises(ValueError, match="cfg"):
        HFEngine(model, tokenizer, {"kind": "hf"})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_static_decode_on_gpu(tokenizer, seed, dtype):
    model = (
        build_tiny_model(tokenizer, seed=seed, init_std=0.1, hidden_size=128, num_heads=2).cuda().to(dtype)
    )
    prompts = prompts_of(tokenizer, [5, 17, 9])
    params = SamplingParams(max_new_tokens=24, temperature=0)
    dynamic = HFEngine(model, tokenizer)
    compiled = HFEngine(model, tokenizer, EngineConfig(use_static_cache=True, compile=True))
    want = dynamic.generate(prompts, params)
    for _ in range(2):  # the second call replays the captured graphs
        got = compiled.generate(prompts, params)
        n_same = sum(a == b for a, b in zip(got.completion_ids, want.completion_ids))
        assert n_same == len(prompts) if dtype == torch.float32 else n_same >= 1
    with torch.no_grad():  # the graphs read the live parameters: an in-place update is seen
        model.lm_head.weight.zero_()
    assert compiled.generate(prompts, params).completion_ids == [[0] * 24] * len(prompts)


def test_every_option_has_help():
    from dataclasses import fields

    for cls in (EngineConfig, SamplingParams):
        for f in fields(cls):
            assert f.kw_only and f.metadata.get("help"), f"{cls.__name__}.{f.name}"
