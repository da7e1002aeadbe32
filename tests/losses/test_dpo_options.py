"""The TRL-1.16 DPO options against float64 closed forms written here (elementary ops, autograd for the
gradients): sft, sigmoid_norm, the f-divergence scores, WPO weights, several loss types with weights; in
``dpo_loss`` and in ``FusedLinearDPOLoss`` (materialised logits, ``sum_v p_v^2`` taken literally)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastrl.losses.dpo as dpo_mod
from fastrl.losses.dpo import dpo_loss, ld_token_weights, wpo_weights
from fastrl.losses.fused_dpo import FusedLinearDPOLoss
from tests.helpers import assert_close_to_truth
from tests.losses.test_dpo import formula, logsig, make_inputs
from tests.losses.test_fused_dpo import IGNORE, make_case

BETA = 0.3


def score(u, kind, alpha):
    """f'(e^u) written from the f-DPO paper's table (arXiv:2309.16240)."""
    t = torch.exp(u)
    if kind == "reverse_kl":
        return torch.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)  # alpha_divergence


def closed_form(
    types, weights, pc, pr, rc, rr, *, nc, nr, sft_c, omega, kind="reverse_kl", alpha=0.5, ls=0.0
):
    """sum_k w_k mean_p omega_p L_k, the scores f'(e^u) in place of the log-ratios u."""
    sc, sr = score(pc - rc, kind, alpha), score(pr - rr, kind, alpha)
    total = 0.0
    for t, w in zip(types, weights):
        if t == "sft":
            per = (-sft_c.sum() / nc.sum()).expand(pc.shape)
        elif t == "sigmoid_norm":
            per = -logsig(BETA * (sc / nc - sr / nr))
        elif t == "ipo":
            per = (sc / nc - sr / nr - 1 / (2 * BETA)) ** 2
        elif t == "hinge":
            per = torch.clamp(1 - BETA * (sc - sr), min=0)
        elif t == "sigmoid":
            z = BETA * (sc - sr)
            per = -(1 - ls) * logsig(z) - ls * logsig(-z)
        else:  # the reverse-KL formulas of test_dpo
            assert kind == "reverse_kl"
            per = formula(t, pc, pr, rc, rr, beta=BETA, ls=ls, opts={})
        total = total + w * (omega * per).mean()
    return total


def lengths(P):
    return torch.randint(1, 30, (P,)), torch.randint(1, 30, (P,))


CASES = [
    (["sft"], None, "reverse_kl"),
    (["sigmoid_norm"], None, "reverse_kl"),
    (["sigmoid", "sft"], [1.0, 0.3], "reverse_kl"),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "reverse_kl"),  # MPO's mix
    (["sigmoid"], None, "forward_kl"),
    (["hinge"], None, "js_divergence"),
    (["ipo", "sft"], [1.0, 0.5], "alpha_divergence"),
    (["sigmoid_norm"], None, "forward_kl"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("types, weights, kind", CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "wpo"])
