"""FusedLinearGRPOLoss equals linear_logprobs followed by grpo_loss: loss, metrics and the gradients to
hidden, weight and bias (truth: the same composition in float64)."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses.fused_grpo import FusedLinearGRPOLoss
from fastrl.losses.grpo import grpo_loss
from fastrl.ops.linear_logprobs import linear_logprobs
from tests.helpers import assert_close_to_truth


def make_case(B, T, H, V, *, dtype=torch.float32, with_bias=True):
    hidden = torch.randn(B, T, H) / H**0.25
    weight = torch.randn(V, H) / H**0.25
    bias = 0.5 * torch.randn(V) if with_bias else None
    labels = torch.randint(0, V, (B, T))
    lengths = torch.randint(1, T + 1, (B,))
    lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    labels[~mask] = -100  # padding carries ignore_index, as a collator would write it
    with torch.no_grad():
        logp = linear_logprobs(hidden, weight, labels, bias=bias, impl="torch")
    old = logp + 0.4 * torch.randn(B, T) + 0.2 * torch.randn(B, 1)
    ref = logp + 0.3 * torch.randn(B, T)
    engine = old + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)
    cast = lambda t: None if t is None else t.to(dtype)
    return dict(
        hidden=cast(hidden), weight=cast(weight), bias=cast(bias), labels=labels, mask=mask, old=old, ref=ref,
        engine=engine, adv=adv,
    )  # fmt: skip


def leaves(case, dtype):
    out = {k: case[k].detach().to(dtype).requires_grad_(True) for k in ("hidden", "weight")}
    if case["bias"] is not None:
        out["bias"] = case["bias"].detach().to(dtype).requires_grad_(True)
    return out


def composed(case, opts, dtype, *, temperature, old=True, engine=True):
    """linear_logprobs + grpo_loss with autograd, in ``dtype``."""
    p = leaves(case, dtype)
    logp = linear_logprobs(
        p["hidden"], p["weight"], case["labels"], bias=p.get("bias"), temperature=temperature, impl="torch"
    )
    loss, metrics = grpo_loss(
        logp, case["old"] if old else None, case["adv"], case["mask"], ref_logp=case["ref"],
        engine_logp=case["engine"] if engine else None, impl="torch", **opts,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in p.items()}, metrics, logp.detach()


def fused(case, opts, dtype, *, temperature, impl, chunk_size, old=True, engine=True, return_entropy=False):
    p = leaves(case, dtype)
    module = FusedLinearGRPOLoss(
        temperature=temperature, chunk_size=chunk_size, impl=impl, return_entropy=return_entropy, **opts
    )
    loss, metrics = module(
        p["hidden"], p["weight"], case["labels"], case["old"] if old else None, case["adv"], case["mask"],
        bias=p.get("bias"), ref_logp=case["ref"], engine_logp=case["engine"] if engine else None,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in p.items()}, metrics


def check(case, opts, dtype, *, impl="torch", temperature=1.0, chunk_size=8, **which):
    t_loss, t_grads, t_metrics, t_logp = composed(case, opts, torch.float64, temperature=temperature, **which)
    r_loss, r_grads, r_metrics, r_logp = composed(case, opts, dtype, temperature=temperature, **which)
    loss, grads, metrics = fused(
        case, opts, dtype, temperature=temperature, impl=impl, chunk_size=chunk_size, **which
    )
    assert set(grads) == set(t_grads)
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close_to_truth(f"grad_{name}", grads[name], r_grads[name], t_grads[name], dtype=dtype)
    assert_close_to_truth("loss", loss, r_loss, t_loss, dtype=dtype)
    # logp: fp32 (fp64) from logits rounded to the input dtype, so the input dtype's slack.
    assert not metrics["logp"].requires_grad
    assert metrics["logp"].dtype == r_logp.dtype
    assert_close_to_truth("logp", metrics["logp"], r_logp, t_logp, dtype=dtype)
    assert set(metrics) == set(t_metrics) | {"logp"}
    for key in t_metrics:
        assert_close_to_truth(key, metrics[key], r_metrics[key], t_metrics[key], dtype=dtype)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_composition(seed, loss_type, level):
    case = make_case(3, 11, 16, 37)
    opts = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "beta": 0.05,
        "is_mode": "token_truncate",
    }
    opts.update({"epsilon_high": 1.2} if loss_type == "cispo" else {"epsilon_high": 0.28, "delta": 1.5})
    check(case, opts, torch.float32, temperature=0.7)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("is_mode", ["token_mask", "sequence_truncate"])
def test_single_iteration_with_engine_weights(seed, level, is_mode):
    """old_logp=None (ratio 1) with engine IS weights: those need logp first (the no-grad sweep)."""
    case = make_case(4, 9, 16, 29, with_bias=False)
    opts = {"loss_type": "bnpo", "importance_sampling_level": level, "is_mode": is_mode, "is_clip_max": 2.0}
    check(case, opts, torch.float32, old=False)
    check(
        case,
        {"loss_type": "grpo", "importance_sampling_level": level},
        torch.float32,
        old=False,
        engine=False,
    )


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_impl_bf16(seed, level):
    case = make_case(2, 13, 32, 45)
    opts = {"loss_type": "dapo", "importance_sampling_level": level, "beta": 0.02, "is_mode": "sequence_mask"}
    check(case, opts, torch.bfloat16, impl="triton", chunk_size=16)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_float64_keeps_float64_precision(seed, level):
    """fp64 inputs: the fused gradients are the fp64 composition's to fp64 rounding (the per-token GRPO math
    once ran its normaliser in fp32 here, a 1e-8 relative error)."""
    case = make_case(3, 11, 16, 37, dtype=torch.float64)
    opts = {
        "loss_type": "grpo",
        "importance_sampling_level": level,
        "beta": 0.05,
        "is_mode": "token_truncate",
    }
    check(case, opts, torch.float64, temperature=0.7)


def test_frozen_weight_upstream_scale_and_no_grad(seed):
    case = make_case(3, 7, 16, 23)
    module = FusedLinearGRPOLoss(loss_type="grpo", chunk_size=5)
    hidden = case["hidden"].clone().requires_grad_(True)
    weight = case["weight"]  # frozen lm_head (LoRA): no weight gradient at all
    args = (hidden, weight, case["labels"], case["old"], case["adv"], case["mask"])
    loss, _ = module(*args, bias=case["bias"])
    (2.5 * loss).backward()
    ref_hidden = case["hidden"].clone().requires_grad_(True)
    logp = linear_logprobs(ref_hidden, weight, case["labels"], bias=case["bias"], impl="torch")
    ref_loss, _ = grpo_loss(logp, case["old"], case["adv"], case["mask"], loss_type="grpo", impl="torch")
    (2.5 * ref_loss).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)
    assert weight.grad is None
    with torch.no_grad():
        nograd_loss, metrics = module(*args, bias=case["bias"])
    assert not nograd_loss.requires_grad
    torch.testing.assert_close(nograd_loss, loss.detach())
    torch.testing.assert_close(metrics["logp"], logp.detach())


def test_weight_gradient_handed_over_without_a_copy(seed, monkeypatch):
    """loss.backward() adopts the weight gradient computed in the forward as weight.grad itself: a copy
    would be a second [V, H] gradient at the memory peak. A second backward raises instead of handing out
    nothing."""
    import fastrl.losses.fused_grpo as fused_grpo

    case = make_case(3, 7, 16, 23)
    made = {}
    real = fused_grpo.fused_linear_logprobs_with_grad

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        made["grad_weight"] = out.grad_weight.data_ptr()
        return out

    monkeypatch.setattr(fused_grpo, "fused_linear_logprobs_with_grad", spy)
    p = leaves(case, torch.float32)
    loss, _ = FusedLinearGRPOLoss(loss_type="grpo")(
        p["hidden"], p["weight"], case["labels"], case["old"], case["adv"], case["mask"], bias=p["bias"]
    )
    loss.backward(retain_graph=True)
    assert p["weight"].grad.data_ptr() == made["grad_weight"]
    with pytest.raises(RuntimeError, match="already handed out its gradients"):
        loss.backward()


def test_dapo_micro_batches_sum_to_full_batch(seed):
    case = make_case(6, 8, 16, 31)
    opts = {"loss_type": "dapo", "beta": 0.05, "is_mode": "token_truncate"}
    items = int(case["mask"].sum())
    full_loss, full_grads, _ = fused(case, opts, torch.float32, temperature=1.0, impl="torch", chunk_size=8)
    hidden_grads, weight_grad, total = [], 0.0, 0.0
    for rows in torch.arange(6).chunk(3):
        part = {k: (v[rows] if k not in ("weight", "bias") else v) for k, v in case.items()}
        loss, grads, _ = fused(
            part,
            {**opts, "num_items_in_batch": items},
            torch.float32,
            temperature=1.0,
            impl="torch",
            chunk_size=8,
        )
        total = total + loss
        hidden_grads.append(grads["hidden"])
        weight_grad = weight_grad + grads["weight"]
    torch.testing.assert_close(total, full_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat(hidden_grads), full_grads["hidden"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight_grad, full_grads["weight"], rtol=1e-5, atol=1e-7)


def entropy_truth_and_reference(case, dtype, temperature):
    """linear_logprobs(..., return_entropy=True)'s entropy in float64 (truth) and in ``dtype`` (PyTorch)."""
    out = []
    for dt in (torch.float64, dtype):
        p = {k: v.detach() for k, v in leaves(case, dt).items()}
        with torch.no_grad():
            _, ent = linear_logprobs(
                p["hidden"], p["weight"], case["labels"], bias=p.get("bias"), temperature=temperature,
                return_entropy=True, impl="torch",
            )  # fmt: skip
        out.append(ent)
    return out


