"""grpo_loss: every loss type, ratio level, KL and engine-IS mode against an independent float64 truth.

The truth below is written from TRL's formulas (multiply by the mask, clamp denominators to 1) with
``torch.min`` / ``torch.clamp`` and autograd for the gradient: it shares no code with fastrl's closed form.
Run at fp32 it is the "PyTorch at this dtype" reference of ``assert_close_to_truth``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.losses.grpo import GRPOLossConfig, grpo_loss
from fastrl.losses.grpo_config import LOSS_TYPES
from tests.helpers import assert_close_to_truth

LOSS_TYPE_NAMES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def make_inputs(B, T, *, dtype=torch.float32, adv_per_token=False, spread=0.5):
    """Ratios on both sides of both clip bounds (per token and per sequence), advantages of both signs,
    ragged masks with one all-masked row."""
    logp = -3.0 * torch.rand(B, T)
    row_shift = 0.3 * torch.randn(B, 1)  # moves whole sequences outside the clip range (GSPO)
    adv = torch.randn(B, T) if adv_per_token else torch.randn(B)
    lengths = torch.randint(0, T + 1, (B,))
    if B >= 5:  # two long sequences of each advantage sign, so that every clip branch is hit
        adv[[0, 3]], adv[[2, 4]] = adv[[0, 3]].abs() + 0.1, -adv[[2, 4]].abs() - 0.1
        lengths[[0, 2, 3, 4]] = torch.tensor([T, T, T // 2, T // 2])
        row_shift[[0, 2]] = 0.0  # token ratios centred on 1 there, spread over both clip sides
    if B >= 7:  # sequence ratios r_b ~ exp(-shift) past the high clip, the low clip and delta
        adv[6] = -adv[6].abs() - 0.1
        lengths[6] = T
        row_shift[[3, 4, 6], 0] = torch.tensor([-0.7, 0.7, -0.7])
    old = logp + spread * torch.randn(B, T) + row_shift
    ref = logp + 0.3 * torch.randn(B, T)
    engine = old + 0.3 * torch.randn(B, T) + 0.2 * torch.randn(B, 1)
    lengths[1:2] = 0  # a sequence with no completion token
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T) > 0.1  # holes, as tool-output masks make
    cast = lambda t: t.to(dtype)
    return cast(logp), cast(old), cast(adv), mask, cast(ref), cast(engine)


def truth_loss(logp, old, adv, mask, ref, engine, opts: dict, dtype=torch.float64, entropy=None):
    """(loss, dloss/dlogp) from TRL-style formulas, computed in ``dtype`` by autograd; with ``entropy``
    (needed by the entropy options) ``(loss, dloss/dlogp, dloss/dentropy)``."""
    o = {**GRPOLossConfig().__dict__, **opts}
    lp = logp.detach().to(dtype).requires_grad_(True)
    H = None if entropy is None else entropy.detach().to(dtype).requires_grad_(True)
    old_ = lp.detach() if old is None else old.to(dtype)
    A = adv.to(dtype)
    A = A[:, None] if A.dim() == 1 else A
    m = mask.to(dtype)
    B = m.shape[0]
    eps_lo = o["epsilon_low"]
    eps_hi = eps_lo if o["epsilon_high"] is None else o["epsilon_high"]
    w = None
    if engine is not None:
        diff = torch.nan_to_num((old_ - engine.to(dtype)) * m, nan=0.0)
        if o["is_mode"].startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        w = torch.exp(diff)
        lo = o["is_clip_min"] or 0.0
        hi = float("inf") if o["is_clip_max"] is None else o["is_clip_max"]
        inside = (w >= lo) & (w <= hi)
        w = torch.clamp(w, lo, hi) if o["is_mode"].endswith("truncate") else torch.where(inside, w, 0.0)
    log_ratio = lp - old_
    token_ratio = torch.exp(log_ratio)
    if o["importance_sampling_level"] == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    r = torch.exp(log_ratio)
    lt = o["loss_type"]
    if lt == "cispo":
        per = -torch.clamp(r, max=eps_hi).detach() * A * lp
    elif lt == "sapo":
        tau_pos, tau_neg = (
            torch.tensor(o[k], dtype=dtype) for k in ("sapo_temperature_pos", "sapo_temperature_neg")
        )
        tau = torch.where(A > 0, tau_pos, tau_neg)
        per = -(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * A
    elif lt == "vespo":
        # phi(w) = e^lambda w^k e^(-lambda w), w = prod_t clamp(ratio_t) * prod_t IS_t, clamped in log space
        with torch.no_grad():
            lw = (torch.clamp(lp - old_, -20, 20) * m).sum(-1, keepdim=True)
            if w is not None:
                lw = lw + torch.where(m != 0, torch.log(w).clamp(math.log(1e-8), 20), 0.0).sum(
                    -1, keepdim=True
                )
            lw = lw.clamp(math.log(1e-8), 20)
            pos = A >= 0
            k = torch.where(
                pos, torch.tensor(o["vespo_k_pos"], dtype=dtype), torch.tensor(o["vespo_k_neg"], dtype=dtype)
            )
            lam = torch.where(
                pos,
                torch.tensor(o["vespo_lambda_pos"], dtype=dtype),
                torch.tensor(o["vespo_lambda_neg"], dtype=dtype),
            )
            phi = torch.nan_to_num(torch.exp(lam) * torch.exp(lw) ** k * torch.exp(-lam * torch.exp(lw)))
        per = -phi * A * lp
    else:
        r1 = r if o["delta"] is None else torch.clamp(r, max=o["delta"])
        per = -torch.min(r1 * A, torch.clamp(r, 1 - eps_lo, 1 + eps_hi) * A)
    if o["off_policy_mask_threshold"] is not None:
        s = engine.to(dtype) if engine is not None else old_
        kl = torch.nan_to_num(s - lp.detach(), nan=0.0) * m
        mean_kl = kl.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        per = per * ((A >= 0) | (mean_kl <= o["off_policy_mask_threshold"])).to(dtype)
    keep = None
    if o["top_entropy_quantile"] < 1.0:
        vals = H.detach()[m != 0]
        if vals.numel():
            thr = torch.quantile(vals, 1 - o["top_entropy_quantile"])
            keep = ((H.detach() >= thr) & (m != 0)).to(dtype)
        else:
            keep = torch.zeros_like(m)
        per = per * keep
    if w is not None and lt != "vespo":
        per = per * w
    if o["beta"] != 0.0:
        d = ref.to(dtype) - lp
        kl = torch.exp(d) - d - 1.0
        if o["use_bias_correction_kl"]:
            kl = kl * token_ratio
        per = per + o["beta"] * kl
    per = per.expand(m.shape)
    if lt in ("grpo", "sapo"):
        loss = ((per * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif lt == "bnpo":
        loss = (per * m).sum() / m.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = (per * m).sum() / (B * o["max_completion_length"])
    elif lt == "luspo":
        loss = (per * m).sum(-1).mean()
    else:
        items = o["num_items_in_batch"]
        loss = (per * m).sum() / (m.sum().clamp(min=1.0) if items is None else items)
    if o["entropy_coef"] != 0.0:
        eff = m if keep is None else m * keep
        loss = loss - o["entropy_coef"] * (H * eff).sum() / eff.sum().clamp(min=1.0)
    if H is None:
        loss.backward()
        return loss.detach(), lp.grad
    lp_grad, h_grad = torch.autograd.grad(loss, (lp, H), allow_unused=True)
    return loss.detach(), lp_grad, torch.zeros_like(H) if h_grad is None else h_grad


def run(logp, old, adv, mask, ref, engine, opts, impl):
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, adv, mask, ref_logp=ref, engine_logp=engine, impl=impl, **opts)
    loss.backward()
    return loss.detach(), x.grad, metrics


def check_against_truth(inputs, opts, dtype, impls=("torch", "triton")):
    logp, old, adv, mask, ref, engine = inputs
    t_loss, t_grad = truth_loss(logp, old, adv, mask, ref, engine, opts)
    r_loss, r_grad = truth_loss(logp, old, adv, mask, ref, engine, opts, dtype=compute_dtype(dtype))
    r_grad = r_grad.to(dtype)  # autograd hands back a gradient in the input's dtype
    # The math runs in fp32 (fp64) whatever the input dtype: slack relative to fp32 (fp64) rounding.
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    for impl in impls:
        loss, grad, _ = run(logp, old, adv, mask, ref, engine, opts, impl)
        assert grad.dtype == logp.dtype
        scale = t_grad.abs().max().item() + 1e-30
        assert_close_to_truth(f"{impl} grad", grad, r_grad, t_grad, dtype=dtype, atol=10 * rel * scale)
        # The loss can be far smaller than its terms (they cancel): slack relative to their size too,
        # for which the summed gradient magnitudes stand in (seed 257 of test_dtypes[dapo-fp32]).
        atol = 10 * rel * (t_loss.abs() + t_grad.abs().sum())
        assert_close_to_truth(f"{impl} loss", loss, r_loss, t_loss, dtype=dtype, atol=atol)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_opts(loss_type, T):
    opts = {"loss_type": loss_type}
    if loss_type == "dr_grpo":
        opts["max_completion_length"] = T + 3
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.1  # an absolute cap on the ratio for CISPO: make it bite
    if loss_type == "vespo":
        opts["is_mode"] = "token_truncate"  # vespo folds token-level IS weights into phi
    return opts


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_types_match_truth(seed, loss_type, level, beta):
    B, T = 7, 37
    inputs = make_inputs(B, T)
    opts = {**base_opts(loss_type, T), "importance_sampling_level": level, "beta": beta}
    if loss_type in ("grpo", "dapo", "bnpo", "dr_grpo"):
        opts.update(epsilon_high=0.28, delta=1.35)
    check_against_truth(inputs, opts, torch.float32)


def test_inputs_cover_every_branch(seed):
    """The random inputs above hit both clip sides for both advantage signs and the delta cap, per token
    and per sequence."""
    logp, old, adv, mask, *_ = make_inputs(7, 37)
    r = torch.exp(logp - old)[mask]
    a = adv[:, None].expand_as(mask)[mask]
    m = mask.float()
    r_seq = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1))[m.sum(-1) > 0]
    a_seq = adv[m.sum(-1) > 0]
    for name, hit in {
        "sequence high clip (A>0)": (r_seq > 1.28) & (a_seq > 0),
        "sequence low clip (A<0)": (r_seq < 0.8) & (a_seq < 0),
        "sequence delta cap (A<0)": (r_seq > 1.35) & (a_seq < 0),
        "low clip (A<0)": (r < 0.8) & (a < 0),
        "high clip (A>0)": (r > 1.28) & (a > 0),
        "delta cap (A<0)": (r > 1.35) & (a < 0),
        "inside (A>0)": (r > 0.8) & (r < 1.28) & (a > 0),
        "inside (A<0)": (r > 0.8) & (r < 1.28) & (a < 0),
    }.items():
        assert bool(hit.any()), f"no token in branch {name}"


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_engine_importance_sampling(seed, is_mode, level):
    B, T = 6, 29
    inputs = make_inputs(B, T)
    opts = {"loss_type": "dapo", "importance_sampling_level": level, "is_mode": is_mode, "is_clip_max": 1.3}
    opts["is_clip_min"] = 0.7 if is_mode.endswith("mask") else 0.8
    check_against_truth(inputs, opts, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_dtypes(seed, dtype, loss_type):
    B, T = 5, 23
    inputs = make_inputs(B, T, dtype=dtype)
    opts = {**base_opts(loss_type, T), "beta": 0.1}
    check_against_truth(inputs, opts, dtype)


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_token_advantages_and_single_iteration(seed, loss_type, level):
    """[B, T] advantages; and old_logp=None (ratio 1, TRL's single-iteration shortcut) with engine IS."""
    B, T = 4, 19
    logp, old, adv, mask, ref, engine = make_inputs(B, T, adv_per_token=True)
    opts = {**base_opts(loss_type, T), "importance_sampling_level": level}
    check_against_truth((logp, old, adv, mask, ref, engine), opts, torch.float32)
    check_against_truth(
        (logp, None, adv, mask, ref, engine), {**opts, "is_mode": "token_truncate"}, torch.float32
    )


def test_multiple_blocks_per_row(seed):
    """Rows longer than the kernel's token block (8192 under the interpreter)."""
    *inputs, engine = make_inputs(2, 8200)
    opts = {"loss_type": "grpo", "beta": 0.02, "is_mode": "token_truncate"}
    check_against_truth((*inputs, engine), opts, torch.float32)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dapo_micro_batches_sum_to_full_batch(seed, loss_type, level):
    B, T, k = 9, 17, 3
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    opts = {**base_opts(loss_type, T), "importance_sampling_level": level, "beta": 0.05}
    full_loss, full_grad, _ = run(logp, old, adv, mask, ref, engine, opts, "torch")
    items = int(mask.sum())
    losses, grads = [], []
    for rows in torch.arange(B).chunk(k):
        part = [t[rows] for t in (logp, old, adv, mask, ref, engine)]
        loss, grad, _ = run(*part, {**opts, "num_items_in_batch": items}, "triton")
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(sum(losses), full_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_masked_positions_may_hold_garbage(seed, impl):
    B, T = 4, 13
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    opts = {
        "loss_type": "grpo",
        "beta": 0.1,
        "is_mode": "token_mask",
        "importance_sampling_level": "sequence",
    }
    clean = run(logp, old, adv, mask, ref, engine, opts, impl)
    dirty = [
        t.masked_fill(~mask, v) for t, v in zip((logp, old, ref, engine), (-float("inf"), 0, float("nan"), 5))
    ]
    loss, grad, metrics = run(dirty[0], dirty[1], adv, mask, dirty[2], dirty[3], opts, impl)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    assert bool((grad[~mask] == 0).all()) and bool((grad[1] == 0).all())  # row 1 is all masked
    torch.testing.assert_close(loss, clean[0])
    torch.testing.assert_close(grad, clean[1])
    for key, value in metrics.items():
        torch.testing.assert_close(value, clean[2][key], msg=key)


def test_metrics(seed):
    B, T = 6, 31
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    opts = {
        "loss_type": "bnpo",
        "epsilon_high": 0.28,
        "beta": 0.1,
        "is_mode": "token_truncate",
        "is_clip_max": 1.2,
    }
    m = mask.double()
    mean = lambda x: (x.double() * m).sum() / m.sum()
    for impl in ("torch", "triton"):
        _, _, got = run(logp, old, adv, mask, ref, engine, opts, impl)
        r = torch.exp(logp.double() - old.double())
        a = adv.double()[:, None]
        d = ref.double() - logp.double()
        w = torch.exp(old.double() - engine.double())
        want = {
            "ratio/mean": mean(r),
            "ratio/min": r[mask].min(),
            "ratio/max": r[mask].max(),
            "clip_ratio/low": mean((r < 0.8) & (a < 0)),
            "clip_ratio/high": mean((r > 1.28) & (a > 0)),
            "clip_ratio/region": mean(((r < 0.8) & (a < 0)) | ((r > 1.28) & (a > 0))),
            "kl": mean(torch.exp(d) - d - 1),
            "is_weight/mean": mean(w.clamp(max=1.2)),
            "is_weight/truncated_frac": mean(w > 1.2),
            "is_weight/nan_engine_logp": torch.tensor(0.0, dtype=torch.float64),
        }
        assert set(got) == set(want)
        for key, value in want.items():
            assert not got[key].requires_grad
            torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_no_grad_and_detached_logp(seed):
    logp, old, adv, mask, ref, engine = make_inputs(3, 9)
    with_grad, _, _ = run(logp, old, adv, mask, ref, None, {"beta": 0.1}, "torch")
    for impl in ("torch", "triton"):
        with torch.no_grad():
            loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, impl=impl)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, with_grad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_all_masked_and_empty_batches(seed, impl, loss_type):
    """No completion token at all: loss 0 and gradient 0, never NaN; ratio min/max are NaN (no token)."""
    for B, T in [(3, 6), (0, 6), (3, 0)]:
        logp, old, adv, _, ref, engine = make_inputs(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        opts = {**base_opts(loss_type, max(T, 1)), "beta": 0.1, "importance_sampling_level": "sequence"}
        loss, grad, metrics = run(logp, old, adv, mask, ref, engine, opts, impl)
        assert loss.item() == 0.0 and bool((grad == 0).all())
        assert torch.isnan(metrics.pop("ratio/min")) and torch.isnan(metrics.pop("ratio/max"))
        assert all(bool(v == 0) for v in metrics.values()), metrics


def test_config_object_and_overrides():
    cfg = GRPOLossConfig(loss_type="bnpo", beta=0.1)
    logp, old, adv, mask, ref, _ = make_inputs(3, 5)
    a, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, config=cfg, beta=0.0)
    b, _ = grpo_loss(logp, old, adv, mask, config=GRPOLossConfig(loss_type="bnpo"))
    torch.testing.assert_close(a, b)
    assert cfg.beta == 0.1  # overrides do not mutate the caller's config
    assert sorted(LOSS_TYPES) == sorted(LOSS_TYPE_NAMES)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"loss_type": "ppo"},
            r"loss_type must be one of \['bnpo', 'cispo', 'dapo', 'dr_grpo', 'grpo', 'luspo', 'sapo', "
            r"'vespo'\]",
        ),
        ({"beta": 0.1}, "beta=0.1 > 0 needs ref_logp"),
        ({"loss_type": "dr_grpo"}, "dr_grpo' needs max_completion_length"),
        ({"is_mode": "token"}, "is_mode must be one of"),
        ({"importance_sampling_level": "seq"}, "importance_sampling_level must be one of"),
        ({"epsilon": 0.2}, r"unknown GRPO option\(s\) \['epsilon'\]; valid options are"),
        ({"delta": 1.1}, "delta must be None or > 1 \\+ epsilon_high"),
        ({"epsilon_low": 1.5}, "epsilon_low must lie in"),
        ({"num_items_in_batch": 0}, "num_items_in_batch must be"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_options(kwargs, match):
    logp, old, adv, mask, _, _ = make_inputs(2, 4)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, old, adv, mask, **kwargs)


