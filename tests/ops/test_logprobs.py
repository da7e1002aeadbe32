"""fastrl.logprobs: Triton (interpreted on the CPU) and chunked-torch impls against a float64 truth.

Every case draws fresh inputs from the ``seed`` fixture. Forward outputs are fp32 computed from exactly
upcast inputs, so they are held to fp32 tolerances whatever the input dtype; the logits gradient is
rounded to the input dtype and held to that dtype's tolerance (``tests/helpers.py``).
"""

from __future__ import annotations

import pytest
import torch

import fastrl
import fastrl.ops.logprobs as lp_mod
from fastrl.ops.logprobs import logprobs, logprobs_reference
from tests.helpers import assert_close_to_truth

# The interpreter evaluates masked-off padding rows with numpy too (log 0, 0 / 0), which numpy reports.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_inputs(shape, V, dtype, *, ignore_frac=0.25, scale=3.0):
    """Logits ``[*shape, V]`` spread enough that the softmax is neither uniform nor one-hot; labels with a
    fraction ignored and, when there is a batch dimension, one batch row ignored entirely."""
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < ignore_frac] = IGNORE
    if len(shape) >= 2:
        labels[1] = IGNORE
    return logits, labels


def run(impl, logits, labels, g_logp, g_h, **kw):
    """``(logp, entropy or None, d(sum g_logp logp + g_h H)/dlogits)`` for one impl."""
    x = logits.detach().clone().requires_grad_()
    with_entropy = g_h is not None
    if impl == "reference":
        out = logprobs_reference(x, labels, return_entropy=with_entropy, **kw)
    else:
        out = logprobs(x, labels, return_entropy=with_entropy, impl=impl, **kw)
    logp, h = out if with_entropy else (out, None)
    loss = (logp * g_logp.to(logp.dtype)).sum()
    if with_entropy:
        loss = loss + (h * g_h.to(h.dtype)).sum()
    loss.backward()
    return logp.detach(), None if h is None else h.detach(), x.grad


