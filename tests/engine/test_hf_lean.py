"""The hf engine's lean decode step (``EngineConfig.lean_decode``, fastrl/engine/_lean.py) against the
model's own forward: exact in float64 for every architecture it serves, within PyTorch's own error in
fp32 and bf16, and never used where it does not apply."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from fastrl.engine import EngineConfig, SamplingParams
from fastrl.engine._kv import growing_cache
from fastrl.engine._lean import LeanDecoder, lean_decode_ok, lean_over_shared
from fastrl.engine.hf import HFEngine
from tests.engine.conftest import prompts_of
from tests.helpers import assert_close_to_truth

CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}
ARCHS = [*CONFIGS, "qwen2+lora"]


def _model(tokenizer, arch: str, seed: int, dtype=torch.float64):
    """A random decoder with grouped-query attention (4 query heads on 2 key/value heads)."""
    base = arch.split("+")[0]
    extra = {"sliding_window": None} if base == "mistral" else {}
    config = CONFIGS[base](
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if arch.endswith("+lora"):
            lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
            model = peft.get_peft_model(model, lora)
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at 0: make the adapters change the output
                    p.data.normal_(0, 0.1)
    return model.eval()


def _count_steps(monkeypatch) -> list[int]:
    calls = [0]
    step = LeanDecoder.step

    def counted(self, *args):
        calls[0] += 1
        return step(self, *args)

    monkeypatch.setattr(LeanDecoder, "step", counted)
    return calls


def _check_float64(model, tokenizer, seed, calls, device="cpu"):
    """Engine log-probs of lean-decoded completions vs a full unpadded forward, float64."""
    # Shared runs (3 x 7 and 2 x 4 tokens) and lone prompts of other lengths: left padding in the prefill,
    # rows repeating their prompt's cache. Second call: a third of the vocabulary stops a row, so rows
    # leave the batch at the checks.
    lengths = [7, 7, 7, 3, 12, 4, 4]
    prompts = prompts_of(tokenizer, lengths)
    prompts[1] = prompts[2] = prompts[0]
    prompts[6] = prompts[5]
    engine = HFEngine(model, tokenizer, EngineConfig(check_every=1))
    for stops in ([], list(range(5, len(tokenizer), 3))):
        params = SamplingParams(max_new_tokens=9, temperature=0.8, seed=seed, stop_token_ids=stops)
        out = engine.generate(prompts, params)
        for p, c, lp in zip(prompts, out.completion_ids, out.logprobs):
            with torch.no_grad():
                ids = torch.tensor([p + c], device=device)
                logits = model(ids).logits[0, len(p) - 1 : len(p) - 1 + len(c)].cpu()
            want = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            # The engine reports fp32 log-probs: equal up to that one rounding (2^-24 relative).
            got = torch.tensor(lp, dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=2**-23, atol=1e-12)
        if not stops:  # only EOS ends a row: all 7 ending at their first token is vanishingly rare
            assert calls[0] > 0, "the lean step did not run"


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lean_logprobs_equal_the_full_forward_in_float64(arch, kernel, tokenizer, seed, monkeypatch):
    """Both attention kernels in float64 (bf16/fp16 caches use sdpa, where rounding would hide a bug)."""
    model = _model(tokenizer, arch, seed)
    if kernel == "sdpa":
        monkeypatch.setattr("fastrl.engine._lean.SDPA_DTYPES", (torch.float64,))
    _check_float64(model, tokenizer, seed, _count_steps(monkeypatch))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_lean_on_cuda_in_float64(kernel, tokenizer, seed, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model(tokenizer, "qwen2+lora", seed).cuda()
    if kernel == "sdpa":
        monkeypatch.setattr("fastrl.engine._lean.SDPA_DTYPES", (torch.float64,))
    _check_float64(model, tokenizer, seed, _count_steps(monkeypatch), device="cuda")


def _teacher_forced(lm, prompts, tokens_NT, capacity=None):
    """Per-step logits [N, T, V] of the lean decoder (room for ``capacity`` steps, default T) fed
    ``tokens_NT`` after an engine-style prefill of the prompts (left-padded); row r continues prompt r."""
    N, T = tokens_NT.shape
    P = max(len(p) for p in prompts)
    ids = torch.full((N, P), 0, dtype=torch.long)
    mask = torch.zeros(N, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], mask[i, P - len(p) :] = torch.tensor(p), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=growing_cache(lm.config, P)
        )
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    dec = LeanDecoder(lm, kv, mask, torch.arange(N), capacity or T)
    steps = [dec.step(tokens_NT[:, t], pos[:, -1] + 1 + t) for t in range(T)]
    return torch.stack(steps, 1), dec


def _full_forward(lm, prompts, tokens_NT):
    """The same logits from the model's forward on each whole unpadded sequence, one row at a time."""
    rows = []
    for p, c in zip(prompts, tokens_NT.tolist()):
        with torch.no_grad():
            rows.append(lm(torch.tensor([p + c])).logits[0, len(p) : len(p) + len(c)])
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lean_step_within_pytorchs_error(arch, dtype, tokenizer, seed):
    """Lean logits vs float64 truth, bounded by the model's own forward's error at the same dtype."""
    truth_model = _model(tokenizer, arch, seed)
    model = _model(tokenizer, arch, seed, dtype=dtype)
    prompts = prompts_of(tokenizer, [6, 11, 3])
    tokens = torch.randint(5, len(tokenizer), (3, 7))
    lean, _ = _teacher_forced(model, prompts, tokens)
    reference = _full_forward(model, prompts, tokens)
    truth = _full_forward(truth_model, prompts, tokens)
    assert_close_to_truth(f"lean logits {arch} {dtype}", lean, reference, truth, dtype=dtype)


