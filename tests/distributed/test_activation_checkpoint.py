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


def _grads(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    lm_loss(model, ids).backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective:1", "selective:3", "op"])
@pytest.mark.parametrize("offload", [False, True])
def test_every_mode_and_offloading_give_the_same_gradients(seed, mode, offload):
    from fastrl.distributed.offload import apply_activation_offloading

    plain = tiny_model("qwen2", seed=seed, layers=3)
    wrapped = copy.deepcopy(plain)
    assert apply_ac(wrapped, mode) == {"full": [0, 1, 2], "selective:1": [0, 1, 2], "selective:3": [2],
                                       "op": [0, 1, 2]}[mode]  # fmt: skip
    contexts = apply_activation_offloading(wrapped, devices=("cpu",)) if offload else []
    ids = batch(seed, b=2, t=9)
    want, got = _grads(plain, ids), _grads(wrapped, ids)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)  # the CPU recompute is exact
    if offload:  # a checkpointed layer offloads only the input it keeps; the others all they save
        moved = [c.offloaded_bytes for c in contexts]
        hidden = 2 * 9 * 64 * 4  # [b, t, hidden] fp32
        assert moved[2] == hidden, moved
        assert (moved[0] > 10 * hidden) == (mode == "selective:3") and moved[0] >= hidden, moved


def test_op_mode_saves_matmul_outputs_and_recomputes_the_rest(seed):
    """The op policy saves attention and every other matmul output: the saved-for-backward set lies
    between "none" and "full" and the recompute runs the layer (its cheap ops) again."""
    from torch.utils.checkpoint import CheckpointPolicy

    from fastrl.distributed import activation_checkpoint as ac

    decisions = []
    original = ac.create_selective_checkpoint_contexts

    def recording(policy):
        def wrapped(ctx, func, *args, **kwargs):
            out = policy(ctx, func, *args, **kwargs)
            if not ctx.is_recompute:
                decisions.append((str(func), out))
            return out

        return original(wrapped)

    model = tiny_model("qwen2", seed=seed, layers=1)
    model.config._attn_implementation = "sdpa"  # an attention kernel, as real runs use
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ac, "create_selective_checkpoint_contexts", recording)
        apply_ac(model, "op")
        lm_loss(model, batch(seed, b=2, t=9)).backward()
    mms = [d for f, d in decisions if f.startswith(("aten.mm", "aten.addmm", "aten.bmm"))]
    assert len(mms) >= 7  # q, k, v, o, gate, up, down
    assert mms[0::2] == [CheckpointPolicy.MUST_SAVE] * len(mms[0::2])
    assert mms[1::2] == [CheckpointPolicy.PREFER_RECOMPUTE] * len(mms[1::2])
    attn = [d for f, d in decisions if "attention" in f]
    assert attn and all(d == CheckpointPolicy.MUST_SAVE for d in attn)
    others = [
        d
        for f, d in decisions
        if not f.startswith(("aten.mm", "aten.addmm", "aten.bmm")) and "attention" not in f
    ]
    assert others and all(d == CheckpointPolicy.PREFER_RECOMPUTE for d in others)


def test_bad_modes_are_named():
    from fastrl.distributed.activation_checkpoint import parse_ac_mode

    assert parse_ac_mode("selective") == ("selective", 2) and parse_ac_mode("selective:4") == ("selective", 4)
    for bad in ("selective:0", "selective:x", "ops", "partial"):
        with pytest.raises(ValueError, match="selective:<k>"):
            parse_ac_mode(bad)


def test_parallelize_applies_checkpointing_then_compile_then_fsdp(seed, monkeypatch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from fastrl.distributed import fsdp, parallel

    order = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: order.append(("compile", type(self))))
    monkeypatch.setattr(fsdp, "apply_fsdp_policy", lambda policy, mesh, **kw: order.append(("fsdp", kw)))
    model = tiny_model("qwen2", seed=seed, layers=2)
    policy = parallel.parallelize_policy(model, mesh="mesh", ac="full", compile_layers=True,
                                         fsdp={"reshard_after_forward": False})  # fmt: skip
    assert [o[0] for o in order] == ["compile", "compile", "fsdp"]
    assert all(issubclass(t, CheckpointWrapper) for _, t in order[:2])  # compiled: the checkpointed layer
    assert order[2][1] == {"reshard_after_forward": False} and policy.model is model


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "op"])
def test_offloading_on_cuda_moves_activations_to_pinned_memory_with_same_gradients(seed, mode):
    from fastrl.distributed.offload import apply_activation_offloading

    plain = tiny_model("qwen2", seed=seed, layers=2).cuda()
    wrapped = copy.deepcopy(plain)
    apply_ac(wrapped, mode)
    contexts = apply_activation_offloading(wrapped)
    ids = batch(seed, b=2, t=33).cuda()
    want, got = _grads(plain, ids), _grads(wrapped, ids)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert all(c.offloaded_bytes > 0 and c.pin for c in contexts)
