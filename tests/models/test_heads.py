"""backbone_hidden + lm_head_params reproduce the model's logits, padded, packed and under PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

from fastrl.models.heads import backbone_hidden, causal_lm, lm_head_params
from fastrl.models.tiny import build_tiny_model


def _logits_from_split(model, input_ids, attention_mask=None, position_ids=None):
    hidden = backbone_hidden(model, input_ids, attention_mask, position_ids)
    weight, bias = lm_head_params(model)
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


def _random_padded_batch(lengths, vocab, pad):
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(5, vocab, (n,))
        mask[i, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("llama", True)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_split_equals_logits(tokenizer, seed, arch, tied, attn):
    model = build_tiny_model(tokenizer, arch=arch, tie_word_embeddings=tied, seed=seed, init_std=0.1)
    model.config._attn_implementation = attn
    ids, mask = _random_padded_batch([7, 13, 1], len(tokenizer), tokenizer.pad_token_id)
    expected = model(input_ids=ids, attention_mask=mask).logits
    got = _logits_from_split(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep])
    weight, bias = lm_head_params(model)
    assert weight is model.lm_head.weight and bias is None
    assert (weight is model.get_input_embeddings().weight) == tied


def test_bias_is_returned(tokenizer, seed):
    model = build_tiny_model(tokenizer, seed=seed)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    weight, bias = lm_head_params(model)
    assert weight is model.lm_head.weight and bias is model.lm_head.bias
    ids = torch.randint(5, len(tokenizer), (2, 9))
    torch.testing.assert_close(_logits_from_split(model, ids), model(ids).logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_attend_only_to_themselves(tokenizer, seed, attn):
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1).double()
    model.config._attn_implementation = attn
    lengths = [5, 1, 11, 4]
    seqs = [torch.randint(5, len(tokenizer), (n,)) for n in lengths]
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = backbone_hidden(model, packed_ids, position_ids=position_ids)[0]
    separate = torch.cat([backbone_hidden(model, s[None])[0] for s in seqs])
    # HF's eager attention takes its softmax in fp32 even for a float64 model.
    tol = 1e-10 if attn == "sdpa" else 1e-5
    torch.testing.assert_close(packed, separate, rtol=tol, atol=tol)


def test_grad_flows_to_backbone_and_head(tokenizer, seed):
    model = build_tiny_model(tokenizer, seed=seed)
    ids = torch.randint(5, len(tokenizer), (2, 6))
    _logits_from_split(model, ids).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_peft_wrapped(tokenizer, seed):
    base = build_tiny_model(tokenizer, seed=seed, init_std=0.1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-trivial adapter
    ids, mask = _random_padded_batch([3, 8], len(tokenizer), tokenizer.pad_token_id)
    keep = mask.bool()
    torch.testing.assert_close(
        _logits_from_split(model, ids, mask)[keep], model(ids, attention_mask=mask).logits[keep]
    )
    with model.disable_adapter():
        disabled = _logits_from_split(model, ids, mask)[keep]
        torch.testing.assert_close(disabled, model(ids, attention_mask=mask).logits[keep])
    assert not torch.allclose(disabled, _logits_from_split(model, ids, mask)[keep])
    assert lm_head_params(model)[0] is causal_lm(model).lm_head.weight


def test_policy_wrapper_is_seen_through(tokenizer, seed):
    # Review fix: causal_lm / peft_model / adapter_disabled refused fastrl's own Policy wrapper.
    from fastrl.models.heads import peft_model
    from fastrl.models.lora import LoraConfig, adapter_disabled, apply_lora
    from fastrl.models.policy import Policy

    model = apply_lora(build_tiny_model(tokenizer, seed=seed, init_std=0.1), LoraConfig(enabled=True, r=2))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    policy = Policy(model)
    assert peft_model(policy) is model and causal_lm(policy) is model.get_base_model()
    assert lm_head_params(policy)[0] is lm_head_params(model)[0]
    ids = torch.randint(5, len(tokenizer), (2, 6))
    with torch.no_grad():
        adapted = backbone_hidden(policy, ids)
        with adapter_disabled(policy):
            base = backbone_hidden(policy, ids)
            torch.testing.assert_close(base, backbone_hidden(model, ids), rtol=0, atol=0)
    assert not torch.allclose(adapted, base)


def test_lora_on_lm_head(tokenizer, seed):
    base = build_tiny_model(tokenizer, seed=seed, init_std=0.1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        lm_head_params(model)
    with model.disable_adapter():
        assert lm_head_params(model)[0] is causal_lm(model).lm_head.base_layer.weight
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(5, len(tokenizer), (2, 6))
    expected = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(_logits_from_split(model, ids), expected)


def test_modules_to_save_head(tokenizer, seed):
    base = build_tiny_model(tokenizer, seed=seed)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    head = causal_lm(model).lm_head
    assert lm_head_params(model)[0] is head.modules_to_save["default"].weight
    with model.disable_adapter():
        assert lm_head_params(model)[0] is head.original_module.weight


def test_bad_inputs(tokenizer):
    model = build_tiny_model(tokenizer)
    ids = torch.randint(5, len(tokenizer), (2, 6))
    with pytest.raises(ValueError, match="input_ids"):
        backbone_hidden(model, ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        backbone_hidden(model, ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        backbone_hidden(model, ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        backbone_hidden(model, ids, None, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        lm_head_params(torch.nn.Linear(2, 2))


def test_eval_mode_restores_each_modules_own_mode():
    from torch import nn

    from fastrl.models.modes import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    model.train()
    model[2].eval()  # a part the caller keeps in eval
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[2].training and not model[2][0].training
