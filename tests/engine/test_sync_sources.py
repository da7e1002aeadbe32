"""What a sync sends (fastrl/engine/sync/sources.py) and the in-process WeightSyncer."""

from __future__ import annotations

import copy

import pytest
import torch

from fastrl.engine.sync import (
    ChecksumMismatchError,
    WeightSyncer,
    checksum,
    iter_sync_weights,
    sync_specs,
    unpack_bucket,
)
from fastrl.models.policy import Policy
from tests.distributed._models import tiny_model


def lora(model, *, dtype=torch.float32, lora_bias=False, targets=("q_proj", "v_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=5.2, target_modules=list(targets), lora_bias=lora_bias)
    # autocast_adapter_dtype=False keeps half adapters half (peft would make them fp32), so the merge
    # takes peft's fp32-on-CPU branch
    model = get_peft_model(model.to(dtype), cfg, autocast_adapter_dtype=False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapters a real update to merge
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert torch.equal(p, before[n]), n


def test_plain_model_sends_hf_names_and_values(seed):
    model = tiny_model(seed=seed % 1000)
    got = dict(iter_sync_weights(model))
    assert got.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p), n
    specs = sync_specs(model)
    assert [s[0] for s in specs] == list(got)
    assert all(got[n].dtype == d and tuple(got[n].shape) == s for n, d, s in specs)


def test_policy_and_compile_wrappers_are_seen_through(seed):
    model = tiny_model(seed=seed % 1000)
    want = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in iter_sync_weights(Policy(model))] == want

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module as ``_orig_mod``
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert [n for n, _ in iter_sync_weights(Compiled(Policy(model)))] == want


def test_tied_embeddings_are_sent_once_as_embed_tokens():
    model = tiny_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in iter_sync_weights(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names))
    untied = [n for n, _ in iter_sync_weights(tiny_model(tie=False))]
    assert "lm_head.weight" in untied


def test_dtype_casts_floats_only():
    model = tiny_model()
    model.register_parameter(
        "step", torch.nn.Parameter(torch.tensor(3, dtype=torch.int64), requires_grad=False)
    )
    got = dict(iter_sync_weights(model, dtype=torch.bfloat16))
    assert got["step"].dtype == torch.int64
    assert got["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight.bfloat16())
    with pytest.raises(ValueError, match="dtype"):
        sync_specs(model, dtype=torch.int8)


@pytest.mark.parametrize(("dtype", "lora_bias"), [(torch.float32, False), (torch.bfloat16, True)])
def test_lora_sends_exactly_merge_and_unload_and_leaves_the_trainer_unchanged(seed, dtype, lora_bias):
    targets = ("q_proj", "v_proj") if lora_bias else ("q_proj", "v_proj", "down_proj")  # biased layers
    model = lora(tiny_model(seed=seed % 1000), dtype=dtype, lora_bias=lora_bias, targets=targets)
    before = snapshot(model)
    want = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    got = dict(iter_sync_weights(model))
    assert got.keys() == want.keys()  # base names, no lora_ weights, no base_model.model. / .base_layer
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    merged = [n for n in want if "q_proj.weight" in n]
    assert merged and not torch.equal(got[merged[0]], before[f"base_model.model.{merged[0]}".replace(
        "q_proj.weight", "q_proj.base_layer.weight")])  # the adapter really changed it  # fmt: skip
    assert_unchanged(model, before)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))


def test_lora_disabled_or_merged_adapters_send_the_base_layer(seed):
    model = lora(tiny_model(seed=seed % 1000))
    base = dict(copy.deepcopy(model).unload().named_parameters())
    with model.disable_adapter():
        got = dict(iter_sync_weights(model))
    assert all(torch.equal(got[n], base[n]) for n in base)
    model.merge_adapter()
    want = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    got = dict(iter_sync_weights(model))
    assert all(torch.equal(got[n], want[n]) for n in want)  # merged once, not twice


def test_lora_bias_without_a_base_bias_is_refused():
    model = lora(tiny_model(), lora_bias=True, targets=("down_proj",))
    with pytest.raises(ValueError, match="down_proj.*LoRA bias"):
        list(iter_sync_weights(model))


def test_dora_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="variant"):
        list(iter_sync_weights(model))


def _in_process_engine(model):
    """An engine in the trainer's process: its own copy of every weight, loaded from bucket views."""
    params = {n: torch.zeros_like(t) for n, t in iter_sync_weights(model)}
    buckets = []

    def send_bucket(bucket):
        buckets.append(bucket.slots)
        sums = {}
        for name, view in unpack_bucket(bucket.buffer, bucket.slots):
            params[name].copy_(view)
            sums[name] = checksum(params[name])
        return sums if bucket.verify else None

    return params, send_bucket, buckets


def test_weight_syncer_in_process_with_verification(seed):
    model = lora(tiny_model(seed=seed % 1000))
    before = snapshot(model)
    params, send_bucket, buckets = _in_process_engine(model)
    syncer = WeightSyncer(send_bucket, bucket_bytes=40_000)
    stats = syncer.sync(model, verify=True)
    want = dict(iter_sync_weights(model))
    assert stats.n_tensors == len(want) and stats.n_buckets == len(buckets) > 2
    assert stats.bytes == sum(t.numel() * t.element_size() for t in want.values())
    for n, t in want.items():
        assert torch.equal(params[n], t), n
    assert_unchanged(model, before)

    # an engine that stores something else is caught, with the name
    def corrupting(bucket):
        sums = send_bucket(bucket)
        if "model.norm.weight" in sums:
            sums["model.norm.weight"] = checksum(torch.zeros(3))
        return sums

    with pytest.raises(ChecksumMismatchError, match=r"model\.norm\.weight"):
        WeightSyncer(corrupting, bucket_bytes=40_000).sync(model, verify=True)
