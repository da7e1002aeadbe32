"""The hf engine's weight copy in another dtype (``EngineConfig(dtype=...)``, fastrl/engine/_shadow.py)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from fastrl.engine import EngineConfig, SamplingParams
from fastrl.engine.hf import HFEngine
from fastrl.engine.sampling import sampled_logprobs
from tests.engine.conftest import prompts_of
from tests.helpers import assert_close_to_truth

BF16 = EngineConfig(dtype="bfloat16")



def _params_cast(model, dtype):
    """The reference bf16 model: a deep copy with only its parameters cast (buffers such as the rotary
    ``inv_freq`` stay fp32, as a model built in bf16 computes them)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(dtype)
    return ref.eval()


def _hf_greedy(model, tokenizer, prompts, n):
    rows = []
    for p in prompts:  # one at a time: no padding on the reference side
        with torch.no_grad():
            out = model.generate(  # stops at EOS, as the engine does (min_new_tokens would forbid it)
                torch.tensor([p]), max_new_tokens=n, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        rows.append(out[0, len(p) :].tolist())
    return rows


def test_bf16_copy_greedy_equals_generate_in_bf16(model, tokenizer):
    prompts = prompts_of(tokenizer, [5, 9, 9, 9, 3])
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    engine = HFEngine(model, tokenizer, BF16)
    # One prompt at a time on both sides: batched, a bf16 product's rounding depends on the batch, so a row
    # may take the other token of a near-tie (seen with transformers 5.19; tests/realmodel checks the
    # batched case with a near-tie rule).
    ref = _params_cast(model, torch.bfloat16)
    for p in prompts:
        want = _hf_greedy(ref, tokenizer, [p], 10)[0]
        if tokenizer.eos_token_id in want:
            want = want[: want.index(tokenizer.eos_token_id) + 1]
        assert engine.generate([p], params).completion_ids[0] == want
    out = engine.generate(prompts, params)
    assert engine._copy.lm.dtype == torch.bfloat16 and model.dtype == torch.float32  # the trainer's stays
    # The fp32 engine on the same model differs somewhere (bf16 really ran), else this test proves little.
    fp32 = HFEngine(model, tokenizer).generate(prompts, params)
    assert fp32.logprobs != out.logprobs


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 12, 0.9)])
def test_bf16_logprob_contract(model, tokenizer, seed, temperature, top_k, top_p):
    """logprobs[t] = log q(token) under the bf16 engine's own logits: checked against a teacher-forced
    recomputation with the bf16 reference model, within bf16's own error against fp64 truth."""
    prompts = prompts_of(tokenizer, [6, 6, 6, 4])
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    out = HFEngine(model, tokenizer, BF16).generate(prompts, params)
    ref = _params_cast(model, torch.bfloat16)
    truth = model.double().eval()
    got, tf_bf16, tf_64 = [], [], []
    with torch.no_grad():
        for p, c, lp in zip(prompts, out.completion_ids, out.logprobs):
            ids, tok = torch.tensor([p + c]), torch.tensor(c)
            sl = slice(len(p) - 1, -1)
            tf_bf16.append(sampled_logprobs(ref(ids).logits[0, sl], tok, temperature=temperature, top_k=top_k,
                                            top_p=top_p))  # fmt: skip
            tf_64.append(sampled_logprobs(truth(ids).logits[0, sl], tok, temperature=temperature, top_k=top_k,
                                          top_p=top_p))  # fmt: skip
            got.append(torch.tensor(lp))
    got, tf_bf16, tf_64 = torch.cat(got), torch.cat(tf_bf16), torch.cat(tf_64)
    assert torch.isfinite(got).all() and (got <= 0).all()
    # Where the filters keep the same set on both sides (a bf16 logit at the top-k / top-p edge may not).
    same = torch.isfinite(tf_bf16) & torch.isfinite(tf_64)
    assert same.float().mean() > 0.8
    assert_close_to_truth("bf16 engine logp", got[same], tf_bf16[same], tf_64[same], dtype=torch.bfloat16,
                          factor=3.0)  # fmt: skip


def test_copy_follows_sync_weights_with_lora(model, tokenizer, seed):
    prompts = prompts_of(tokenizer, [4, 7])
    params = SamplingParams(max_new_tokens=8, temperature=0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    engine = HFEngine(lora, tokenizer, BF16)
    base = engine.generate(prompts, params)
    with torch.no_grad():  # an "optimizer step" on the adapters only
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    # No sync: the copy still holds the old weights (the engine contract: sync_weights makes them current).
    assert engine.generate(prompts, params).completion_ids == base.completion_ids
    engine.sync_weights(lora)
    after = engine.generate(prompts, params)
    merged = _params_cast(copy.deepcopy(lora).merge_and_unload(), torch.bfloat16)
    assert after.completion_ids == HFEngine(merged, tokenizer).generate(prompts, params).completion_ids
    assert after.completion_ids != base.completion_ids
    assert engine._copy.syncs == 2  # one copy per sync, none per generate
    for p in lora.parameters():
        assert p.dtype == torch.float32  # the trainer's weights untouched


def test_sleep_drops_the_copy(model, tokenizer):
    prompts = prompts_of(tokenizer, [5])
    params = SamplingParams(max_new_tokens=6, temperature=0)
    engine = HFEngine(model, tokenizer, BF16)
    first = engine.generate(prompts, params)
    engine.sleep()
    assert engine._copy.lm is None
    assert engine.generate(prompts, params) == first


def test_same_dtype_makes_no_copy_and_fsdp_is_refused(model, tokenizer, monkeypatch):
    assert HFEngine(model, tokenizer, EngineConfig(dtype="float32"))._copy is None
    assert HFEngine(model, tokenizer, EngineConfig(dtype="auto"))._copy is None
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="bf16")
    monkeypatch.setattr("fastrl.engine.hf._is_fsdp", lambda m: True)
    with pytest.raises(ValueError, match="FSDP"):
        HFEngine(model, tokenizer, BF16)
