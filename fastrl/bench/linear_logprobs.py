"""Suite ``linear_logprobs``: hidden states -> lm_head -> per-token log-probs, weighted sum, backward to
the hidden states and the weight.

loss = sum_t w_t logp_t, logp_t = (h_t W^T)[label_t] - logsumexp(h_t W^T). Floor: the three matrix
products (logits, grad_hidden, grad_weight), 6 N H V flops, at the card's matmul ceiling; the same three
products run alone with ``torch.mm`` (cuBLAS on a GPU, the CPU BLAS elsewhere) are the measured baseline.
"""

from __future__ import annotations

import torch

from fastrl.bench import peers
from fastrl.bench.common import backward_method, compiled_method, lm_head, products_baseline, randn
from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip

BASELINE_PARTS = "logits, grad_hidden, grad_weight"  # the baseline: "three cuBLAS products (...)"


def shapes(ctx: BenchContext) -> list[dict[str, int]]:
    """[B, T] tokens of hidden size H, vocabulary V. GPU: benchmarks/ANCHORS.md's shapes A and B."""
    if ctx.quick:
        return [dict(B=2, T=8, H=32, V=256)]
    if ctx.gpu_shapes:
        return [dict(B=8, T=1024, H=1536, V=151936), dict(B=16, T=1024, H=3584, V=152064)]
    return [dict(B=2, T=128, H=256, V=8192)]


def linear_inputs(ctx: BenchContext, B: int, T: int, H: int, V: int) -> dict:
    return {
        "hidden": randn(ctx, B, T, H, requires_grad=True),
        "weight": lm_head(ctx, V, H),
        "labels": torch.randint(0, V, (B, T), device=ctx.device),
    }


def eager_logits_logp(inputs, logp_fn) -> torch.Tensor:
    """``logp_fn(logits, labels)`` on logits materialised in the input dtype, [B, T]."""
    logits = inputs["hidden"] @ inputs["weight"].t()
    return logp_fn(logits, inputs["labels"])


def cce_logp(inputs, *, exact: bool) -> torch.Tensor:
    hidden, labels = inputs["hidden"], inputs["labels"]
    neg = peers.cce_neg_logp(
        hidden.reshape(-1, hidden.shape[-1]), inputs["weight"], labels.reshape(-1), exact=exact
    )
    return -neg.float().view(labels.shape)


def _weighted(logp, inputs):
    return (logp.float() * inputs["w"]).sum()


def _fastrl(ctx: BenchContext, recompute: bool):
    def loss(inputs):
        from fastrl.ops.linear_logprobs import linear_logprobs

        if recompute and ctx.fastrl_impl == "torch":
            raise Skip("recompute is a fused Triton kernel: GPU only (the CPU runs Triton only in tests)")
        hidden, labels = inputs["hidden"], inputs["labels"]
        kwargs = {"recompute": True} if recompute else {"impl": ctx.fastrl_impl}
        logp = linear_logprobs(
            hidden.reshape(-1, hidden.shape[-1]), inputs["weight"], labels.reshape(-1), **kwargs
        )
        return _weighted(logp.view(labels.shape), inputs)

    return loss


def logits_methods(ctx: BenchContext, on_logp, *, first_shape: bool = True) -> list[Method]:
    """The methods every hidden -> lm_head -> log-probs suite measures, the loss being ``on_logp(logp,
    inputs)`` ([B, T] log-probs to a scalar): the matrix-product baseline, eager fp32, TRL-style selective
    log-softmax, ``torch.compile`` of the eager path and Cut Cross-Entropy (approximate and exact)."""
    eager = lambda inp: on_logp(eager_logits_logp(inp, peers.eager_fp32_logp), inp)
    return [
        products_baseline(ctx, "three", BASELINE_PARTS, "hidden", "weight"),
        backward_method("eager fp32", eager),
        backward_method(
            "TRL-style selective log-softmax",
            lambda inp: on_logp(eager_logits_logp(inp, peers.rowloop_logp), inp),
        ),
        compiled_method(ctx, "torch.compile of the eager path", eager, first_shape=first_shape),
        backward_method(
            "Cut Cross-Entropy, gradient filtering on",
            lambda inp: on_logp(cce_logp(inp, exact=False), inp),
            kind="peer",
            note="approximate gradients",
        ),
        backward_method(
            "Cut Cross-Entropy, exact", lambda inp: on_logp(cce_logp(inp, exact=True), inp), kind="peer"
        ),
    ]


def methods(ctx: BenchContext, *, first_shape: bool = True) -> list[Method]:
    return logits_methods(ctx, _weighted, first_shape=first_shape) + [
        backward_method("fastrl linear_logprobs", _fastrl(ctx, False), kind="fastrl"),
        backward_method(
            "fastrl linear_logprobs, recompute", _fastrl(ctx, True), kind="fastrl", note="no logits buffer"
        ),
    ]


def matmul_case(
    suite: str,
    ctx: BenchContext,
    ceil: Ceilings,
    s: dict[str, int],
    make_inputs,
    method_list,
    *,
    reference: str,
    flops_per_nhv: int = 6,
    tokens: int | None = None,
) -> Case:
    """A case whose floor is ``flops_per_nhv * N H V`` flops; its gradients are those of h and W."""
    B, T, H, V = s["B"], s["T"], s["H"], s["V"]
    N = tokens if tokens is not None else B * T
    elt = torch.finfo(ctx.dtype).bits // 8
    return Case(
        suite=suite,
        name=f"N={N} H={H} V={V}",
        shape=dict(N=N, H=H, V=V, B=B, T=T),
        make_inputs=make_inputs,
        methods=method_list,
        floor_ms=ceil.matmul_ms(flops_per_nhv * N * H * V),
        floor_note=f"{flops_per_nhv} N H V flops at {ceil.tflops:.4g} TFLOP/s",
        grad_bytes=(N * H + V * H) * elt,
        reference=reference,
    )


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    cases = []
    for i, s in enumerate(shapes(ctx)):

        def make(s=s):
            inputs = linear_inputs(ctx, s["B"], s["T"], s["H"], s["V"])
            inputs["w"] = torch.rand(s["B"], s["T"], device=ctx.device)
            return inputs

        cases.append(
            matmul_case(
                "linear_logprobs",
                ctx,
                ceil,
                s,
                make,
                methods(ctx, first_shape=i == 0),
                reference="eager fp32",
            )
        )
    return cases
