"""``fastrl.linear_logprobs`` and ``fused_linear_logprobs_with_grad`` against float64 truth.

Every case compares the op (at the input dtype) and the materialising PyTorch reference (same dtype)
with the reference in float64: ``|truth - op| <= 2 |truth - torch| + atol`` (tests/helpers.py), for
log-probs, entropy and the gradients to hidden, weight and bias under random upstream gradients.
Triton cases run under the interpreter on the CPU, so their sizes stay small.
"""

from __future__ import annotations

import pytest
import torch

import fastrl.ops.linear_logprobs as ll
from fastrl.ops.linear_logprobs import (
    default_chunk_size,
    fused_linear_logprobs_with_grad,
    linear_logprobs,
    linear_logprobs_reference,
)
from tests.helpers import assert_close_to_truth

IGNORE = -100


def make_inputs(shape, H, V, dtype, *, bias=True, ignore_frac=0.2, device="cpu"):
    """hidden [*shape, H], weight [V, H] scaled so logits have std ~2, labels with some ignored."""
    hidden = torch.randn(*shape, H, device=device).to(dtype)
    weight = (2.0 * torch.randn(V, H, device=device) / H**0.5).to(dtype)
    b = (0.5 * torch.randn(V, device=device)).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = IGNORE
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g_logp, g_ent, **kw):
    """Outputs and gradients of sum(logp * g_logp + entropy * g_ent) (entropy term when g_ent given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(*leaves, labels, bias=b, return_entropy=g_ent is not None, **kw)
    logp, ent = out if g_ent is not None else (out, None)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
    grads = torch.autograd.grad(loss, leaves + ([b] if b is not None else []))
    return [logp.detach(), ent.detach() if ent is not None else None, *grads]


def check_against_truth(hidden, weight, bias, labels, *, with_entropy, temperature=1.0, **kw):
    g_logp = torch.randn(labels.shape, device=labels.device)
    g_ent = torch.randn(labels.shape, device=labels.device) if with_entropy else None
    opts = dict(temperature=temperature, ignore_index=IGNORE)
    ours = run(linear_logprobs, hidden, weight, bias, labels, g_logp, g_ent, **opts, **kw)
    ref = run(linear_logprobs_reference, hidden, weight, bias, labels, g_logp, g_ent, **opts)
    b64 = bias.double() if bias is not None else None
    truth = run(
        linear_logprobs_reference, hidden.double(), weight.double(), b64, labels, g_logp, g_ent, **opts
    )
    assert ours[0].dtype == torch.float32 and ours[0].shape == labels.shape
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, o, r, t in zip(names, ours, ref, truth):
        if t is None:
            assert o is None, name
            continue
        assert o.dtype == r.dtype, name
        assert_close_to_truth(name, o, r, t, dtype=hidden.dtype)
    return ours


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1999])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_torch_impl_matches_truth(seed, dtype, V, temperature):
    # Several chunks (chunk_size 16 over 3 x 13 tokens) with the last one partial; entropy and bias on
    # for half the cases so every combination of the two appears across the grid.
    with_entropy = temperature != 1.0
    hidden, weight, bias, labels = make_inputs((3, 13), 40, V, dtype, bias=V != 7)
    check_against_truth(hidden, weight, bias, labels, with_entropy=with_entropy, temperature=temperature,
                        impl="torch", chunk_size=16)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_torch_impl_automatic_chunk_and_batch_shape(seed, dtype, with_entropy):
    hidden, weight, bias, labels = make_inputs((2, 5, 3), 24, 301, dtype)
    check_against_truth(hidden, weight, bias, labels, with_entropy=with_entropy, impl="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_impl_gpt2_vocab(seed, dtype):
    hidden, weight, bias, labels = make_inputs((6,), 16, 50257, dtype, ignore_frac=0.0)
    labels[0] = 50256  # the last row of the vocabulary
    # One chunk (the chunking is tested at V=1999): grad_hidden here is an fp32 sum over 50k terms, and a
    # 2-row trailing chunk runs a different CPU matmul kernel than the 6-row reference, so the two would
    # round differently at ~1e-5 — PyTorch itself errs as much on those 2 rows alone.
    check_against_truth(hidden, weight, bias, labels, with_entropy=True, impl="torch", chunk_size=6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1999])
def test_triton_chunked_matches_truth(seed, dtype, V):
    # Temperature 2, not 0.5: the row kernels of fastrl.triton_kernels.logprobs take log p = z - lse, an
    # ulp of |lse| off at the likeliest tokens (PyTorch's log_softmax subtracts the max first, and the
    # fused kernels here keep lse as an exact hi + lo). At T = 0.5 (|z| ~ 12) that puts an occasional fp32
    # grad_weight element of magnitude ~10 past the elementwise bound (about 1 run in 8).
    hidden, weight, bias, labels = make_inputs((37,), 40, V, dtype, bias=V == 7)
    check_against_truth(hidden, weight, bias, labels, with_entropy=True, temperature=2.0, impl="triton",
                        chunk_size=16)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("V", "with_entropy", "bias", "temperature"),
                         [(1, True, True, 1.0), (7, False, False, 2.0), (203, True, True, 0.5)])  # fmt: skip
def test_recompute_matches_truth(seed, dtype, V, with_entropy, bias, temperature):
    # N = 37 and H = 40 are not multiples of the interpreter tiles (16 rows, 64 vocab, 32 hidden).
    hidden, weight, b, labels = make_inputs((37,), 40, V, dtype, bias=bias)
    check_against_truth(hidden, weight, b, labels, with_entropy=with_entropy, temperature=temperature,
                        recompute=True)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_impls_agree(seed, dtype):
    hidden, weight, bias, labels = make_inputs((29,), 24, 150, dtype)
    g_logp, g_ent = torch.randn(29), torch.randn(29)
    outs = [
        run(linear_logprobs, hidden, weight, bias, labels, g_logp, g_ent, **kw)
        for kw in (
            dict(impl="torch", chunk_size=8),
            dict(impl="torch"),
            dict(impl="triton", chunk_size=8),
            dict(recompute=True),
        )  # fmt: skip
    ]
    ref = run(linear_logprobs_reference, hidden, weight, bias, labels, g_logp, g_ent)
    truth = run(
        linear_logprobs_reference, hidden.double(), weight.double(), bias.double(), labels, g_logp, g_ent
    )
    for i, out in enumerate(outs):
        for name, o, r, t in zip(["logp", "entropy", "gh", "gw", "gb"], out, ref, truth):
            assert_close_to_truth(f"impl #{i} {name}", o, r, t, dtype=dtype)
    # logp and entropy come from the same fp32 math on the same logits: the impls agree to fp32 rounding.
    for out in outs[1:]:
        torch.testing.assert_close(out[0], outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(impl="torch", chunk_size=4), dict(impl="triton"), dict(recompute=True)])
def test_rows_entirely_ignored(seed, kw):
    hidden, weight, bias, labels = make_inputs((2, 9), 16, 33, torch.float32)
    labels[0] = IGNORE  # the whole first sequence
    ours = check_against_truth(hidden, weight, bias, labels, with_entropy=False, **kw)
    assert bool((ours[0][0] == 0).all())
    assert bool((ours[2][0] == 0).all()), "ignored tokens get no gradient without an entropy term"
    labels[:] = IGNORE
    ours = check_against_truth(hidden, weight, bias, labels, with_entropy=False, **kw)
    assert all(bool((t == 0).all()) for t in [ours[0], *ours[2:]])


@pytest.fixture
def products(monkeypatch):
    """Counts the op's three matrix products: chunk logits, grad_hidden and grad_weight (by wrapping them)."""
    counts = {"logits": 0, "grad_hidden": 0, "grad_weight": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ll, "_chunk_logits", counted("logits", ll._chunk_logits))
    monkeypatch.setattr(ll, "_grad_hidden_chunk", counted("grad_hidden", ll._grad_hidden_chunk))
    acc = ll._GradWeightAccumulator
    monkeypatch.setattr(acc, "add", counted("grad_weight", acc.add))
    return counts


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_weight_skips_the_weight_product(seed, frozen, products):
    hidden, weight, _, labels = make_inputs((20,), 16, 50, torch.float32)  # 3 chunks of 8
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    linear_logprobs(hidden, weight, labels, impl="torch", chunk_size=8).sum().backward()
    # forward: logits per chunk; backward: logits again, grad_hidden, grad_weight unless frozen.
    assert products == {"logits": 6, "grad_hidden": 3, "grad_weight": 0 if frozen else 3}
    assert (weight.grad is None) == frozen
    ref = torch.autograd.grad(linear_logprobs_reference(hidden, weight, labels).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, ref, rtol=1e-5, atol=1e-6)


