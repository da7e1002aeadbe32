"""LoRA via PEFT: only adapters train, the lm_head stays plain, adapter_disabled gives the base model."""

from __future__ import annotations

import pytest
import torch

from fastrl.models.heads import backbone_hidden, lm_head_params
from fastrl.models.lora import LoraConfig, adapter_disabled, apply_lora, trainable_parameter_names
from fastrl.models.tiny import build_tiny_model


def _perturb_adapters(model, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)  # B starts at zero; make the adapter change the output


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_only_adapters_trainable(tokenizer, seed, targets):
    model = build_tiny_model(tokenizer, seed=seed)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.model.modules())
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=targets))
    names = trainable_parameter_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    expected_layers = n_linear if targets == "all-linear" else 2 * model.config.num_hidden_layers
    assert len(names) == 2 * expected_layers
    assert not any("lm_head" in n for n in names)
    weight, _ = lm_head_params(model)  # a plain lm_head: no error
    assert not weight.requires_grad


def test_fresh_adapter_is_identity_and_disabled_is_base(tokenizer, seed):
    model = build_tiny_model(tokenizer, seed=seed, init_std=0.1)
    ids = torch.randint(5, len(tokenizer), (3, 9))
    with torch.no_grad():
        base_logits = model(ids).logits
        base_hidden = backbone_hidden(model, ids)
    model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.1))
    model.eval()  # dropout off
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits)
        _perturb_adapters(model)
        adapted = model(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        with adapter_disabled(model) as m:
            assert m is model
            torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
            torch.testing.assert_close(backbone_hidden(model, ids), base_hidden, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)  # re-enabled after the block


def test_adapter_gradients(tokenizer, seed):
    model = apply_lora(build_tiny_model(tokenizer, seed=seed), LoraConfig(enabled=True, r=2))
    _perturb_adapters(model)
    ids = torch.randint(5, len(tokenizer), (2, 5))
    model(ids).logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_apply_lora_raises_no_deprecation_warning(tokenizer):
    # Issue 9 item 6: PEFT's get_peft_model read transformers' deprecated `is_gradient_checkpointing`.
    import warnings

    model = build_tiny_model(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, LoraConfig(enabled=True))


def test_disabled_config_returns_the_model(tokenizer):
    model = build_tiny_model(tokenizer)
    assert apply_lora(model, LoraConfig()) is model
    assert trainable_parameter_names(model) == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="adapter_disabled"), adapter_disabled(model):
        pass


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": "attention"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        # Review fixes: bools and infinities used to pass (r=True meant rank 1).
        ({"r": True}, "r must"),
        ({"r": 4.0}, "r must"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": float("nan")}, "dropout"),
        ({"enabled": "false"}, "enabled"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{"enabled": True, **kwargs})


def test_bad_apply(tokenizer):
    model = build_tiny_model(tokenizer)
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LoraConfig"):
        apply_lora(model, {"enabled": True})
    wrapped = apply_lora(model, LoraConfig(enabled=True))
    with pytest.raises(ValueError, match="already"):
        apply_lora(wrapped, LoraConfig(enabled=True))
