"""FusedLinearDPOLoss against the composition linear_logprobs -> (LD-)masked sums -> dpo_loss.

kernel: the fused module; reference: the same composition through ``fastrl.linear_logprobs`` and autograd
at the input dtype; truth: a float64 composition with the log-softmax written out here.
"""

from __future__ import annotations

import pytest
import torch

from fastrl.losses.dpo import DPO_LOSSES, BCORunningMean, dpo_loss, ld_sequence_logps
from fastrl.losses.fused_dpo import FusedLinearDPOLoss, linear_dpo_reference
from fastrl.ops.linear_logprobs import linear_logprobs
from tests.helpers import assert_close_to_truth

IGNORE = -100


def make_labels(P, T, V, *, left):
    """Labels with a non-empty prompt, a random-length completion and padding (left or right); pair 1 of
    the rejected side gets an empty completion when asked for below."""
    labels = torch.full((P, T), IGNORE)
    for p in range(P):
        n = int(torch.randint(1, T - 1, ()))
        prompt = int(torch.randint(1, T - n + 1, ()))
        start = (T - n) if left else prompt
        labels[p, start : start + n] = torch.randint(0, V, (n,))
    return labels


def make_case(dtype, *, P=3, Tc=9, Tr=6, H=24, V=53, device="cpu", empty_rejected=False):
    g = dict(device=device)
    case = {
        "hidden_chosen": torch.randn(P, Tc, H, **g),
        "hidden_rejected": torch.randn(P, Tr, H, **g),
        "weight": torch.randn(V, H, **g) / H**0.5 * 2,
        "bias": 0.5 * torch.randn(V, **g),
        "ref_hidden_chosen": torch.randn(P, Tc, H, **g),
        "ref_hidden_rejected": torch.randn(P, Tr, H, **g),
        "ref_weight": torch.randn(V, H, **g) / H**0.5 * 2,
        "ref_bias": 0.5 * torch.randn(V, **g),
    }
    # The reference hidden states are the policy's plus noise, so the log-ratios are of order one.
    case["ref_hidden_chosen"] = case["hidden_chosen"] + 0.3 * case["ref_hidden_chosen"]
    case["ref_hidden_rejected"] = case["hidden_rejected"] + 0.3 * case["ref_hidden_rejected"]
    case = {k: v.to(dtype) for k, v in case.items()}  # rounded once; truth reads the rounded values
    labels_c = make_labels(P, Tc, V, left=False).to(device)
    labels_r = make_labels(P, Tr, V, left=True).to(device)
    if empty_rejected:
        labels_r[1] = IGNORE
    return case, labels_c, labels_r


def truth_seq_logps(h, y, W, b, temperature):
    """float64 [P, T] token log-probs of ``y`` under ``softmax((h W^T + b) / temperature)``."""
    logits = h.double() @ W.double().T
    if b is not None:
        logits = logits + b.double()
    z = logits / temperature
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = y != IGNORE
    out = logp.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, 0.0)


def sums(logp_c, logp_r, yc, yr, ld_alpha):
    alpha = 1.0 if ld_alpha is None else ld_alpha
    return ld_sequence_logps(logp_c, yc != IGNORE, logp_r, yr != IGNORE, alpha)


def ipo_lengths(loss_type, yc, yr, chosen_token_logp=None, ld_alpha=None):
    """What the module passes for you: token counts (ipo, sigmoid_norm, sft) and sft's plain chosen sums."""
    types = {loss_type} if isinstance(loss_type, str) else set(loss_type)
    out = {}
    if types & {"ipo", "sigmoid_norm", "sft"}:
        out = {"chosen_lengths": (yc != IGNORE).sum(1), "rejected_lengths": (yr != IGNORE).sum(1)}
    if "sft" in types and ld_alpha is not None:
        out["sft_chosen_logps"] = torch.where(yc != IGNORE, chosen_token_logp, 0.0).sum(1)
    return out


