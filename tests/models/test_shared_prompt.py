"""The shared-prompt forward (``fastrl.models.shared_prompt``) against the padded one, in float64."""

from __future__ import annotations

import pytest
import torch

from fastrl.data import collate_prompt_completion
from fastrl.models.heads import lm_head_params
from fastrl.models.shared_prompt import completion_hidden, prompt_groups, shared_prompt_unsupported
from fastrl.models.tiny import build_tiny_model
from fastrl.ops.linear_logprobs import linear_logprobs


@pytest.fixture
def true_fp64(monkeypatch):
    """transformers' RMSNorm and eager softmax compute in fp32 whatever the model dtype, so an fp64 model
    is not fp64 there and its gradients differ by fp32 roundings (~1e-7) between any two batchings of the
    same rows (a batch of two equal rows vs one row with the summed upstream gradient). Patched here to
    compute in the input dtype, so the comparison below is of fp64 summation order alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", rms_forward)
    softmax = torch.nn.functional.softmax

    def softmax_keep_fp64(x, dim=None, *args, dtype=None, **kwargs):
        return softmax(x, dim, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax_keep_fp64)


def _rollout(tokenizer, *, seed: int, rows: list[int]) -> dict:
    """4 prompts of uneven lengths x 3 completions of uneven lengths, collated over the whole round (so
    the prompt columns fit the longest prompt, 8), then the micro-batch ``rows`` of it (mixed groups)."""
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    low = 5  # clear of the special tokens
    prompts = [torch.randint(low, V, (n,), generator=g).tolist() for n in (3, 8, 5, 4)]
    prompt_ids, completions = [], []
    for p in prompts:
        for _ in range(3):
            prompt_ids.append(p)
            completions.append(
                torch.randint(low, V, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            )
    batch = collate_prompt_completion(prompt_ids, completions, tokenizer.pad_token_id)
    mask = batch["completion_mask"].double()
    mask[rows[0], 0] = 0.0  # a loss mask that differs from the attention mask
    batch["completion_mask"] = mask
    return {k: v[rows] for k, v in batch.items()}


def _logp_and_grads(model, mb, *, share: bool, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    hidden = completion_hidden(model, mb, share=share)
    weight, bias = lm_head_params(model)
    labels = torch.where(mb["completion_mask"] > 0, mb["completion_ids"], -100)
    logp = linear_logprobs(hidden, weight, labels, bias=bias)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), grads


def _model(tokenizer, arch: str, *, lora: bool = False, tied: bool = False):
    model = build_tiny_model(
        tokenizer, arch=arch, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=96,
        num_layers=2, tie_word_embeddings=tied, init_std=0.2, dtype=torch.float64, seed=3,
    )  # fmt: skip
    if lora:
        from fastrl.models.lora import LoraConfig, apply_lora

        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules="all-linear"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B starts at 0: make the adapters do something
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize(
    "arch, lora, tied, attn",
    [("qwen2", False, False, "sdpa"), ("llama", False, True, "eager"), ("llama", True, False, "sdpa")],
)
def test_shared_equals_padded_fp64(true_fp64, tokenizer, arch, lora, tied, attn):
    model = _model(tokenizer, arch, lora=lora, tied=tied)
    model.config._attn_implementation = attn  # noqa: SLF001 (the switch transformers itself reads)
    assert shared_prompt_unsupported(model) is None
    rows = [7, 0, 10, 2, 6, 11, 1]  # shuffled: groups of 3, 2 and 2 rows; not the longest prompt's
    mb = _rollout(tokenizer, seed=0, rows=rows)
    weights = torch.randn(
        mb["completion_ids"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )

    calls = []
    decoder = model.get_decoder() if not lora else model.get_base_model().get_decoder()
    hook = decoder.register_forward_hook(
        lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        ref_logp, ref_grads = _logp_and_grads(model, mb, share=False, weights=weights)
        padded_calls = list(calls)
        calls.clear()
        logp, grads = _logp_and_grads(model, mb, share=True, weights=weights)
    finally:
        hook.remove()
    C = mb["completion_ids"].shape[1]
    assert padded_calls == [mb["input_ids"].shape]
    assert len(calls) == 2 and calls[0][0] == 3 and calls[1] == (len(rows), C - 1)  # U=3 prompts, then B rows
    assert calls[0][1] < mb["input_ids"].shape[1] - C  # the common left padding was dropped

    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(ref_grads) and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_single_completion_column_and_no_repeats(tokenizer):
    model = _model(tokenizer, "qwen2")
    prompts = [[7, 8, 9], [7, 8, 9], [10, 11]]
    batch = collate_prompt_completion(prompts, [[12], [13], [14]], tokenizer.pad_token_id)
    for rows in ([0, 1, 2], [0, 2]):  # C == 1 (no completion pass); then all prompts distinct
        mb = {k: v[rows] for k, v in batch.items()}
        with torch.no_grad():
            got = completion_hidden(model, mb, share=True)
            want = completion_hidden(model, mb, share=False)
        assert got.shape == (len(rows), 1, 128)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_prompt_groups_ignore_padding_ids():
    ids = torch.tensor([[0, 5, 6], [9, 5, 6], [5, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, inverse = prompt_groups(ids, mask)
    assert inverse[0] == inverse[1] == inverse[3] != inverse[2]
    assert sorted(first.tolist()) == [0, 2]


def test_fallbacks_are_named_and_exact(tokenizer):
    from fastrl.distributed.activation_checkpoint import apply_ac

    model = _model(tokenizer, "qwen2")
    model.config._attn_implementation = "flash_attention_2"  # noqa: SLF001
    assert "flash_attention_2" in shared_prompt_unsupported(model)
    model.config._attn_implementation = "sdpa"  # noqa: SLF001
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert "non-full-attention" in shared_prompt_unsupported(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    mb = _rollout(tokenizer, seed=1, rows=list(range(12)))
    with torch.no_grad():
        want = completion_hidden(model, mb, share=True)
    apply_ac(model, "full")
    assert shared_prompt_unsupported(model) == "activation checkpointing"
    with torch.no_grad():
        got = completion_hidden(model, mb, share=True)  # the padded path, same numbers
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="completion_ids"):
        completion_hidden(model, {"input_ids": mb["input_ids"]})
