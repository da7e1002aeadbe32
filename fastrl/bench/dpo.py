"""Suite ``dpo``: chosen and rejected hidden states -> lm_head -> summed log-probs -> sigmoid DPO loss, with
the reference model's log-probs computed in the same call under no_grad (no precompute).

The first quarter of each sequence is prompt (label -100). loss = ``fastrl.bench.peers.dpo_loss`` (beta
0.1) on sums of completion-token log-probs. Floor: policy 6 N H V plus reference 2 N H V flops (N counts
chosen and rejected tokens); baseline: the four matrix products alone (policy logits, reference logits,
grad_hidden, grad_weight; cuBLAS on a GPU).
"""

from __future__ import annotations

import torch

from fastrl.bench import peers
from fastrl.bench.common import (
    backward_method,
    backward_step,
    compiled_method,
    lm_head,
    products_baseline,
    randn,
)
from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method
from fastrl.bench.linear_logprobs import matmul_case

BASELINE_PARTS = "policy, reference, grad_hidden, grad_weight"  # "four cuBLAS products (...)"


def shapes(ctx: BenchContext) -> list[dict[str, int]]:
    """B pairs of T tokens each, hidden size H, vocabulary V."""
    if ctx.quick:
        return [dict(B=1, T=8, H=32, V=256)]
    if ctx.gpu_shapes:
        return [dict(B=4, T=1024, H=1536, V=151936)]  # benchmarks/ANCHORS.md: N = 2 x 4 x 1024
    return [dict(B=2, T=64, H=256, V=8192)]


def dpo_inputs(ctx: BenchContext, s: dict[str, int]):
    def make():
        B, T, H, V = s["B"], s["T"], s["H"], s["V"]
        weight = lm_head(ctx, V, H)
        inputs = {
            "hidden_chosen": randn(ctx, B, T, H, requires_grad=True),
            "hidden_rejected": randn(ctx, B, T, H, requires_grad=True),
            "weight": weight,
        }
        for side in ("chosen", "rejected"):
            labels = torch.randint(0, V, (B, T), device=ctx.device)
            labels[:, : T // 4] = -100
            inputs[f"labels_{side}"] = labels
            inputs[f"ref_hidden_{side}"] = inputs[f"hidden_{side}"].detach() + randn(ctx, B, T, H, scale=0.1)
        inputs["ref_weight"] = (weight.detach() + lm_head(ctx, V, H, requires_grad=False) * 0.1).contiguous()
        # Stacked [chosen; rejected] views for the baseline and for Liger (built once, outside the timing).
        inputs["ref_hidden_both"] = torch.cat([inputs["ref_hidden_chosen"], inputs["ref_hidden_rejected"]])
        inputs["labels_both"] = torch.cat([inputs["labels_chosen"], inputs["labels_rejected"]])
        inputs["hidden_both_const"] = torch.cat([inputs["hidden_chosen"], inputs["hidden_rejected"]]).detach()
        return inputs

    return make


def _eager(logp_fn):
    def loss(inp):
        B = inp["hidden_chosen"].shape[0]
        labels = inp["labels_both"]
        hidden = torch.cat([inp["hidden_chosen"], inp["hidden_rejected"]])
        sums = peers.masked_sum(logp_fn(hidden @ inp["weight"].t(), peers.safe_labels(labels)), labels)
        with torch.no_grad():
            ref_logits = inp["ref_hidden_both"] @ inp["ref_weight"].t()
            ref = peers.masked_sum(logp_fn(ref_logits, peers.safe_labels(labels)), labels)
        return peers.dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:])

    return loss


def _fastrl_setup(impl: str):
    return lambda inputs: _fastrl_step(inputs, impl)


def _fastrl_step(inputs, impl: str):
    from fastrl.losses.fused_dpo import FusedLinearDPOLoss

    module = FusedLinearDPOLoss(beta=peers.DPO_BETA, loss_type="sigmoid", impl=impl)

    return backward_step(
        lambda: module(
            inputs["hidden_chosen"],
            inputs["hidden_rejected"],
            inputs["weight"],
            inputs["labels_chosen"],
            inputs["labels_rejected"],
            ref_weight=inputs["ref_weight"],
            ref_hidden_chosen=inputs["ref_hidden_chosen"],
            ref_hidden_rejected=inputs["ref_hidden_rejected"],
        )[0]
    )


def _liger_setup(inputs):
    module = peers.liger_dpo(beta=peers.DPO_BETA, use_ref_model=True)

    def loss():
        hidden = torch.cat([inputs["hidden_chosen"], inputs["hidden_rejected"]])  # Liger takes them stacked
        out = module(
            inputs["weight"],
            hidden,
            inputs["labels_both"],
            ref_input=inputs["ref_hidden_both"],
            ref_weight=inputs["ref_weight"],
        )
        return peers.first(out)

    return backward_step(loss)


def methods(ctx: BenchContext) -> list[Method]:
    return [
        products_baseline(
            ctx,
            "four",
            BASELINE_PARTS,
            "hidden_both_const",
            "weight",
            ref_keys=("ref_hidden_both", "ref_weight"),
        ),  # fmt: skip
        backward_method("eager fp32", _eager(peers.eager_fp32_logp)),
        backward_method("TRL-style selective log-softmax", _eager(peers.rowloop_logp)),
        compiled_method(ctx, "torch.compile of the eager path", _eager(peers.eager_fp32_logp)),
        Method(name="Liger LigerFusedLinearDPOLoss", setup=_liger_setup, kind="peer"),
        Method(name="fastrl FusedLinearDPOLoss", setup=_fastrl_setup(ctx.fastrl_impl), kind="fastrl"),
    ]


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    cases = []
    for s in shapes(ctx):
        tokens = 2 * s["B"] * s["T"]
        case = matmul_case(
            "dpo",
            ctx,
            ceil,
            s,
            dpo_inputs(ctx, s),
            methods(ctx),
            reference="eager fp32",
            flops_per_nhv=8,
            tokens=tokens,
        )
        case.floor_note = f"policy 6 N H V + reference 2 N H V flops at {ceil.tflops:.4g} TFLOP/s"
        cases.append(case)
    return cases
