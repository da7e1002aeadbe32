"""grpo_loss's TRL-1.16 options against the float64 truth of ``test_grpo`` (TRL's formulas, autograd):
luspo, vespo, the KL bias correction, the off-policy sequence mask, the entropy quantile mask, the entropy
bonus and NaN engine log-probs; torch and Triton (interpreted) paths, loss and both gradients."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses.grpo import grpo_loss
from tests.helpers import assert_close_to_truth
from tests.losses.test_grpo import base_opts, check_against_truth, make_inputs, truth_loss

B, T = 7, 37


def tied_entropy(mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Random entropies, with the valid tokens ranked next to the (1 - rho) quantile set equal: the threshold
    then sits on a tie (>= 2 tokens exactly at it, kept by the inclusive boundary) with some tokens below."""
    h = 3.0 * torch.rand(mask.shape, dtype=torch.float64)
    vals = h[mask]
    order = vals.argsort()
    k = (1.0 - rho) * (vals.numel() - 1)
    lo, hi = max(int(k) - 1, 0), min(int(k) + 2, vals.numel() - 1)
    vals[order[lo : hi + 1]] = vals[order[lo]].item()
    h[mask] = vals
    return h


def run_with_entropy(inputs, entropy, opts, impl, dtype=torch.float32):
    logp, old, adv, mask, ref, engine = inputs
    x = logp.detach().clone().requires_grad_(True)
    h = entropy.detach().to(dtype).clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        x, old, adv, mask, ref_logp=ref, engine_logp=engine, entropy=h, impl=impl, **opts
    )
    loss.backward()
    # The quantile mask alone is not differentiable in the entropy: no gradient then.
    return loss.detach(), x.grad, torch.zeros_like(h) if h.grad is None else h.grad, metrics


def check_entropy_case(inputs, entropy, opts):
    logp, old, adv, mask, ref, engine = inputs
    t_loss, t_grad, t_hgrad = truth_loss(logp, old, adv, mask, ref, engine, opts, entropy=entropy)
    r_loss, r_grad, r_hgrad = truth_loss(
        logp, old, adv, mask, ref, engine, opts, dtype=torch.float32, entropy=entropy
    )
    for impl in ("torch", "triton"):
        loss, grad, hgrad, _ = run_with_entropy(inputs, entropy, opts, impl)
        scale = t_grad.abs().max().item() + 1e-30
        assert_close_to_truth(f"{impl} grad", grad, r_grad, t_grad, dtype=torch.float32, atol=1e-5 * scale)
        assert_close_to_truth(f"{impl} dH", hgrad, r_hgrad, t_hgrad, dtype=torch.float32, atol=1e-7)
        # a few fp32 ulps of the summed terms (the loss can be much smaller than they are)
        atol = 1e-5 * abs(t_loss) + 1e-6 * t_grad.abs().sum()
        assert_close_to_truth(f"{impl} loss", loss, r_loss, t_loss, dtype=torch.float32, atol=atol)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("old_given", [True, False])
def test_kl_bias_correction(seed, level, old_given):
    """beta * exp(l - o) * K with the token ratio at both levels (on-policy too: the ratio's gradient)."""
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    old = old if old_given else None
    for bc in (True, False):
        opts = {
            "loss_type": "grpo",
            "beta": 0.3,
            "importance_sampling_level": level,
            "use_bias_correction_kl": bc,
        }
        opts["is_mode"] = "token_truncate"
        check_against_truth((logp, old, adv, mask, ref, engine), opts, torch.float32)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_luspo(seed, level):
    inputs = make_inputs(B, T)
    opts = {"loss_type": "luspo", "importance_sampling_level": level, "beta": 0.04, "epsilon_high": 0.28}
    check_against_truth(inputs, opts, torch.float32)


@pytest.mark.parametrize("is_mode", ["token_truncate", "token_mask", None])
def test_vespo(seed, is_mode):
    """Gamma weights of both advantage signs, ratios on both sides of 1, with and without engine IS."""
    logp, old, adv, mask, ref, engine = make_inputs(B, T, spread=0.05)
    opts = {**base_opts("vespo", T), "beta": 0.04, "vespo_k_neg": 2.5, "vespo_lambda_pos": 2.5}
    if is_mode is None:
        engine = None
    else:
        opts.update(is_mode=is_mode, is_clip_min=0.9, is_clip_max=1.1)
    check_against_truth((logp, old, adv, mask, ref, engine), opts, torch.float32)
    _, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref, engine_logp=engine, **opts)
    if is_mode != "token_mask":  # (masked tokens push log w to its floor: phi ~ 0 there)
        assert 1e-3 < metrics["vespo/phi_mean"] < 1.0  # phi is 1 at w = 1 only: the weights vary
    # old_logp=None: only the engine IS weights enter phi
    check_against_truth((logp, None, adv, mask, ref, engine), opts, torch.float32)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("with_engine", [True, False])
