"""dpo_loss (every loss_type) and LD-DPO sequence sums against float64 formulas written out here.

The formulas below are written independently of fastrl/losses/dpo_losses.py, from the papers and TRL's
``DPOTrainer`` semantics, with elementary operations only (exp / log / log1p), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.losses.dpo import DPO_LOSSES, BCORunningMean, dpo_loss, ld_sequence_logps, register_dpo_loss
from tests.helpers import assert_close_to_truth

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def logsig(x):
    # log σ(x) = -softplus(-x): stable for either sign of x, with the right derivative everywhere (0.5 at
    # x = 0, hit when bf16 rounds policy and reference equal). Not torch.where over two branches: its untaken
    # branch (e^{-x} overflowing) still sends a NaN into the gradient.
    return -torch.nn.functional.softplus(-x)


def sig(x):
    return torch.exp(logsig(x))


def formula(loss_type, pc, pr, rc, rr, *, beta, ls, opts):
    """Per-pair loss from the paper / TRL, in whatever dtype the inputs have."""
    b, e = beta, ls
    c, r = pc - rc, pr - rr
    d = c - r
    if loss_type == "sigmoid":  # DPO Eq. 7 + cDPO
        return -(1 - e) * logsig(b * d) - e * logsig(-b * d)
    if loss_type == "hinge":  # SLiC
        return torch.clamp(1 - b * d, min=0)
    if loss_type == "ipo":  # IPO Eq. 17, TRL divides by completion lengths
        if opts.get("chosen_lengths") is not None:
            c = c / opts["chosen_lengths"].to(c.dtype)
            r = r / opts["rejected_lengths"].to(r.dtype)
        return (c - r - 1 / (2 * b)) ** 2
    if loss_type == "robust":  # rDPO
        return (-(1 - e) * logsig(b * d) + e * logsig(-b * d)) / (1 - 2 * e)
    if loss_type == "exo_pair":  # EXO: KL(p_θ || (1-e, e)) over the pair
        p_w, p_l = sig(b * d), sig(-b * d)
        return p_w * (torch.log(p_w) - math.log(1 - e)) + p_l * (torch.log(p_l) - math.log(e))
    if loss_type == "nca_pair":
        return -logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r)
    if loss_type == "bco_pair":
        delta = opts.get("delta", 0.0)
        return -logsig(b * c - delta) - logsig(delta - b * r)
    if loss_type == "sppo_hard":
        return (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2
    if loss_type == "aot":  # sort the policy and reference log-ratios separately, then cDPO
        z = b * (torch.sort(pc - pr).values - torch.sort(rc - rr).values)
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if loss_type == "aot_unpaired":
        z = b * (torch.sort(c).values - torch.sort(r).values)
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if loss_type == "apo_zero":
        return 1 - sig(b * c) + sig(b * r)
    if loss_type == "apo_down":
        return sig(b * c) + 1 - sig(b * d)
    if loss_type == "discopop":
        z = b * d
        m = sig(z / opts.get("discopop_tau", 0.05))
        return (1 - m) * -logsig(z) + m * torch.exp(-z)
    raise AssertionError(loss_type)


# (loss_type, label_smoothing): every type, and the smoothing ones also with ε > 0.
# (sft and sigmoid_norm need completion lengths: tests/losses/test_dpo_options.py.)
CASES = [(k, 0.0) for k in sorted(DPO_LOSSES) if k not in ("exo_pair", "sft", "sigmoid_norm")] + [
    ("sigmoid", 0.15),
    ("robust", 0.2),
    ("exo_pair", 1e-3),
    ("exo_pair", 0.3),
    ("aot", 0.1),
    ("aot_unpaired", 0.25),
]


def make_inputs(P, *, scale=1.0):
    """Sequence log-prob sums of realistic size, the policy near the reference so b*d is of order 1."""
    ref_c, ref_r = (
        -40 + 8 * torch.randn(P, dtype=torch.float64),
        -40 + 8 * torch.randn(P, dtype=torch.float64),
    )
    pol_c = ref_c + scale * 4 * torch.randn(P, dtype=torch.float64)
    pol_r = ref_r + scale * 4 * torch.randn(P, dtype=torch.float64)
    return [pol_c, pol_r, ref_c, ref_r]


def check_against_formula(loss_type, ls, dtype, *, P=7, beta=0.3, opts=None, truth_opts=None):
    opts, truth_opts = opts or {}, truth_opts if truth_opts is not None else (opts or {})
    x64 = [t.to(dtype).double() for t in make_inputs(P)]  # the rounded inputs, exactly, in float64
    xs = [t.to(dtype).requires_grad_() for t in x64]
    loss, _ = dpo_loss(*xs, beta=beta, loss_type=loss_type, label_smoothing=ls, **opts)
    grads = torch.autograd.grad(loss, xs)

    x_ref = [t.to(dtype).requires_grad_() for t in x64]  # the formula evaluated in the input dtype
    ref = formula(loss_type, *x_ref, beta=beta, ls=ls, opts=truth_opts).mean()
    ref_grads = torch.autograd.grad(ref, x_ref)
    x_true = [t.clone().requires_grad_() for t in x64]
    truth = formula(loss_type, *x_true, beta=beta, ls=ls, opts=truth_opts).mean()
    true_grads = torch.autograd.grad(truth, x_true)

    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert_close_to_truth(f"{loss_type} loss", loss, ref, truth, dtype=dtype)
    names = ["d/chosen", "d/rejected", "d/ref_chosen", "d/ref_rejected"]
    for name, g, rg, tg in zip(names, grads, ref_grads, true_grads):
        assert g.dtype == dtype
        assert_close_to_truth(f"{loss_type} {name}", g, rg, tg, dtype=dtype)
    return truth


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type,ls", CASES)
def test_loss_type_matches_float64_formula(seed, loss_type, ls, dtype):
    truth = check_against_formula(loss_type, ls, dtype)
    assert torch.isfinite(truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ipo_with_completion_lengths(seed, dtype):
    P = 5
    lengths = {"chosen_lengths": torch.randint(1, 40, (P,)), "rejected_lengths": torch.randint(1, 40, (P,))}
    check_against_formula("ipo", 0.0, dtype, P=P, opts=lengths)


@pytest.mark.parametrize("tau", [0.05, 0.7])
def test_discopop_tau(seed, tau):
    check_against_formula("discopop", 0.0, torch.float64, opts={"discopop_tau": tau})


def test_bco_pair_running_mean(seed):
    """δ is the mean over calls of each batch's mean reward [b c, b r]; the state is updated per call."""
    beta, state = 0.3, BCORunningMean()
    batch_means = []
    for P in (4, 7, 3):
        x = make_inputs(P)
        c, r = x[0] - x[2], x[1] - x[3]
        batch_means.append(torch.cat([beta * c, beta * r]).mean().item())
        delta = sum(batch_means) / len(batch_means)
        xs = [t.clone().requires_grad_() for t in x]
        loss, _ = dpo_loss(*xs, beta=beta, loss_type="bco_pair", bco_state=state)
        grads = torch.autograd.grad(loss, xs)
        xt = [t.clone().requires_grad_() for t in x]
        truth = formula("bco_pair", *xt, beta=beta, ls=0.0, opts={"delta": delta}).mean()
        true_grads = torch.autograd.grad(truth, xt)  # δ is a statistic: no gradient flows through it
        assert_close_to_truth("bco loss", loss, truth, truth, dtype=torch.float64)
        for g, tg in zip(grads, true_grads):
            assert_close_to_truth("bco grad", g, tg, tg, dtype=torch.float64)
        assert state.count == len(batch_means) and state.mean == pytest.approx(delta, rel=1e-12)