def test_no_grad_saves_nothing_and_grad_saves_no_logits(seed):
    hidden, weight, bias, labels = make_inputs((21,), 16, 300, torch.float32)
    weight.requires_grad_()
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            logp = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, impl="torch")[0]
        assert logp.grad_fn is None and packed == []
        logp = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, impl="torch")[0]
    assert logp.grad_fn is not None
    # hidden, weight, bias, labels, lse, entropy: nothing of size N x V.
    assert sorted(packed) == sorted([(21, 16), (300, 16), (300,), (21,), (21,), (21,)])


def _grpo_like_grad_fn(old_logp, adv, coef, seen):
    """d/d(logp, entropy) of sum(adv * exp(logp - old_logp)) + coef * sum(entropy): depends on logp."""

    def grad_fn(rows, logp_C, entropy_C):
        seen.append(rows)
        dlogp = adv[rows] * torch.exp(logp_C - old_logp[rows])
        return dlogp, (torch.full_like(entropy_C, coef) if entropy_C is not None else None)

    return grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("impl", "with_entropy", "bias"),
    [("torch", True, True), ("torch", False, False), ("triton", True, False)],
)
def test_fused_with_grad_matches_autograd(seed, dtype, impl, with_entropy, bias):
    N, H, V, T = 45, 32, 257, 0.7
    hidden, weight, b, labels = make_inputs((N,), H, V, dtype, bias=bias)
    old_logp = -3.0 + torch.randn(N)
    adv = torch.randn(N)
    coef = 0.3
    seen = []
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    res = fused_linear_logprobs_with_grad(
        hidden, weight, labels, _grpo_like_grad_fn(old_logp, adv, coef, seen), bias=b, temperature=T,
        ignore_index=IGNORE, with_entropy=with_entropy, impl=impl, chunk_size=16,
    )  # fmt: skip
    assert seen == [slice(0, 16), slice(16, 32), slice(32, 45)]

    def loss_of(h, w, bb):
        out = linear_logprobs_reference(h, w, labels, bias=bb, temperature=T, return_entropy=with_entropy)
        logp, ent = out if with_entropy else (out, None)
        kept = labels != IGNORE
        loss = (torch.where(kept, adv * torch.exp(logp - old_logp), 0.0)).sum()
        return loss + (coef * ent.sum() if with_entropy else 0.0), logp, ent

    def grads(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (hidden, weight)]
        bb = b.detach().to(dt).requires_grad_() if b is not None else None
        loss, logp, ent = loss_of(*leaves, bb)
        g = torch.autograd.grad(loss, leaves + ([bb] if bb is not None else []))
        return [logp.detach(), ent.detach() if ent is not None else None, *g, *([None] if bb is None else [])]

    ref, truth = grads(dtype), grads(torch.float64)
    for name, o, r, t in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], res, ref, truth):
        if t is None:
            assert o is None, name
            continue
        assert_close_to_truth(name, o, r, t, dtype=dtype)
    assert res.logp.requires_grad is False


