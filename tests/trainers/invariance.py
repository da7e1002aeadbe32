"""Helpers for the world-size and accumulation-split invariance tests (tests/trainers/test_split_invariance.py
and tests/distributed/test_trainer_fsdp.py): the gradients of every optimizer step, and comparisons of
whole runs at fp32's 1e-5 relative."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

# fp32 sums taken in another order (micro-batches, ranks' reduce-scatter): a few ulps of the largest
# terms. The loss gets an absolute floor: on-policy GRPO losses are ~0 (zero-mean advantages), so their
# relative error is meaningless.
REL, LOSS_ABS, ABS = 1e-5, 1e-6, 1e-7
NOT_COMPARED = ("step", "elapsed_s")


@contextlib.contextmanager
def recorded_grads():
    """Yields a list that gets, at every AdamW step, the gradients of its parameters (clipped, in order;
    full tensors under FSDP: a collective, so every rank must record)."""
    steps: list[list[torch.Tensor]] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and hasattr(g, "full_tensor"):
                    g = g.full_tensor()
                grads.append(None if g is None else g.detach().clone().cpu())
        steps.append(grads)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield steps
    finally:
        torch.optim.AdamW.step = original


def assert_same_history(got: list[dict], want: list[dict], *, what: str = "") -> None:
    """Every logged key of every record (but the timing) within REL of the reference."""
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want):
        assert set(g) == set(w), (what, sorted(set(g) ^ set(w)))
        for k in sorted(set(w) - set(NOT_COMPARED)):
            if isinstance(w[k], float) and math.isnan(w[k]):
                assert math.isnan(g[k]), (what, w["step"], k, g[k])
                continue
            tol = LOSS_ABS if k == "loss" else ABS
            assert g[k] == pytest.approx(w[k], rel=REL, abs=tol), (what, w["step"], k, g[k], w[k])


def assert_same_grads(got: list[list], want: list[list], *, what: str = "") -> None:
    """Each step's gradients within REL of the reference, relative to each tensor's largest entry."""
    assert len(got) == len(want) > 0, what
    for step, (gs, ws) in enumerate(zip(got, want), start=1):
        assert len(gs) == len(ws), what
        for i, (g, w) in enumerate(zip(gs, ws)):
            assert (g is None) == (w is None), (what, step, i)
            if w is None:
                continue
            scale = float(w.abs().max())
            torch.testing.assert_close(g, w, rtol=REL, atol=REL * scale, msg=f"{what} step {step} grad {i}")


# no clipping: a clipped gradient would hide a normaliser off by a constant factor
OPTIM = dict(lr=3e-3, adam_eps=1e-3, schedule="constant", max_grad_norm=0.0)


def train_cfg(out, seed, bs, ga, **kw):
    from fastrl.trainers.core import TrainConfig

    return TrainConfig(
        output_dir=str(out), max_steps=2, per_device_batch_size=bs, gradient_accumulation_steps=ga,
        progress_bar=False, export_final=False, seed=seed, **kw,
    )  # fmt: skip


# Per loss type, options that bring in more of its metrics: the KL to a reference (kl), engine
# log-probs (is_weight/*), sequence-level ratios (GSPO).
GRPO_OPTIONS = {
    "grpo": dict(beta=0.04),
    "bnpo": dict(beta=0.04),
    "dr_grpo": dict(),
    "dapo": dict(beta=0.04),
    "cispo": dict(epsilon_high=5.0),
    "sapo": dict(),
    "luspo": dict(importance_sampling_level="sequence"),
    "vespo": dict(is_mode="token_truncate"),
}


ENGINE_LOGPROBS = ("cispo", "vespo")


def grpo_cfg(tiny_dir, out, seed, bs, ga, loss_type, *, spg=None, iters=1):
    """Deterministic-rollout GRPO (``PromptEngine``, ``spread_reward``) of 2 steps; cispo and vespo with
    engine log-probs (their importance-sampling metrics)."""
    from fastrl.losses.grpo_config import GRPOLossConfig
    from fastrl.models import ModelConfig
    from fastrl.trainers.core import OptimConfig
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig

    return GRPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        optim=OptimConfig(**{**OPTIM, "lr": 1e-2}),
        train=train_cfg(out, seed, bs, ga),
        grpo=GRPOConfig(
            num_generations=2, max_completion_length=4, reward_funcs=["unused"], scale_rewards="batch",
            steps_per_generation=spg, num_iterations=iters, use_engine_logprobs=loss_type in ENGINE_LOGPROBS,
        ),
        loss=GRPOLossConfig(loss_type=loss_type, **GRPO_OPTIONS[loss_type]),
    )  # fmt: skip