def test_metrics(seed):
    beta = 0.25
    x = make_inputs(9)
    _, m = dpo_loss(*[t.float().requires_grad_() for t in x], beta=beta)
    cr, rr = beta * (x[0] - x[2]), beta * (x[1] - x[3])
    want = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": x[0].mean(),
        "logps/rejected": x[1].mean(),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        assert not m[k].requires_grad, k
        torch.testing.assert_close(m[k].double(), v, rtol=1e-5, atol=1e-5, msg=k)


def test_registry_decorator_adds_a_loss_type(seed):
    @register_dpo_loss("test_square_margin")
    def _square(t):
        return (t.beta * t.margin) ** 2

    try:
        x = make_inputs(4)
        loss, _ = dpo_loss(*x, beta=0.5, loss_type="test_square_margin")
        d = (x[0] - x[2]) - (x[1] - x[3])
        torch.testing.assert_close(loss, ((0.5 * d) ** 2).mean())
    finally:
        del DPO_LOSSES["test_square_margin"]


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "kto"}, r"loss_type must be one of \[.*'sigmoid'.*\], got 'kto'"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": -0.1}, "beta must be"),
        ({"beta": float("nan")}, "beta must be"),
        ({"label_smoothing": 0.5}, "label_smoothing must lie in"),
        ({"label_smoothing": -0.1}, "label_smoothing must lie in"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect with loss_type='hinge'"),
        ({"loss_type": "exo_pair"}, "must be > 0 for loss_type='exo_pair'"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be"),
        ({"discopop_tau": 0.1}, r"unknown option\(s\) \['discopop_tau'\] for loss_type='sigmoid'"),
        ({"loss_type": "bco_pair", "bco_state": 0.5}, "bco_state must be"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(3)}, "given together"),
        (
            {"loss_type": "ipo", "chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2)},
            r"chosen_lengths must be a tensor of shape \[P\]",
        ),
    ],
)
def test_bad_options(kwargs, match):
    x = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        dpo_loss(*x, **kwargs)


