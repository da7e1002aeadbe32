"""Suite ``grpo``: hidden states -> lm_head -> log-probs -> GRPO loss (two-sided clip, k3 KL), backward to
the hidden states and the weight. The loss is ``fastrl.bench.peers.grpo_loss`` (beta 0.04, eps 0.2,
normalised by the number of completion tokens); fastrl and Liger are configured to the same loss.

old/ref log-probs are the policy's own log-probs plus small noise, so ratios sit near 1 as in training.
Floor and baseline as in ``linear_logprobs``: 6 N H V flops, the three matrix products alone.
"""

from __future__ import annotations

import dataclasses

import torch

from fastrl.bench import peers
from fastrl.bench.common import accepted_kwargs, backward_step
from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip
from fastrl.bench.linear_logprobs import linear_inputs, logits_methods, matmul_case, shapes


@torch.no_grad()
def _policy_logp(hidden, weight, labels, rows: int = 1024) -> torch.Tensor:
    """fp32 log-probs computed a chunk of tokens at a time (bounded memory)."""
    h, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out = torch.empty(lab.shape, device=hidden.device, dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        out[i : i + rows] = peers.eager_fp32_logp(h[i : i + rows] @ weight.t(), lab[i : i + rows])
    return out.view(labels.shape)


def grpo_inputs(ctx: BenchContext, s: dict[str, int]):
    def make():
        B, T = s["B"], s["T"]
        inputs = linear_inputs(ctx, B, T, s["H"], s["V"])
        logp = _policy_logp(inputs["hidden"].detach(), inputs["weight"].detach(), inputs["labels"])
        lengths = torch.randint(T // 2, T + 1, (B,), device=ctx.device)
        inputs["mask"] = (torch.arange(T, device=ctx.device) < lengths[:, None]).float()
        inputs["old_logp"] = logp + 0.02 * torch.randn_like(logp)
        inputs["ref_logp"] = logp + 0.05 * torch.randn_like(logp)
        inputs["advantages"] = torch.randn(B, device=ctx.device)
        return inputs

    return make


def _loss_on(logp, inp):
    return peers.grpo_loss(logp.float(), inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"])


def _fastrl_setup(impl: str):
    return lambda inputs: _fastrl_step(inputs, impl)


def _fastrl_step(inputs, impl: str):
    try:
        from fastrl.losses.fused_grpo import FusedLinearGRPOLoss
        from fastrl.losses.grpo import GRPOLossConfig
    except ImportError as err:
        raise Skip(f"fastrl GRPO loss not importable ({err})") from err
    names = {f.name for f in dataclasses.fields(GRPOLossConfig)}
    wanted = {"beta": peers.GRPO_BETA, "epsilon_low": peers.GRPO_EPS, "epsilon_high": peers.GRPO_EPS}
    wanted["loss_type"] = "bnpo"  # TRL's name for the token mean over the batch, our normaliser
    if "epsilon_low" not in names:
        wanted["epsilon"] = peers.GRPO_EPS
    module = FusedLinearGRPOLoss(impl=impl, **{k: v for k, v in wanted.items() if k in names})

    return backward_step(
        lambda: module(
            inputs["hidden"],
            inputs["weight"],
            inputs["labels"],
            inputs["old_logp"],
            inputs["advantages"],
            inputs["mask"],
            ref_logp=inputs["ref_logp"],
        )[0]
    )


def _liger_setup(inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # ImportError -> "skipped"

    kwargs = dict(beta=peers.GRPO_BETA, epsilon_low=peers.GRPO_EPS, epsilon_high=peers.GRPO_EPS)
    kwargs.update(loss_type="bnpo", use_ref_model=True)
    module = LigerFusedLinearGRPOLoss(**accepted_kwargs(LigerFusedLinearGRPOLoss, kwargs))

    return backward_step(
        lambda: peers.first(
            module(
                inputs["hidden"],
                inputs["weight"],
                inputs["labels"],
                inputs["mask"],
                inputs["advantages"],
                ref_per_token_logps=inputs["ref_logp"],
                old_per_token_logps=inputs["old_logp"],
            )
        )
    )


def methods(ctx: BenchContext, *, first_shape: bool = True) -> list[Method]:
    liger = Method(
        name="Liger LigerFusedLinearGRPOLoss", setup=_liger_setup, kind="peer", note="chunked PyTorch"
    )
    fastrl = Method(name="fastrl FusedLinearGRPOLoss", setup=_fastrl_setup(ctx.fastrl_impl), kind="fastrl")
    return logits_methods(ctx, _loss_on, first_shape=first_shape) + [liger, fastrl]


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    return [
        matmul_case(
            "grpo",
            ctx,
            ceil,
            s,
            grpo_inputs(ctx, s),
            methods(ctx, first_shape=i == 0),
            reference="eager fp32",
        )
        for i, s in enumerate(shapes(ctx))
    ]