def test_fused_with_grad_frozen_weight_two_products_per_chunk(seed, products):
    hidden, weight, _, labels = make_inputs((20,), 16, 50, torch.float32)
    grad_fn = lambda rows, logp, ent: (torch.ones_like(logp), None)
    res = fused_linear_logprobs_with_grad(hidden, weight, labels, grad_fn, impl="torch", chunk_size=8)
    assert res.grad_weight is None and res.grad_bias is None
    assert products == {"logits": 3, "grad_hidden": 3, "grad_weight": 0}
    weight.requires_grad_()
    res = fused_linear_logprobs_with_grad(hidden, weight, labels, grad_fn, impl="torch", chunk_size=8)
    assert res.grad_weight is not None
    assert products == {"logits": 6, "grad_hidden": 6, "grad_weight": 3}
    h, w = hidden.clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch.autograd.backward(linear_logprobs_reference(h, w, labels).sum())
    torch.testing.assert_close(res.grad_hidden, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.grad_weight, w.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_aot_eager(seed):
    hidden, weight, bias, labels = make_inputs((3, 11), 16, 97, torch.float32)

    def f(h, w, b):
        logp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, impl="torch", chunk_size=8)
        return (logp * 2.0).sum() + ent.mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_int32_labels_and_empty_input(seed, impl):
    hidden, weight, bias, labels = make_inputs((9,), 16, 40, torch.float32)
    check_against_truth(hidden, weight, bias, labels.int(), with_entropy=True, impl=impl)
    hidden = hidden[:0].requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, labels[:0], return_entropy=True, impl=impl)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 16)