@pytest.mark.parametrize(
    "shapes,name",
    [
        ([(3,), (4,), (3,), (3,)], "rejected_logps"),
        ([(3,), (3,), (3,), (2,)], "ref_rejected_logps"),
        ([(3, 1), (3, 1), (3, 1), (3, 1)], "chosen_logps"),
        ([(3,), (3,), (3, 2), (3,)], "ref_chosen_logps"),
    ],
)
def test_mismatched_shapes(shapes, name):
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        dpo_loss(*[torch.randn(s) for s in shapes])


def test_integer_logps_rejected():
    with pytest.raises(ValueError, match="chosen_logps must be a floating-point"):
        dpo_loss(torch.ones(3, dtype=torch.long), *[torch.randn(3) for _ in range(3)])


# ---------------------------------------------------------------------------------------------------------
# LD-DPO
# ---------------------------------------------------------------------------------------------------------

X = float("nan")  # prompt/padding positions hold junk (nan, big values): they must not leak into sums


def hand_example():
    """Two pairs, chosen T=7 and rejected T=6, a non-empty prompt in every row.

    pair 0, right padding:   chosen   [P P c c c c _]   completion log-probs -1, -2, -3, -4   (|y_w| = 4)
                             rejected [P P r r _ _]     completion log-probs -0.5, -1.5       (|y_l| = 2)
    pair 1, left padding:    chosen   [_ _ _ P c c c]   completion log-probs -0.25, -0.5, -1  (|y_w| = 3)
                             rejected [_ P r r r r]     completion log-probs -2, -1, -4, -8   (|y_l| = 4)
    (P prompt, _ padding.)  Shared lengths: l_0 = min(4, 2) = 2, l_1 = min(3, 4) = 3.
    """
    chosen = torch.tensor([[-7.0, 30.0, -1, -2, -3, -4, X], [X, X, X, -9.0, -0.25, -0.5, -1]])
    chosen_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
    rejected = torch.tensor([[-5.0, 12.0, -0.5, -1.5, X, X], [X, 3.0, -2, -1, -4, -8]])
    rejected_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    return chosen, chosen_mask, rejected, rejected_mask


# Worked out by hand from hand_example():
#   ld_alpha = 0.5:
#     chosen 0:   first l_0=2 tokens -1 + -2 = -3; the rest 0.5 * (-3 + -4) = -3.5       -> -6.5
#     rejected 0: both tokens are within l_0=2: -0.5 + -1.5                               -> -2.0
#     chosen 1:   all 3 tokens within l_1=3: -0.25 + -0.5 + -1                            -> -1.75
#     rejected 1: first 3: -2 + -1 + -4 = -7; the 4th 0.5 * -8 = -4                       -> -11.0
#   ld_alpha = 1 (plain sums):  -10, -2, -1.75, -15
#   ld_alpha = 0 (shared prefix only): -3, -2, -1.75, -7
HAND = {
    0.5: ([-6.5, -1.75], [-2.0, -11.0]),
    1.0: ([-10.0, -1.75], [-2.0, -15.0]),
    0.0: ([-3.0, -1.75], [-2.0, -7.0]),
}


@pytest.mark.parametrize("ld_alpha", sorted(HAND))
@pytest.mark.parametrize("mask_kind", ["int", "bool", "float"])
def test_ld_hand_example(ld_alpha, mask_kind):
    chosen, cm, rejected, rm = hand_example()
    cast = {"int": lambda m: m, "bool": lambda m: m.bool(), "float": lambda m: m.float()}[mask_kind]
    c = chosen.clone().requires_grad_()
    r = rejected.clone().requires_grad_()
    cs, rs = ld_sequence_logps(c, cast(cm), r, cast(rm), ld_alpha)
    torch.testing.assert_close(cs, torch.tensor(HAND[ld_alpha][0]), rtol=0, atol=0)
    torch.testing.assert_close(rs, torch.tensor(HAND[ld_alpha][1]), rtol=0, atol=0)
    # d sum / d logp_t is the token's weight: 1 in the shared prefix, ld_alpha after it, 0 off-completion.
    gc, gr = torch.autograd.grad(cs.sum() + rs.sum(), [c, r])
    a = ld_alpha
    torch.testing.assert_close(
        gc, torch.tensor([[0, 0, 1, 1, a, a, 0], [0, 0, 0, 0, 1, 1, 1.0]]), rtol=0, atol=0
    )
    torch.testing.assert_close(gr, torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, a]]), rtol=0, atol=0)