def test_off_policy_mask(seed, level, with_engine):
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    engine = engine if with_engine else None
    opts = {"loss_type": "dapo", "importance_sampling_level": level, "off_policy_mask_threshold": 0.1}
    opts.update(beta=0.04, is_mode="token_truncate")
    # the inputs have negative-advantage sequences on both sides of the threshold
    s = (engine if with_engine else old).double()
    m = mask.double()
    mean_kl = ((s - logp.double()) * m).sum(-1) / m.sum(-1).clamp(min=1)
    neg = (adv < 0) & (m.sum(-1) > 0)
    assert bool((neg & (mean_kl > 0.1)).any()) and bool((neg & (mean_kl <= 0.1)).any())
    check_against_truth((logp, old, adv, mask, ref, engine), opts, torch.float32)
    _, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref, engine_logp=engine, **opts)
    dropped = (neg & (mean_kl > 0.1)).double()[:, None].expand_as(m)
    torch.testing.assert_close(metrics["off_policy_mask/masked_frac"].double(), (dropped * m).sum() / m.sum())


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_top_entropy_quantile(seed, rho, loss_type, level):
    inputs = make_inputs(B, T)
    mask = inputs[3]
    entropy = tied_entropy(mask, rho)
    thr = torch.quantile(entropy[mask], 1 - rho)
    if rho < 1:  # the threshold sits on a tie: tokens exactly at it are kept, some below it dropped
        assert bool((entropy[mask] == thr).sum() >= 2) and bool((entropy[mask] < thr).any())
    opts = {**base_opts(loss_type, T), "importance_sampling_level": level, "top_entropy_quantile": rho}
    opts.update(beta=0.04, is_mode="token_truncate")
    check_entropy_case(inputs, entropy, opts)
    _, _, _, metrics = run_with_entropy(inputs, entropy, opts, "torch")
    m = mask.double()
    kept = ((entropy >= thr) & mask).double()
    torch.testing.assert_close(metrics["entropy_mask/kept_frac"].double(), (kept * m).sum() / m.sum())


@pytest.mark.parametrize("rho", [1.0, 0.3])
@pytest.mark.parametrize("loss_type", ["bnpo", "cispo", "vespo"])
def test_entropy_bonus(seed, rho, loss_type):
    """loss - coef * mean entropy over the trained tokens: gradient -coef * e / sum(e) to the entropy."""
    inputs = make_inputs(B, T)
    entropy = 2.0 * torch.rand(B, T, dtype=torch.float64)
    opts = {**base_opts(loss_type, T), "entropy_coef": 0.07, "top_entropy_quantile": rho, "beta": 0.02}
    check_entropy_case(inputs, entropy, opts)


@pytest.mark.parametrize("is_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_nan_engine_logprobs_are_neutral_and_counted(seed, is_mode):
    """A NaN engine log-prob on a valid token: IS weight 1 there (TRL's nan_to_num on the log-ratio)."""
    logp, old, adv, mask, ref, engine = make_inputs(B, T)
    holes = mask & (torch.rand(B, T) < 0.2)
    holes[0, 0] = mask[0, 0]
    engine = engine.masked_fill(holes, float("nan")).masked_fill(
        ~mask & (torch.rand(B, T) < 0.5), float("nan")
    )
    opts = {"loss_type": "bnpo", "is_mode": is_mode, "is_clip_max": 1.3, "is_clip_min": 0.75, "beta": 0.04}
    check_against_truth((logp, old, adv, mask, ref, engine), opts, torch.float32)
    for impl in ("torch", "triton"):
        loss, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref, engine_logp=engine, impl=impl, **opts)
        assert torch.isfinite(loss)
        assert metrics["is_weight/nan_engine_logp"].item() == int(holes.sum())  # masked NaNs not counted
    # a token-level weight there is exactly 1
    x = logp.clone().requires_grad_(True)
    kw = dict(ref_logp=ref, **opts)
    g_nan = torch.autograd.grad(grpo_loss(x, old, adv, mask, engine_logp=engine, **kw)[0], x)[0]
    fixed = torch.where(holes, old, engine)  # engine = old there: weight exp(0) = 1
    g_one = torch.autograd.grad(grpo_loss(x, old, adv, mask, engine_logp=fixed, **kw)[0], x)[0]
    torch.testing.assert_close(g_nan, g_one, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_entropy_quantile": 0.5}, "need entropy"),
        ({"entropy_coef": 0.1}, "need entropy"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must lie in"),
        ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold must be"),
        ({"use_bias_correction_kl": 1}, "use_bias_correction_kl must be a bool"),
        ({"vespo_k_pos": -1.0}, "vespo_k_pos must be"),
        ({"loss_type": "vespo", "is_mode": "sequence_mask"}, "vespo' folds token-level"),
    ],
)
def test_bad_new_options(kwargs, match):
    logp, old, adv, mask, _, engine = make_inputs(2, 4)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, old, adv, mask, engine_logp=engine, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [
        {"loss_type": "luspo", "importance_sampling_level": "sequence", "beta": 0.04},
        {"loss_type": "vespo", "is_mode": "token_truncate", "beta": 0.04},
        {"loss_type": "dapo", "off_policy_mask_threshold": 0.1, "beta": 0.04, "is_mode": "token_truncate"},
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.3},
    ],
)
def test_gpu_triton_new_options(seed, opts):
    torch.set_default_device("cuda")
    try:
        inputs = make_inputs(64, 1500, dtype=torch.bfloat16)
        check_against_truth(inputs, opts, torch.bfloat16, impls=("triton", "auto"))
    finally:
        torch.set_default_device("cpu")


@pytest.mark.gpu
def test_gpu_triton_entropy_options(seed):
    torch.set_default_device("cuda")
    try:
        inputs = make_inputs(32, 700)
        entropy = tied_entropy(inputs[3], 0.2)
        check_entropy_case(
            inputs, entropy, {"loss_type": "dapo", "top_entropy_quantile": 0.2, "entropy_coef": 0.1}
        )
    finally:
        torch.set_default_device("cpu")
