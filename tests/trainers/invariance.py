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