def check_against_truth(impl, logits, labels, *, entropy, **kw):
    shape = labels.shape
    g_logp = torch.randn(shape)
    g_h = torch.randn(shape) if entropy else None
    g_h64 = None if g_h is None else g_h.double()
    truth = run("reference", logits.double(), labels, g_logp.double(), g_h64, **kw)
    ref = run("reference", logits, labels, g_logp, g_h, **kw)
    got = run(impl, logits, labels, g_logp, g_h, **kw)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert got[0].dtype == acc and got[2].dtype == logits.dtype
    assert_close_to_truth(f"{impl} logp", got[0], ref[0], truth[0], dtype=acc)
    if entropy:
        assert got[1].dtype == acc
        assert_close_to_truth(f"{impl} entropy", got[1], ref[1], truth[1], dtype=acc)
    assert_close_to_truth(f"{impl} grad", got[2], ref[2], truth[2], dtype=logits.dtype)
    # Ignored positions: log-prob exactly 0; with no entropy gradient, their logits gradient is exactly 0.
    ignored = labels == IGNORE
    assert bool((got[0][ignored] == 0).all())
    if not entropy:
        assert bool((got[2][ignored] == 0).all())
    return got


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of the torch impl shrunk to a few rows, so chunk boundaries fall inside every test input."""
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMENTS", 4096)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1999])
# Every temperature of the issue and both entropy settings, without the full cross product.
@pytest.mark.parametrize(("temperature", "entropy"), [(0.5, True), (1.0, False), (2.0, True)])
def test_matches_float64(seed, small_chunks, impl, dtype, V, temperature, entropy):
    logits, labels = make_inputs((3, 13), V, dtype)
    check_against_truth(impl, logits, labels, entropy=entropy, temperature=temperature)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocab(seed, impl, dtype):
    # Few rows: the interpreter streams each row through 7 vocabulary blocks.
    logits, labels = make_inputs((3,), 50257, dtype, ignore_frac=0.0)
    check_against_truth(impl, logits, labels, entropy=True, temperature=2.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("which", ["entropy", "logp"])
def test_one_output_gradient_only(seed, impl, which):
    """A loss on one of the two returned outputs: the other's gradient is absent (not zeros). On the entropy
    alone, ignored rows still get their entropy gradient."""
    logits, labels = make_inputs((4, 5), 37, torch.float32)
    g = torch.randn(4, 5)
    grads = []
    for fn in (logprobs, logprobs_reference):
        x = logits.clone().requires_grad_()
        kw = {"impl": impl} if fn is logprobs else {}
        out = fn(x, labels, return_entropy=True, **kw)[0 if which == "logp" else 1]
        (out * g).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    if which == "entropy":
        assert bool((grads[0][1].abs().sum(-1) > 0).all())  # batch row 1 is entirely ignored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_three_impls_agree(seed, small_chunks, dtype):
    """auto is the torch impl on the CPU (bit for bit); torch and triton are each as close to the float64
    truth as the plain reference is, outputs and gradient."""
    logits, labels = make_inputs((2, 9), 300, dtype)
    g_logp, g_h = torch.randn(2, 9), torch.randn(2, 9)
    outs = {impl: run(impl, logits, labels, g_logp, g_h) for impl in ("auto", "torch", "triton", "reference")}
    truth = run("reference", logits.double(), labels, g_logp.double(), g_h.double())
    for a, b in zip(outs["auto"], outs["torch"]):
        assert torch.equal(a, b)
    for impl in ("torch", "triton"):
        for name, got, ref, t, dt in zip(
            ("logp", "entropy", "grad"), outs[impl], outs["reference"], truth, (torch.float32,) * 2 + (dtype,)
        ):
            assert_close_to_truth(f"{impl} {name}", got, ref, t, dtype=dt)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sliced", [False, True])
def test_inplace_backward_same_gradient(seed, small_chunks, impl, dtype, sliced):
    logits, labels = make_inputs((3, 8), 129, dtype)
    g_logp, g_h = torch.randn(3, 7 if sliced else 8), torch.randn(3, 7 if sliced else 8)
    if sliced:  # the usual shift: logits[:, :-1] is a strided view, written in place without a copy
        labels = labels[:, 1:]
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        x = leaf * 1  # a non-leaf buffer the backward may overwrite
        xs = x[:, :-1] if sliced else x
        logp, h = logprobs(xs, labels, return_entropy=True, impl=impl, inplace_backward=inplace)
        ((logp * g_logp).sum() + (h * g_h).sum()).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    # The documented cost of inplace_backward: the logits buffer now holds the gradient, and only the part
    # of it that was passed in.
    assert torch.equal(xs.detach(), grads[1][:, :-1] if sliced else grads[1])
    if sliced:
        assert torch.equal(x[:, -1].detach(), logits[:, -1])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_inplace_backward_guards_other_users(seed, impl):
    """Another op that saved the logits for its backward sees the overwrite and autograd refuses."""
    logits, labels = make_inputs((2, 5), 33, torch.float32)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    other = (x * x).sum()  # saves x; its backward runs after ours
    logp = logprobs(x, labels, impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["vocab_slice", "time_slice", "transposed_vocab", "permuted_4d"])
def test_strided_inputs(seed, impl, layout):
    V = 61
    base, _ = make_inputs((4, 6), V + 3, torch.float32)
    if layout == "vocab_slice":  # row stride V + 3
        x = base[..., :V]
    elif layout == "time_slice":  # leading dims (4, 5) with strides (6 (V+3), V+3)
        x = base[:, :-1, :V]
    elif layout == "transposed_vocab":  # last dimension not contiguous: copied
        x = base[..., :V].transpose(1, 2).contiguous().transpose(1, 2)
    else:  # leading dims that do not collapse to two strided ones: copied
        x = base[..., : V - 1].reshape(2, 2, 6, V - 1).permute(2, 1, 0, 3)
    labels = torch.randint(0, x.shape[-1], x.shape[:-1])
    g_logp, g_h = torch.randn(labels.shape), torch.randn(labels.shape)
    got = run(impl, x, labels, g_logp, g_h)
    want = run(impl, x.contiguous(), labels, g_logp, g_h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nonfinite_rows_stay_in_their_row(seed, impl):
    logits, labels = make_inputs((6,), 45, torch.float32, ignore_frac=0.0)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, ::2] = float("-inf")  # masked tokens: a legitimate row
    labels[2] = 1
    g_logp, g_h = torch.randn(6), torch.randn(6)
    logp, h, grad = run(impl, logits, labels, g_logp, g_h)
    clean_logp, clean_h, clean_grad = run(impl, logits[3:], labels[3:], g_logp[3:], g_h[3:])
    for a, b in ((logp[3:], clean_logp), (h[3:], clean_h), (grad[3:], clean_grad)):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The poisoned rows say so instead of returning plausible numbers.
    assert not bool(torch.isfinite(logp[:2]).any()) and bool(grad[:2].isnan().any(-1).all())
    truth = run("reference", logits[2:3].double(), labels[2:3], g_logp[2:3].double(), g_h[2:3].double())
    for name, a, t in zip(("logp", "entropy", "grad"), (logp[2:3], h[2:3], grad[2:3]), truth):
        assert bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-6)
    assert bool((grad[2, ::2] == 0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [False, True])
def test_nonfinite_ignored_rows_get_no_logp_gradient(seed, impl, entropy):
    """Padding rows (label ignored) may hold NaN/inf logits, e.g. from fully masked attention rows. Their
    log-prob is 0 and, with no entropy gradient asked for, their logits gradient is exactly 0: a NaN there
    would reach the shared weights through the backward and poison every parameter."""
    logits, labels = make_inputs((6,), 45, torch.float32, ignore_frac=0.0)
    logits[0, 3], logits[1] = float("nan"), float("inf")
    labels[:2] = IGNORE
    g_logp = torch.randn(6)
    g_logp[0] = float("nan")  # whatever the upstream gradient of an ignored row says
    x = logits.clone().requires_grad_()
    out = logprobs(x, labels, return_entropy=entropy, impl=impl)
    logp = out[0] if entropy else out
    (logp * g_logp).sum().backward()
    assert bool((logp[:2] == 0).all()) and bool((x.grad[:2] == 0).all())
    clean = run(impl, logits[2:], labels[2:], g_logp[2:], None)
    torch.testing.assert_close(logp[2:].detach(), clean[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad[2:], clean[2], rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph(seed):
    # Tracing sees only the custom ops' fake implementations, the same for every impl; the op bodies run
    # eagerly inside the graph. One impl is enough (triton: the one CUDA users get).
    impl = "triton"
    logits, labels = make_inputs((2, 7), 50, torch.float32)
    g_logp, g_h = torch.randn(2, 7), torch.randn(2, 7)

    def loss_fn(x, y):
        logp, h = fastrl.logprobs(x, y, temperature=0.7, return_entropy=True, impl=impl)
        return (logp * g_logp).sum() + (h * g_h).sum(), logp, h

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for fn in (loss_fn, compiled):
        x = logits.clone().requires_grad_()
        loss, logp, h = fn(x, labels)
        loss.backward()
        outs.append((loss.detach(), logp.detach(), h.detach()))
        grads.append(x.grad)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_empty_rows(seed):
    x = torch.randn(0, 5, 11, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long)
    for impl in ("torch", "triton"):
        logp, h = logprobs(x, labels, return_entropy=True, impl=impl)
        assert logp.shape == (0, 5) and h.shape == (0, 5)
        (logp.sum() + h.sum()).backward()
        assert x.grad.shape == x.shape


_BAD = [
    ("labels", lambda: (torch.randn(4, 9), torch.zeros(5, dtype=torch.long), {})),
    ("labels", lambda: (torch.randn(4, 9), torch.zeros(4, 9, dtype=torch.long), {})),
    ("labels", lambda: (torch.randn(4, 9), torch.zeros(4), {})),
    ("labels", lambda: (torch.randn(4, 9), torch.tensor([0, 9, 1, 2]), {})),
    ("labels", lambda: (torch.randn(4, 9), torch.tensor([0, -1, 1, 2]), {})),
    ("labels", lambda: (torch.randn(4, 9), torch.tensor([0, -100, 1, 2]), {"ignore_index": -1})),
    ("device", lambda: (torch.randn(4, 9), torch.zeros(4, dtype=torch.long, device="meta"), {})),
    ("temperature", lambda: (torch.randn(4, 9), torch.zeros(4, dtype=torch.long), {"temperature": 0.0})),
    ("temperature", lambda: (torch.randn(4, 9), torch.zeros(4, dtype=torch.long), {"temperature": -1.0})),
    ("logits", lambda: (torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long), {})),
    ("logits", lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), {})),
    ("logits", lambda: (torch.tensor(1.0), torch.tensor(0), {})),
    ("ignore_index", lambda: (torch.randn(4, 9), torch.zeros(4, dtype=torch.long), {"ignore_index": 1.5})),
]


@pytest.mark.parametrize("fn", ["torch", "triton", "reference"])
@pytest.mark.parametrize(("arg", "make"), _BAD)
def test_bad_input_raises(fn, arg, make):
    logits, labels, kw = make()
    with pytest.raises(ValueError, match=arg):
        if fn == "reference":
            logprobs_reference(logits, labels, **kw)
        else:
            logprobs(logits, labels, impl=fn, **kw)


def test_bad_impl_raises():
    with pytest.raises(ValueError, match="impl"):
        logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("entropy", [False, True])
def test_triton_cuda_qwen_vocab(seed, entropy):
    """The compiled kernels at a moderate size: 2 x 257 rows (odd), bf16, V = 151936 (Qwen2)."""
    logits = (torch.randn(2, 257, 151936, device="cuda", dtype=torch.float64) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 151936, (2, 257), device="cuda")
    labels[:, :40] = IGNORE  # a prompt
    labels[1, 100:] = IGNORE
    shape = labels.shape
    g_logp = torch.randn(shape, device="cuda")
    g_h = torch.randn(shape, device="cuda") if entropy else None
    truth = run("reference", logits.double(), labels, g_logp.double(), None if g_h is None else g_h.double())
    ref = run("reference", logits, labels, g_logp, g_h)
    for impl in ("triton", "torch"):
        got = run(impl, logits, labels, g_logp, g_h)
        assert_close_to_truth(f"{impl} logp", got[0], ref[0], truth[0], dtype=torch.float32)
        if entropy:
            assert_close_to_truth(f"{impl} entropy", got[1], ref[1], truth[1], dtype=torch.float32)
        assert_close_to_truth(f"{impl} grad", got[2], ref[2], truth[2], dtype=torch.bfloat16)


@pytest.mark.gpu
def test_triton_cuda_inplace_and_autotune(seed, monkeypatch):
    """inplace_backward on a sliced view gives the same gradient; so does FASTRL_AUTOTUNE=1 (its search
    restores the gradient buffer between trials), to within one bf16 rounding."""
    logits = (torch.randn(3, 65, 151936, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, 151936, (3, 64), device="cuda")
    g_logp, g_h = torch.randn(3, 64, device="cuda"), torch.randn(3, 64, device="cuda")
    want = run("triton", logits[:, :-1], labels, g_logp, g_h)
    x = logits.clone().requires_grad_()
    lp, h = logprobs((x * 1)[:, :-1], labels, return_entropy=True, impl="triton", inplace_backward=True)
    ((lp * g_logp).sum() + (h * g_h).sum()).backward()
    assert torch.equal(x.grad[:, :-1], want[2]) and bool((x.grad[:, -1] == 0).all())
    monkeypatch.setenv("FASTRL_AUTOTUNE", "1")
    got = run("triton", logits[:, :-1], labels, g_logp, g_h)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # One bf16 rounding apart at most: an ulp is at most 2**-7 of the value.
    torch.testing.assert_close(got[2], want[2], rtol=2**-7, atol=1e-6)