def test_bad_shapes():
    logp, old, adv, mask, ref, _ = make_inputs(3, 5)
    cases = [
        ((logp, old[:, :4], adv, mask), {}, "old_logp must have the \\[B, T\\] shape \\(3, 5\\)"),
        ((logp, old, adv[:2], mask), {}, "advantages must have shape \\[B\\] = \\(3,\\)"),
        ((logp, old, adv, mask[:, :4]), {}, "mask must be a tensor of the \\[B, T\\] shape"),
        ((logp, old, adv, mask), {"ref_logp": ref.T}, "ref_logp must have the \\[B, T\\] shape"),
        ((logp[0], old, adv, mask), {}, "logp must have shape \\[B, T\\]"),
        ((logp.long(), old, adv, mask), {}, "logp must be a floating-point tensor"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            grpo_loss(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_triton_matches_truth(seed, loss_type, level):
    torch.set_default_device("cuda")
    try:
        inputs = make_inputs(64, 1500, dtype=torch.bfloat16)
        opts = {**base_opts(loss_type, 1500), "importance_sampling_level": level, "beta": 0.04}
        opts["is_mode"] = "token_truncate"
        check_against_truth(inputs, opts, torch.bfloat16, impls=("triton", "auto"))
    finally:
        torch.set_default_device("cpu")