def grads_of(loss, inputs):
    """Gradients, zeros where the loss does not read an input (sft alone never sees the rejected side)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def run_all(case, yc, yr, *, ref_mode, with_bias, loss_type="sigmoid", ld_alpha=None, temperature=0.7,
            label_smoothing=0.0, impl="auto", chunk_size=None, options=None, truth_options=None):  # fmt: skip
    """(kernel, reference, truth) for the loss and the gradients to hidden_chosen, hidden_rejected,
    weight (and bias); and the three's metrics with the truth's per-pair reward margins."""
    options = options or {}
    truth_options = options if truth_options is None else truth_options
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=label_smoothing)
    names = ["hidden_chosen", "hidden_rejected", "weight"] + (["bias"] if with_bias else [])

    # float64 truth, and the reference log-prob sums (precomputed mode) from it
    x64 = {n: case[n].double().requires_grad_() for n in names}
    b64 = x64.get("bias")
    tc = truth_seq_logps(x64["hidden_chosen"], yc, x64["weight"], b64, temperature)
    tr = truth_seq_logps(x64["hidden_rejected"], yr, x64["weight"], b64, temperature)
    with torch.no_grad():
        rw = case["weight"] if ref_mode == "hidden_same_weight" else case["ref_weight"]
        rb = (case["bias"] if with_bias else None) if ref_mode == "hidden_same_weight" else case["ref_bias"]
        ref_c = truth_seq_logps(case["ref_hidden_chosen"], yc, rw, rb, temperature)
        ref_r = truth_seq_logps(case["ref_hidden_rejected"], yr, rw, rb, temperature)
        ref_sums64 = sums(ref_c, ref_r, yc, yr, ld_alpha)
    truth_sums = sums(tc, tr, yc, yr, ld_alpha)
    truth_loss, truth_metrics = dpo_loss(
        *truth_sums, *ref_sums64, **kw, **ipo_lengths(loss_type, yc, yr, tc, ld_alpha), **truth_options
    )
    with torch.no_grad():  # the per-pair reward margins b ((c - c_ref) - (r - r_ref))
        margins = kw["beta"] * ((truth_sums[0] - ref_sums64[0]) - (truth_sums[1] - ref_sums64[1]))
    truth = [truth_loss, *grads_of(truth_loss, [x64[n] for n in names])]

    if ref_mode == "precomputed":
        ref_kw = {"ref_chosen_logps": ref_sums64[0].float(), "ref_rejected_logps": ref_sums64[1].float()}
    else:
        ref_kw = {
            "ref_hidden_chosen": case["ref_hidden_chosen"],
            "ref_hidden_rejected": case["ref_hidden_rejected"],
        }
        if ref_mode == "hidden_other_weight":
            ref_kw.update(ref_weight=case["ref_weight"], ref_bias=case["ref_bias"])

    # reference: linear_logprobs (autograd) -> LD sums -> dpo_loss, in the input dtype
    xr = {n: case[n].clone().requires_grad_() for n in names}
    lc = linear_logprobs(xr["hidden_chosen"], xr["weight"], yc, bias=xr.get("bias"), temperature=temperature)
    lr = linear_logprobs(
        xr["hidden_rejected"], xr["weight"], yr, bias=xr.get("bias"), temperature=temperature
    )
    if ref_mode == "precomputed":
        rsum = (ref_kw["ref_chosen_logps"], ref_kw["ref_rejected_logps"])
    else:
        with torch.no_grad():
            w_, b_ = (case["weight"], xr.get("bias")) if ref_mode == "hidden_same_weight" else (rw, rb)
            rl = [linear_logprobs(ref_kw[f"ref_hidden_{s}"], w_, y, bias=b_, temperature=temperature)
                  for s, y in (("chosen", yc), ("rejected", yr))]  # fmt: skip
            rsum = sums(rl[0], rl[1], yc, yr, ld_alpha)
    ref_loss, ref_metrics = dpo_loss(
        *sums(lc, lr, yc, yr, ld_alpha),
        *rsum,
        **kw,
        **ipo_lengths(loss_type, yc, yr, lc, ld_alpha),
        **options,
    )
    reference = [ref_loss, *grads_of(ref_loss, [xr[n] for n in names])]

    # kernel: the fused module
    xk = {n: case[n].clone().requires_grad_() for n in names}
    module = FusedLinearDPOLoss(
        **kw, ld_alpha=ld_alpha, temperature=temperature, impl=impl, chunk_size=chunk_size, **options
    )
    loss, metrics = module(
        xk["hidden_chosen"], xk["hidden_rejected"], xk["weight"], yc, yr, bias=xk.get("bias"), **ref_kw
    )
    kernel = [loss, *torch.autograd.grad(loss, [xk[n] for n in names])]
    all_metrics = {"kernel": metrics, "reference": ref_metrics, "truth": truth_metrics, "margins": margins}
    return ["loss", *[f"d/{n}" for n in names]], kernel, reference, truth, all_metrics


def compare(names, kernel, reference, truth, dtype):
    for name, k, r, t in zip(names, kernel, reference, truth):
        if name != "loss":
            assert k.dtype == dtype, f"{name} dtype {k.dtype}"
        assert_close_to_truth(name, k, r, t, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ld_alpha", [None, 0.4])
@pytest.mark.parametrize(
    "ref_mode,with_bias",
    [
        ("precomputed", True),
        ("hidden_same_weight", False),
        ("hidden_same_weight", True),
        ("hidden_other_weight", True),
    ],
)
def test_matches_composition(seed, dtype, ld_alpha, ref_mode, with_bias):
    case, yc, yr = make_case(dtype, empty_rejected=True)
    names, kernel, reference, truth, m = run_all(
        case, yc, yr, ref_mode=ref_mode, with_bias=with_bias, ld_alpha=ld_alpha, chunk_size=5
    )
    compare(names, kernel, reference, truth, dtype)
    got, want = m["kernel"], m["truth"]
    assert set(got) == set(want)
    for key in want:
        assert not got[key].requires_grad
        if key == "rewards/accuracies":
            continue
        assert_close_to_truth(key, got[key], m["reference"][key], want[key], dtype=dtype)
    # A pair's accuracy may flip only where its margin is within the rounding of the input dtype.
    close = int((m["margins"].abs() < (1e-4 if dtype == torch.float32 else 0.1)).sum())
    assert (
        abs(got["rewards/accuracies"].item() - want["rewards/accuracies"].item())
        <= close / len(m["margins"]) + 1e-6
    )


def test_float64_keeps_float64_precision(seed):
    """fp64 inputs: the sequence sums and the loss math stay in fp64 (they once went through fp32)."""
    case, yc, yr = make_case(torch.float64, empty_rejected=True)
    names, kernel, reference, truth, _ = run_all(
        case, yc, yr, ref_mode="hidden_other_weight", with_bias=True, ld_alpha=0.4, chunk_size=5
    )
    compare(names, kernel, reference, truth, torch.float64)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type(seed, loss_type):
    case, yc, yr = make_case(torch.float32, P=5)
    ls = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05}.get(loss_type, 0.0)
    opts, truth_opts = {}, None
    if loss_type == "bco_pair":  # one state per computation, each sees the same first batch
        opts, truth_opts = {"bco_state": BCORunningMean()}, {"bco_state": BCORunningMean()}
    if loss_type == "discopop":
        opts = {"discopop_tau": 0.3}
    names, kernel, reference, truth, _ = run_all(
        case, yc, yr, ref_mode="hidden_same_weight", with_bias=True, loss_type=loss_type, ld_alpha=0.6,
        label_smoothing=ls, options=opts, truth_options=truth_opts,
    )  # fmt: skip
    compare(names, kernel, reference, truth, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_impl(seed, dtype):
    """The module through the Triton row kernels (interpreted on the CPU): small, one chunk boundary."""
    case, yc, yr = make_case(dtype, P=2, Tc=5, Tr=4, H=16, V=37)
    names, kernel, reference, truth, _ = run_all(
        case, yc, yr, ref_mode="hidden_same_weight", with_bias=True, ld_alpha=0.5, impl="triton", chunk_size=4
    )
    compare(names, kernel, reference, truth, dtype)


def test_no_grad_frozen_weight_and_scaled_backward(seed):
    case, yc, yr = make_case(torch.float32)
    ref_kw = {
        "ref_hidden_chosen": case["ref_hidden_chosen"],
        "ref_hidden_rejected": case["ref_hidden_rejected"],
    }
    module = FusedLinearDPOLoss(beta=0.2, ld_alpha=0.3)
    hc, hr = case["hidden_chosen"].requires_grad_(), case["hidden_rejected"].requires_grad_()
    W = case["weight"]  # frozen lm_head (LoRA): no weight gradient at all
    want, _ = linear_dpo_reference(hc, hr, W, yc, yr, beta=0.2, ld_alpha=0.3, **ref_kw)
    want_grads = torch.autograd.grad(want, [hc, hr])

    with torch.no_grad():
        loss, _ = module(hc, hr, W, yc, yr, **ref_kw)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)

    loss, _ = module(hc, hr, W, yc, yr, **ref_kw)
    (3.0 * loss).backward()  # the stored gradients are scaled by the incoming gradient
    assert W.grad is None
    torch.testing.assert_close(hc.grad, 3.0 * want_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(hr.grad, 3.0 * want_grads[1], rtol=1e-4, atol=1e-7)


def test_reference_function_matches_truth(seed):
    """linear_dpo_reference (used by benchmarks) is the composition."""
    case, yc, yr = make_case(torch.float64)
    hc = case["hidden_chosen"].requires_grad_()
    kw = dict(beta=0.2, loss_type="ipo", ld_alpha=0.5, temperature=0.9)
    ref_kw = {
        "ref_hidden_chosen": case["ref_hidden_chosen"],
        "ref_hidden_rejected": case["ref_hidden_rejected"],
    }
    got, _ = linear_dpo_reference(hc, case["hidden_rejected"], case["weight"], yc, yr, **kw, **ref_kw)
    tc = truth_seq_logps(hc, yc, case["weight"], None, 0.9)
    tr = truth_seq_logps(case["hidden_rejected"], yr, case["weight"], None, 0.9)
    rc = truth_seq_logps(case["ref_hidden_chosen"], yc, case["weight"], None, 0.9)
    rr = truth_seq_logps(case["ref_hidden_rejected"], yr, case["weight"], None, 0.9)
    want, _ = dpo_loss(
        *sums(tc, tr, yc, yr, 0.5), *sums(rc, rr, yc, yr, 0.5), beta=0.2, loss_type="ipo",
        **ipo_lengths("ipo", yc, yr),
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "dpo"}, r"loss_type must be one of \[.*'sigmoid'.*\]"),
        ({"ld_alpha": 1.2}, r"ld_alpha must be None or a number in \[0, 1\]"),
        ({"ld_alpha": -0.5}, r"ld_alpha must be None or a number in \[0, 1\]"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(2)}, "taken from the labels"),
        ({"loss_type": "exo_pair"}, "must be > 0 for loss_type='exo_pair'"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearDPOLoss(**kwargs)


def test_bad_inputs():
    case, yc, yr = make_case(torch.float32, P=3, Tc=6, Tr=5, H=8, V=11)
    hc, hr, W = case["hidden_chosen"], case["hidden_rejected"], case["weight"]
    ref_logps = {"ref_chosen_logps": torch.zeros(3), "ref_rejected_logps": torch.zeros(3)}
    ref_hidden = {
        "ref_hidden_chosen": case["ref_hidden_chosen"],
        "ref_hidden_rejected": case["ref_hidden_rejected"],
    }
    m = FusedLinearDPOLoss()
    bad = [
        ((hc[..., :7], hr, W, yc, yr), ref_logps, r"hidden_chosen must have shape \[T, T, 8\]"),
        ((hc, hr[:2], W, yc, yr), ref_logps, r"hidden_rejected must have shape \[3, T, 8\]"),
        ((hc, hr, W, yc[:, :5], yr), ref_logps, r"labels_chosen must have shape \(3, 6\)"),
        ((hc, hr, W, yc, yr.float()), ref_logps, "labels_rejected must be an integer tensor"),
        ((hc, hr, W, yc, yr.clamp(min=0) + 11), ref_logps, "labels_rejected must lie in"),
        ((hc, hr, W[0], yc, yr), ref_logps, r"weight must have shape \[V, H\]"),
        ((hc, hr, W, yc, yr), {**ref_logps, "bias": torch.zeros(10)}, r"bias must have shape \[V\]"),
        ((hc, hr, W, yc, yr), {}, "give the reference either"),
        ((hc, hr, W, yc, yr), {**ref_logps, **ref_hidden}, "give the reference either"),
        ((hc, hr, W, yc, yr), {"ref_chosen_logps": torch.zeros(3)}, "give the reference either"),
        (
            (hc, hr, W, yc, yr),
            {**ref_logps, "ref_chosen_logps": torch.zeros(4)},
            r"ref_chosen_logps must have shape",
        ),
        ((hc, hr, W, yc, yr), {**ref_logps, "ref_weight": W}, "ref_weight/ref_bias apply only"),
        ((hc, hr, W, yc, yr), {**ref_hidden, "ref_bias": torch.zeros(11)}, "ref_bias needs ref_weight"),
        ((hc, hr, W, yc, yr), {**ref_hidden, "ref_weight": W[:5]}, "ref_weight must have V = 11"),
        (
            (hc, hr, W, yc, yr),
            {**ref_hidden, "ref_hidden_rejected": case["ref_hidden_rejected"][:, :4]},
            r"ref_hidden_rejected must have shape \[3, 5, 8\]",
        ),
    ]
    for args, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            m(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("ref_mode", ["precomputed", "hidden_same_weight"])
def test_gpu_bf16_matches_composition(seed, ref_mode):
    """CUDA, Triton row kernels, bf16, a vocabulary over several chunks."""
    case, yc, yr = make_case(torch.bfloat16, P=4, Tc=192, Tr=160, H=256, V=5003, device="cuda")
    names, kernel, reference, truth, _ = run_all(
        case, yc, yr, ref_mode=ref_mode, with_bias=True, ld_alpha=0.5, chunk_size=256
    )
    compare(names, kernel, reference, truth, torch.bfloat16)