def test_dpo_loss_matches_closed_form(seed, dtype, types, weights, kind, weighted):
    P = 6
    x64 = [t.to(dtype).double() for t in make_inputs(P, scale=0.3)]
    nc, nr = lengths(P)
    sft64 = (x64[0] + 0.5 * torch.randn(P, dtype=torch.float64)).to(dtype).double()
    omega = (
        (0.2 + torch.rand(P, dtype=torch.float64)).to(dtype).double() if weighted else torch.ones(P).double()
    )
    kw = dict(
        beta=BETA, loss_type=types, loss_weights=weights, f_divergence_type=kind, f_alpha_divergence_coef=0.6
    )
    if set(types) & {"ipo", "sigmoid_norm", "sft"}:
        kw.update(chosen_lengths=nc, rejected_lengths=nr)
    if "sft" in types:
        kw["sft_chosen_logps"] = sft64.to(dtype).requires_grad_()
    if weighted:
        kw["pair_weights"] = omega.to(dtype)
    xs = [t.to(dtype).requires_grad_() for t in x64]
    loss, _ = dpo_loss(*xs, **kw)
    wrt = xs + ([kw["sft_chosen_logps"]] if "sft" in types else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    outs = []
    for dt in (torch.float64, dtype):  # truth, and the closed form at the input dtype (PyTorch's error)
        xt = [t.to(dt).requires_grad_() for t in x64]
        st = sft64.to(dt).requires_grad_()
        ct = closed_form(
            types, weights or [1.0] * len(types), *xt, nc=nc.to(dt), nr=nr.to(dt), sft_c=st,
            omega=omega.to(dt), kind=kind, alpha=0.6,
        )  # fmt: skip
        tw = xt + ([st] if "sft" in types else [])
        outs.append((ct, torch.autograd.grad(ct, tw, allow_unused=True)))
    (t_loss, t_grads), (r_loss, r_grads) = outs
    assert_close_to_truth("loss", loss, r_loss, t_loss, dtype=dtype)
    for i, (g, rg, tg) in enumerate(zip(grads, r_grads, t_grads)):
        zero = lambda v: torch.zeros(P, dtype=dtype) if v is None else v  # noqa: E731
        assert_close_to_truth(f"grad {i}", zero(g), zero(rg), zero(tg), dtype=dtype)


def test_alpha_divergence_limit_and_one(seed):
    """α = 1 is the reverse KL; every f-divergence is the reverse KL to first order at u = 0 (f'(1) = 0,
    f''(1) = 1), so tiny log-ratios give DPO's loss."""
    x = make_inputs(5, scale=0.3)
    base, _ = dpo_loss(*x, beta=BETA)
    one, _ = dpo_loss(*x, beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    torch.testing.assert_close(one, base, rtol=0, atol=0)
    tiny = [
        x[2] + 1e-5 * torch.randn(5, dtype=torch.float64),
        x[3] + 1e-5 * torch.randn(5, dtype=torch.float64),
    ]
    tiny = [tiny[0], tiny[1], x[2], x[3]]
    want, _ = dpo_loss(*tiny, beta=BETA)
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        got, _ = dpo_loss(*tiny, beta=BETA, f_divergence_type=kind)
        scale = 0.5 if kind == "js_divergence" else 1.0  # log(2t/(1+t)) ~ u/2
        if kind == "js_divergence":
            want_js, _ = dpo_loss(*[tiny[0], tiny[1], tiny[2], tiny[3]], beta=BETA * scale)
            torch.testing.assert_close(got, want_js, rtol=1e-8, atol=1e-9)
        else:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_wpo_weights_formula(seed):
    P, T, V = 3, 7, 11
    logits = torch.randn(P, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (P, T))
    mask = torch.rand(P, T) > 0.3
    mask[0] = False  # an empty completion: weight exp(0) = 1
    p = torch.softmax(logits, -1)
    logp = torch.log(p.gather(-1, labels[..., None])[..., 0])
    lss = torch.log((p**2).sum(-1))
    garbage = torch.where(mask, logp, float("nan"))  # positions outside the mask never read
    got = wpo_weights(garbage, lss, mask, logp, lss, mask)
    m = mask.double()
    v = torch.exp(((logp - lss) * m).sum(1) / m.sum(1).clamp(min=1))
    torch.testing.assert_close(got, v * v, rtol=1e-12, atol=0)
    assert got[0] == 1.0


def fused_truth(case, yc, yr, *, types, weights, kind, ld_alpha, use_weighting, temperature, dtype):
    """The fused module's loss in ``dtype`` from materialised logits; WPO's sum_v p^2 taken literally."""
    names = ["hidden_chosen", "hidden_rejected", "weight", "bias"]
    x = {n: case[n].to(dtype).requires_grad_() for n in names}
    seqs, plain, extra = [], None, []
    for h, y, other in ((x["hidden_chosen"], yc, yr), (x["hidden_rejected"], yr, yc)):
        z = (h @ x["weight"].T + x["bias"]) / temperature
        p = torch.softmax(z, -1)
        valid = y != IGNORE
        lp = torch.where(valid, torch.log(p.gather(-1, y.clamp(min=0)[..., None])[..., 0]), 0.0)
        shared = torch.minimum(valid.sum(1), (other != IGNORE).sum(1))[:, None]
        k = torch.cumsum(valid, 1)
        a = 1.0 if ld_alpha is None else ld_alpha
        # (torch.where of Python floats would be fp32: alpha rounded, the very bug ld_token_weights had)
        seqs.append((lp * torch.where(k <= shared, 1.0, torch.tensor(a, dtype=dtype)) * valid).sum(1))
        plain = lp.sum(1) if plain is None else plain
        with torch.no_grad():
            n = valid.sum(1).clamp(min=1)
            extra.append(torch.exp(((lp - torch.log((p**2).sum(-1))) * valid).sum(1) / n))
    with torch.no_grad():
        refs = []
        for h, y in ((case["ref_hidden_chosen"], yc), (case["ref_hidden_rejected"], yr)):
            z = (h.to(dtype) @ case["weight"].to(dtype).T + case["bias"].to(dtype)) / temperature
            lp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
            valid = y != IGNORE
            other = yr if y is yc else yc
            shared = torch.minimum(valid.sum(1), (other != IGNORE).sum(1))[:, None]
            a = 1.0 if ld_alpha is None else ld_alpha
            w = torch.where(torch.cumsum(valid, 1) <= shared, 1.0, torch.tensor(a, dtype=dtype))
            refs.append((lp * w * valid).sum(1))
    omega = extra[0] * extra[1] if use_weighting else torch.ones_like(plain)
    nc, nr = (yc != IGNORE).sum(1).to(dtype), (yr != IGNORE).sum(1).to(dtype)
    loss = closed_form(
        types, weights or [1.0] * len(types), seqs[0], seqs[1], refs[0], refs[1], nc=nc, nr=nr, sft_c=plain,
        omega=omega, kind=kind, alpha=0.6,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [x[n] for n in names], allow_unused=True)
    return loss.detach(), [torch.zeros_like(x[n]) if g is None else g for g, n in zip(grads, names)]


FUSED_CASES = [
    (["sigmoid", "sft"], [1.0, 0.4], "reverse_kl", 0.5, False),
    (["sft"], None, "reverse_kl", 0.3, True),
    (["sigmoid_norm"], None, "js_divergence", None, True),
    (["sigmoid"], None, "forward_kl", 0.6, True),
    (["ipo", "sft"], [1.0, 0.2], "alpha_divergence", None, False),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "reverse_kl", None, True),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("types, weights, kind, ld_alpha, use_weighting", FUSED_CASES)
def test_fused_matches_closed_form(seed, impl, types, weights, kind, ld_alpha, use_weighting):
    """torch: fp64 inputs; triton (interpreted, fp32 only): within PyTorch's fp32 error of fp64."""
    dtype = torch.float64 if impl == "torch" else torch.float32
    case, yc, yr = make_case(torch.float64, P=3, Tc=7, Tr=5, H=16, V=23)
    case = {k: v.to(dtype) for k, v in case.items()}
    opts = dict(types=types, weights=weights, kind=kind, ld_alpha=ld_alpha, use_weighting=use_weighting)
    t_loss, t_grads = fused_truth(case, yc, yr, **opts, temperature=0.8, dtype=torch.float64)
    r_loss, r_grads = fused_truth(case, yc, yr, **opts, temperature=0.8, dtype=dtype)
    module = FusedLinearDPOLoss(
        beta=BETA, loss_type=types, loss_weights=weights, f_divergence_type=kind, f_alpha_divergence_coef=0.6,
        ld_alpha=ld_alpha, use_weighting=use_weighting, temperature=0.8, impl=impl, chunk_size=4,
    )  # fmt: skip
    x = {n: case[n].clone().requires_grad_() for n in ("hidden_chosen", "hidden_rejected", "weight", "bias")}
    loss, metrics = module(
        x["hidden_chosen"], x["hidden_rejected"], x["weight"], yc, yr, bias=x["bias"],
        ref_hidden_chosen=case["ref_hidden_chosen"], ref_hidden_rejected=case["ref_hidden_rejected"],
    )  # fmt: skip
    grads = torch.autograd.grad(loss, list(x.values()), allow_unused=True)
    assert_close_to_truth("loss", loss, r_loss, t_loss, dtype=dtype)
    for name, g, rg, tg in zip(x, grads, r_grads, t_grads):
        g = torch.zeros_like(x[name]) if g is None else g
        assert_close_to_truth(f"d/{name}", g, rg, tg, dtype=dtype)
    assert ("pair_weights/mean" in metrics) == use_weighting


def test_cdpo_label_smoothing_warns_once(monkeypatch):
    monkeypatch.setattr(dpo_mod, "_warned_cdpo", False)
    x = [torch.randn(3) for _ in range(4)]
    with pytest.warns(UserWarning, match="TRL >= 0.29 ignores label_smoothing"):
        dpo_loss(*x, label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dpo_loss(*x, label_smoothing=0.1)  # once per process
        dpo_loss(*x, loss_type="robust", label_smoothing=0.1)


def test_ld_token_weights_keep_the_input_dtype():
    mask = torch.tensor([[True, True, True, False]])
    other = torch.tensor([[True, False]])
    w = ld_token_weights(mask, other, 0.1, dtype=torch.float64)
    assert w.dtype == torch.float64 and w[0, 1].item() == 0.1  # not fp32's 0.10000000149...
    assert w.tolist() == [[1.0, 0.1, 0.1, 0.0]]
    assert math.isclose(ld_token_weights(mask, other, 0.1)[0, 1].item(), 0.1, rel_tol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "sft"}, "loss_type='sft' needs chosen_lengths"),
        ({"loss_type": "sigmoid_norm", "chosen_lengths": torch.ones(3)}, "needs rejected_lengths"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, "non-empty list of distinct names"),
        ({"loss_type": []}, "non-empty list of distinct names"),
        ({"loss_type": ["sigmoid", "sppo"]}, "loss_type must be one of"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "loss_weights must be a list of 2"),
        ({"f_divergence_type": "kl"}, "f_divergence_type must be one of"),
        ({"f_divergence_type": "forward_kl", "loss_type": "apo_zero"}, "applies only to loss types"),
        ({"loss_type": "aot", "pair_weights": torch.ones(3)}, "pair_weights do not apply to aot"),
        ({"pair_weights": torch.ones(2)}, r"pair_weights must have shape \[P\] = \(3,\)"),
        (
            {"loss_type": ["hinge", "ipo"], "label_smoothing": 0.1},
            "no effect with loss_type=\\['hinge', 'ipo'\\]",
        ),
    ],
)
def test_bad_options(kwargs, match):
    x = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        dpo_loss(*x, **kwargs)


def test_fused_bad_options():
    with pytest.raises(ValueError, match="use_weighting does not apply to aot"):
        FusedLinearDPOLoss(loss_type="aot", use_weighting=True)
    with pytest.raises(ValueError, match="taken from the labels"):
        FusedLinearDPOLoss(loss_type="sft", chosen_lengths=torch.ones(2))
    with pytest.raises(ValueError, match="use_weighting must be a bool"):
        FusedLinearDPOLoss(use_weighting=1)
