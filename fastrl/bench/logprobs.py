"""Suite ``logprobs``: per-token log-probs from materialised logits, weighted sum, backward to the logits.

loss = sum_t w_t logp_t with logp_t = logits[t, label_t] - logsumexp(logits[t]); w is random with a
quarter of the tokens masked (w = 0). Floor: the memory traffic of reading the logits twice (forward and
backward) and writing their gradient once, 3 N V bytes-per-element, at the card's bandwidth ceiling.
"""

from __future__ import annotations

import torch

from fastrl.bench import peers
from fastrl.bench.common import backward_method, backward_step, compiled_method, randn
from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method


def shapes(ctx: BenchContext) -> list[dict[str, int]]:
    if ctx.quick:
        return [dict(B=2, T=16, V=512)]
    if ctx.gpu_shapes:
        return [dict(B=16, T=1024, V=151936)]  # benchmarks/ANCHORS.md: N=16384, V=151936
    return [dict(B=4, T=128, V=16384)]


def _inputs(ctx: BenchContext, B: int, T: int, V: int):
    def make():
        logits = randn(ctx, B, T, V, scale=2.0, requires_grad=True)
        labels = torch.randint(0, V, (B, T), device=ctx.device)
        weights = torch.rand(B, T, device=ctx.device) * (torch.rand(B, T, device=ctx.device) > 0.25)
        return {"logits": logits, "labels": labels, "w": weights}

    return make


def _weighted(logp: torch.Tensor, inputs) -> torch.Tensor:
    return (logp.float() * inputs["w"]).sum()


def _fastrl(impl: str):
    def loss(inputs):
        from fastrl.ops.logprobs import logprobs

        return _weighted(logprobs(inputs["logits"], inputs["labels"], impl=impl), inputs)

    return loss


def _inplace(impl: str):
    return lambda inputs: _inplace_step(inputs, impl)


def _inplace_step(inputs, impl: str):
    """The gradient is written into the logits buffer: run on a private copy, restored before each run."""
    from fastrl.ops.logprobs import logprobs

    pristine = inputs["logits"].detach()
    logits = pristine.clone().requires_grad_(True)

    step = backward_step(
        lambda: _weighted(logprobs(logits, inputs["labels"], impl=impl, inplace_backward=True), inputs)
    )

    def prepare():
        logits.grad = None
        with torch.no_grad():
            logits.copy_(pristine)

    step.prepare = prepare
    return step


def _liger(inputs):
    ce = inputs.get("_liger")
    if ce is None:
        ce = inputs["_liger"] = peers.liger_cross_entropy()
    logits = inputs["logits"]
    V = logits.shape[-1]
    # Liger writes the gradient into its input in the forward: it gets a clone, as in benchmarks/ANCHORS.md.
    neg = ce(logits.reshape(-1, V).clone(), inputs["labels"].reshape(-1))
    return _weighted(-neg.view(inputs["labels"].shape), inputs)


def methods(ctx: BenchContext) -> list[Method]:
    eager = lambda inp: _weighted(peers.eager_fp32_logp(inp["logits"], inp["labels"]), inp)
    return [
        backward_method("eager fp32 log_softmax + gather", eager),
        backward_method(
            "TRL-style selective_log_softmax (row loop)",
            lambda inp: _weighted(peers.rowloop_logp(inp["logits"], inp["labels"]), inp),
        ),
        compiled_method(ctx, "torch.compile of the eager path", eager),
        backward_method(
            "Liger cross entropy, reduction='none'", _liger, kind="peer", note="one clone included"
        ),
        backward_method("fastrl logprobs", _fastrl(ctx.fastrl_impl), kind="fastrl"),
        Method(name="fastrl logprobs, inplace_backward", setup=_inplace(ctx.fastrl_impl), kind="fastrl"),
    ]


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    cases = []
    for s in shapes(ctx):
        B, T, V = s["B"], s["T"], s["V"]
        N, elt = B * T, torch.finfo(ctx.dtype).bits // 8
        cases.append(
            Case(
                suite="logprobs",
                name=f"N={N} V={V}",
                shape=dict(N=N, V=V, B=B, T=T),
                make_inputs=_inputs(ctx, B, T, V),
                methods=methods(ctx),
                floor_ms=ceil.memory_ms(3 * N * V * elt),
                floor_note=f"3 N V x {elt} B (read, read, write) at {ceil.tbps:.3g} TB/s",
                grad_bytes=N * V * elt,
                reference="eager fp32 log_softmax + gather",
            )
        )
    return cases