def test_select_keeps_and_repeats_rows(tokenizer, seed):
    """After ``select(rows)`` the decoder continues exactly as one built on those rows from the start."""
    model = _model(tokenizer, "llama", seed)
    prompts = prompts_of(tokenizer, [6, 11, 3])
    tokens = torch.randint(5, len(tokenizer), (3, 5))
    _, dec = _teacher_forced(model, prompts, tokens[:, :3], capacity=5)
    keep = torch.tensor([2, 0, 0])
    dec.select(keep)
    want, _ = _teacher_forced(model, [prompts[i] for i in keep.tolist()], tokens[keep])  # other padding
    pos = torch.tensor([len(prompts[i]) - 1 for i in keep.tolist()])
    got = torch.stack([dec.step(tokens[keep, t], pos + 1 + t) for t in (3, 4)], 1)
    torch.testing.assert_close(got, want[:, 3:], rtol=0, atol=1e-12)


def test_where_the_lean_step_does_not_apply(tokenizer, seed, monkeypatch):
    model = _model(tokenizer, "qwen2", seed, dtype=torch.float32)
    assert lean_decode_ok(model)
    sliding = _model(tokenizer, "mistral", seed, dtype=torch.float32)
    sliding.config.sliding_window = 4
    assert not lean_decode_ok(sliding)
    handle = model.model.layers[1].register_forward_hook(lambda *a: None)  # e.g. an offload hook
    assert not lean_decode_ok(model)
    handle.remove()
    calls = _count_steps(monkeypatch)
    prompts = prompts_of(tokenizer, [5, 5])
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    off = HFEngine(model, tokenizer, EngineConfig(lean_decode=False)).generate(prompts, params)
    assert calls[0] == 0
    on = HFEngine(model, tokenizer).generate(prompts, params)
    assert calls[0] > 0
    assert on.completion_ids == off.completion_ids  # greedy: the two paths agree (fp32, a peaked model)
    before = calls[0]
    # Long shared prompts: the shared-prefix layout reads them once per group, the lean cache once per row.
    assert lean_over_shared(model, 8, 1, 5) and not lean_over_shared(model, 8, 1, 400)
    shared = [prompts_of(tokenizer, [400])[0]] * 8
    HFEngine(model, tokenizer).generate(shared, SamplingParams(max_new_tokens=3, temperature=0))
    assert calls[0] == before
    with pytest.raises(ValueError, match="lean_decode"):
        EngineConfig(lean_decode="yes")