def loop_ld_sums(logp, mask, other_mask, alpha):
    """The LD-DPO sum with explicit loops, float64."""
    out = []
    for p in range(logp.shape[0]):
        shared = min(int(mask[p].sum()), int(other_mask[p].sum()))
        total, k = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[p, t]:
                k += 1
                total += float(logp[p, t]) * (1.0 if k <= shared else alpha)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def random_completion_mask(P, T, *, left):
    mask = torch.zeros(P, T, dtype=torch.bool)
    for p in range(P):
        n = int(torch.randint(0, T - 1, ()))  # completion tokens (0 allowed: an empty completion)
        prompt = int(torch.randint(1, T - n + 1, ()))
        pad = T - n - prompt
        start = pad + prompt if left else prompt
        mask[p, start : start + n] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_ld_random_against_loops(seed, dtype, padding):
    P, Tc, Tr, alpha = 6, 13, 9, float(torch.rand(()))
    lc = padding == "left" or padding == "mixed"
    lr = padding == "left"
    cm, rm = random_completion_mask(P, Tc, left=lc), random_completion_mask(P, Tr, left=lr)
    c64, r64 = -3 * torch.rand(P, Tc, dtype=torch.float64), -3 * torch.rand(P, Tr, dtype=torch.float64)
    c = c64.to(dtype).clone().requires_grad_()
    r = r64.to(dtype).clone().requires_grad_()
    cs, rs = ld_sequence_logps(c, cm, r, rm, alpha)
    assert cs.dtype == dtype and cs.shape == (P,)
    # expected weights: 1 on the first min(|y_w|, |y_l|) completion tokens, alpha on the rest, 0 elsewhere
    shared = torch.minimum(cm.sum(1), rm.sum(1)).unsqueeze(1)
    want_c = torch.where(cm, torch.where(cm.cumsum(1) <= shared, 1.0, alpha), 0.0)
    want_r = torch.where(rm, torch.where(rm.cumsum(1) <= shared, 1.0, alpha), 0.0)
    true_c = loop_ld_sums(c64.to(dtype).double(), cm, rm, alpha)
    true_r = loop_ld_sums(r64.to(dtype).double(), rm, cm, alpha)
    # plain PyTorch weighted sum in the input dtype: the rounding the bound allows
    ref_c = (c64.to(dtype) * want_c.to(dtype)).sum(1)
    ref_r = (r64.to(dtype) * want_r.to(dtype)).sum(1)
    assert_close_to_truth("ld chosen", cs, ref_c, true_c, dtype=dtype)
    assert_close_to_truth("ld rejected", rs, ref_r, true_r, dtype=dtype)
    gc, gr = torch.autograd.grad(cs.sum() + rs.sum(), [c, r])
    torch.testing.assert_close(gc, want_c.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gr, want_r.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("ld_alpha", [-0.1, 1.5, float("nan"), True, None])
def test_ld_alpha_out_of_range(ld_alpha):
    chosen, cm, rejected, rm = hand_example()
    with pytest.raises(ValueError, match="ld_alpha must be a number in \\[0, 1\\]"):
        ld_sequence_logps(chosen, cm, rejected, rm, ld_alpha)


def test_ld_bad_shapes():
    chosen, cm, rejected, rm = hand_example()
    with pytest.raises(ValueError, match="chosen_mask must be a tensor of shape"):
        ld_sequence_logps(chosen, rm, rejected, rm, 0.5)
    with pytest.raises(ValueError, match="same number of pairs"):
        ld_sequence_logps(chosen[:1], cm[:1], rejected, rm, 0.5)
    with pytest.raises(ValueError, match="rejected_token_logp must be a floating-point tensor of shape"):
        ld_sequence_logps(chosen, cm, rejected[0], rm[0], 0.5)
    with pytest.raises(ValueError, match="rejected_mask must hold only 0/1"):
        ld_sequence_logps(chosen, cm, rejected, rm * 2, 0.5)