def test_default_chunk_size_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(10**6, 32000, 4, cpu) == 256  # 32 MiB / (32000 * 4 B) = 262 -> 256
    assert default_chunk_size(10**6, 151936, 2, cuda) == 832  # 256 MiB / (151936 * 2 B) = 883 -> 832
    assert default_chunk_size(100, 32000, 4, cpu) == 100  # never more rows than tokens
    assert default_chunk_size(10**6, 10**9, 4, cpu) == 1  # a huge vocabulary still gets one row


def test_bad_inputs_raise_value_error():
    h, w, b, y = make_inputs((4, 5), 8, 11, torch.float32)
    cases = [
        (dict(weight=torch.randn(11, 9)), "weight"),
        (dict(weight=torch.randn(11)), "weight"),
        (dict(weight=w.double()), "weight"),
        (dict(labels=y[:, :4]), "labels"),
        (dict(labels=y.float()), "labels"),
        (dict(labels=torch.full_like(y, 11)), "labels"),
        (dict(labels=torch.full_like(y, -1)), "labels"),
        (dict(bias=torch.randn(10)), "bias"),
        (dict(bias=b.half()), "bias"),
        (dict(hidden=h.long()), "hidden"),
        (dict(weight=w.long()), "weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(impl="cuda"), "impl"),
        (dict(impl="torch", recompute=True), "impl"),
        (dict(hidden=h.double(), weight=w.double(), bias=b.double(), impl="triton"), "impl"),
        (dict(hidden=h.to("meta")), "device"),
    ]
    for override, word in cases:
        args = dict(hidden=h, weight=w, labels=y, bias=b) | override
        with pytest.raises(ValueError, match=word):
            linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
    with pytest.raises(ValueError, match="grad_fn"):
        fused_linear_logprobs_with_grad(h.view(20, 8), w, y.view(20), lambda r, lp, e: lp)
    with pytest.raises(ValueError, match="hidden_NH"):
        fused_linear_logprobs_with_grad(h, w, y, lambda r, lp, e: (lp, None))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw", [dict(impl="triton"), dict(impl="triton", chunk_size=512), dict(recompute=True), dict(impl="torch")]
)
def test_cuda_bf16_moderate(seed, kw):
    hidden, weight, bias, labels = make_inputs((2, 1537), 512, 32003, torch.bfloat16, device="cuda")
    check_against_truth(hidden, weight, bias, labels, with_entropy=True, temperature=0.8, **kw)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nonfinite_ignored_rows_leave_gradients_finite(impl, seed):
    """A padding row whose logits overflow (inf, so its softmax is NaN) and whose label is ignored must
    not poison grad_weight. (NaN hidden states would, legitimately: 0 * NaN in G^T h.)"""
    N, H, V = 6, 8, 13
    hidden = torch.randn(N, H)
    hidden[2] = 3e38
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    h = hidden.clone().requires_grad_(True)
    logp = linear_logprobs(h, weight, labels, impl=impl)
    assert logp[2].item() == 0.0
    logp.sum().backward()
    assert torch.isfinite(weight.grad).all()
    keep = torch.arange(N) != 2
    assert torch.isfinite(h.grad[keep]).all()