def check_entropy(metrics, case, dtype, temperature):
    truth, reference = entropy_truth_and_reference(case, dtype, temperature)
    entropy = metrics["entropy"]
    assert not entropy.requires_grad
    assert entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Every position has an entropy, ignored ones (padding, the empty row 1) included, as in linear_logprobs.
    assert_close_to_truth("entropy", entropy, reference, truth, dtype=dtype)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_return_entropy(seed, level, dtype, impl):
    """metrics["entropy"] is linear_logprobs' entropy, while the loss, the other metrics and the gradients
    are bit for bit those of the module without the option."""
    case = make_case(3, 7, 16, 29)
    opts = {
        "loss_type": "dapo",
        "importance_sampling_level": level,
        "beta": 0.03,
        "is_mode": "token_truncate",
    }
    kw = dict(temperature=0.8, impl=impl, chunk_size=8)
    loss, grads, metrics = fused(case, opts, dtype, return_entropy=True, **kw)
    base_loss, base_grads, base_metrics = fused(case, opts, dtype, **kw)
    assert set(metrics) == set(base_metrics) | {"entropy"}
    assert torch.equal(loss, base_loss)
    for name in base_grads:
        assert torch.equal(grads[name], base_grads[name]), name
    for key in base_metrics:
        assert torch.equal(metrics[key], base_metrics[key]), key
    check_entropy(metrics, case, dtype, 0.8)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_return_entropy_float64_and_no_grad(seed, level):
    case = make_case(2, 9, 16, 23, dtype=torch.float64)
    opts = {"loss_type": "grpo", "importance_sampling_level": level}
    _, _, metrics = fused(
        case, opts, torch.float64, temperature=1.3, impl="torch", chunk_size=5, return_entropy=True
    )
    check_entropy(metrics, case, torch.float64, 1.3)
    module = FusedLinearGRPOLoss(temperature=1.3, chunk_size=5, return_entropy=True, **opts)
    args = (case["hidden"], case["weight"], case["labels"], case["old"], case["adv"], case["mask"])
    for kind in ("no_grad", "frozen"):  # loss only: under no_grad, or with nothing that requires grad
        with torch.no_grad() if kind == "no_grad" else torch.enable_grad():
            inputs = [t.detach().requires_grad_(kind == "no_grad") for t in args[:2]]
            loss, nograd_metrics = module(*inputs, *args[2:], bias=case["bias"])
        assert not loss.requires_grad
        check_entropy(nograd_metrics, case, torch.float64, 1.3)
        torch.testing.assert_close(nograd_metrics["entropy"], metrics["entropy"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("old", [True, False], ids=["old", "no_old"])
def test_return_entropy_adds_no_sweep(seed, monkeypatch, level, old):
    """The entropy rides on a sweep that runs anyway: exactly one sweep computes it, and the sweeps run are
    those of the module without the option (the first no-grad sweep only where the loss needs it)."""
    import fastrl.losses.fused_grpo as fused_grpo

    calls = []

    def spy(name, real, flag):
        def wrapped(*args, **kwargs):
            calls.append((name, bool(kwargs.get(flag, False))))
            return real(*args, **kwargs)

        monkeypatch.setattr(fused_grpo, name, wrapped)

    spy("linear_logprobs", fused_grpo.linear_logprobs, "return_entropy")
    spy("fused_linear_logprobs_with_grad", fused_grpo.fused_linear_logprobs_with_grad, "with_entropy")
    case = make_case(2, 6, 8, 13)
    opts = {"loss_type": "grpo", "importance_sampling_level": level, "is_mode": "token_truncate"}
    runs = {}
    for flag in (False, True):
        calls.clear()
        fused(case, opts, torch.float32, temperature=1.0, impl="torch", chunk_size=4, old=old,
              return_entropy=flag)  # fmt: skip
        runs[flag] = list(calls)
    assert [name for name, _ in runs[True]] == [name for name, _ in runs[False]]
    assert not any(with_ent for _, with_ent in runs[False])
    # Two sweeps: the first one (before the gradient buffers exist) takes the entropy.
    assert [with_ent for _, with_ent in runs[True]] == [True] + [False] * (len(runs[True]) - 1)
    assert len(runs[True]) == (2 if level == "sequence" or not old else 1)


def test_bad_input():
    case = make_case(2, 5, 8, 11)
    module = FusedLinearGRPOLoss()
    with pytest.raises(ValueError, match="hidden_BTH must be a tensor of shape \\[B, T, H\\]"):
        module(case["hidden"][0], case["weight"], case["labels"], case["old"], case["adv"], case["mask"])
    with pytest.raises(ValueError, match="labels_BT must have shape"):
        module(case["hidden"], case["weight"], case["labels"][:, 1:], case["old"], case["adv"], case["mask"])
    with pytest.raises(ValueError, match="mask must be a tensor of the \\[B, T\\] shape"):
        module(case["hidden"], case["weight"], case["labels"], case["old"], case["adv"], case["mask"].T)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        FusedLinearGRPOLoss(loss_type="gspo")
    with pytest.raises(ValueError, match="temperature must be"):
        FusedLinearGRPOLoss(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        FusedLinearGRPOLoss(chunk_size=0)
    with pytest.raises(ValueError, match="return_entropy must be a bool"):
        FusedLinearGRPOLoss(return_entropy=1)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_fused_matches_composition(seed, level):
    torch.set_default_device("cuda")
    try:
        case = make_case(4, 300, 256, 5003, dtype=torch.bfloat16)
        opts = {"loss_type": "dapo", "importance_sampling_level": level, "beta": 0.04, "delta": 2.0}
        check(case, opts, torch.bfloat16, impl="auto", chunk_size=512)
    finally:
        torch.set_default_device("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_return_entropy(seed, level):
    torch.set_default_device("cuda")
    try:
        case = make_case(4, 300, 256, 5003, dtype=torch.bfloat16)
        opts = {"loss_type": "dapo", "importance_sampling_level": level, "beta": 0.04}
        kw = dict(temperature=0.9, impl="auto", chunk_size=512)
        loss, grads, metrics = fused(case, opts, torch.bfloat16, return_entropy=True, **kw)
        base_loss, base_grads, _ = fused(case, opts, torch.bfloat16, **kw)
        assert torch.equal(loss, base_loss)
        for name in base_grads:
            assert torch.equal(grads[name], base_grads[name]), name
        check_entropy(metrics, case, torch.bfloat16, 0.9)
    finally:
        torch.set_default_device("cpu")
