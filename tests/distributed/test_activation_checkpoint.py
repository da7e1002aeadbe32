"""Activation checkpointing: which layers get wrapped, that they really recompute, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastrl.distributed._layers import decoder_layers
from fastrl.distributed.activation_checkpoint import apply_ac, count_checkpointed
from tests.distributed._models import batch, lm_loss, tiny_lora, tiny_model


@pytest.mark.parametrize(
    "mode, every, expected",
    [
        ("full", 2, [0, 1, 2, 3, 4]),
        ("selective", 2, [1, 3]),
        ("selective", 3, [2]),
        ("selective", 1, [0, 1, 2, 3, 4]),
        ("none", 2, []),
    ],
)
def test_wrapped_layers(seed, mode, every, expected):
    model = tiny_model("llama", seed=seed, layers=5)
    keys = list(model.state_dict())
    assert apply_ac(model, mode, every=every) == expected
    assert count_checkpointed(model) == len(expected)
    assert list(model.state_dict()) == keys, "checkpoints keep their keys"
    assert apply_ac(model, mode, every=every) == expected  # idempotent
    assert count_checkpointed(model) == len(expected)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("lora", [False, True])
def test_same_gradients_and_layers_recompute(seed, arch, mode, lora):
    plain = tiny_model(arch, seed=seed, layers=2)
    if lora:
        plain = tiny_lora(plain)
        for n, p in plain.named_parameters():  # lora_B starts at zero: give the adapter a gradient path
            if "lora_B" in n:
                nn.init.normal_(p, std=0.02)
    wrapped = copy.deepcopy(plain)
    inner = list(decoder_layers(wrapped))
    assert apply_ac(wrapped, mode, every=2) == ([0, 1] if mode == "full" else [1])
    calls = [0] * len(inner)
    for i, layer in enumerate(inner):
        # A pre-hook: the recompute stops early once it has the saved tensors, before forward hooks run.
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    ids = batch(seed, b=3, t=11)
    lm_loss(plain, ids).backward()
    loss = lm_loss(wrapped, ids)
    assert calls == [1, 1]
    loss.backward()
    # A checkpointed layer runs its forward again during backward; the others do not.
    assert calls == ([2, 2] if mode == "full" else [1, 2])
    grads = {
        n.replace("._checkpoint_wrapped_module", ""): p.grad
        for n, p in wrapped.named_parameters()
        if p.requires_grad
    }
    assert grads and all(g is not None for g in grads.values())
    for n, p in plain.named_parameters():
        if p.requires_grad:
            # Recompute on the CPU runs the same kernels on the same inputs: bitwise equal.
            assert torch.equal(p.grad, grads[n]), n


def test_bad_arguments():
    model = tiny_model(layers=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_ac(model, "some")
    with pytest.raises(ValueError, match="every must be"):
        apply_ac(model, "selective", every=0)
    with pytest.raises(ValueError, match="decoder layers"):
        apply_ac(nn.Sequential(nn.Linear(2, 2)), "full")


def test_generation_with_cache_unchanged(seed):
    plain = tiny_model("qwen2", seed=seed, layers=2)
    wrapped = copy.deepcopy(plain)
    apply_ac(wrapped, "full")
    ids = batch(seed, b=2, t=5)
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(wrapped.generate(ids, **kw), plain.generate(ids, **kw))
