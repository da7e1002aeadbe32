"""``optim.fused``: torch's fused AdamW (transformers' default ``adamw_torch_fused``) where it can run, and a
resume keeps the resuming run's choice, whatever the checkpoint's run used."""

from __future__ import annotations

import pytest
import torch

from fastrl.trainers.core import OptimConfig, adamw_fused
from fastrl.trainers.sft import run_sft

from .conftest import addition_rows
from .test_checkpoint_runs import _cfg


def test_fused_resolution():
    cpu = [torch.zeros(3, requires_grad=True)]
    meta = [torch.zeros(3, device="meta", requires_grad=True)]
    assert adamw_fused(cpu, None) is True and adamw_fused(cpu, True) is True
    assert adamw_fused(cpu, False) is None  # the for-loop
    assert adamw_fused(meta, None) is None  # no fused kernel there: the for-loop
    with pytest.raises(ValueError, match="optim.fused=True needs .* got devices \\['meta'\\]"):
        adamw_fused(meta, True)
    with pytest.raises(ValueError, match="optim.fused must be true, false or null"):
        OptimConfig(fused="yes")


def _spy_fused(monkeypatch) -> list:
    seen = []
    step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        seen.append(self.param_groups[0]["fused"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    return seen


def test_resume_keeps_the_resuming_runs_kernel(tiny_dir, tmp_path, seed, monkeypatch):
    seen = _spy_fused(monkeypatch)

    def cfg(folder, max_steps, **train):  # constant lr: the schedule does not depend on max_steps
        c = _cfg(tiny_dir, tmp_path / folder, max_steps=max_steps, seed=seed, **train)
        c.optim.schedule = "constant"
        return c

    whole = run_sft(cfg("whole", 4), dataset=addition_rows())
    assert seen == [True] * 4  # the default on a CPU
    seen.clear()
    first = cfg("split", 2)
    first.optim.fused = False
    run_sft(first, dataset=addition_rows())
    # optim.fused is not fingerprinted (the same optimisation, another kernel): the resume is accepted.
    rest = cfg("split", 4, resume_from_checkpoint="auto")
    out = run_sft(rest, dataset=addition_rows())
    # Steps 2-4 fused. (Loading the state may add a zero-lr step of its own to build the state tensors:
    # torch.distributed.checkpoint's set_optimizer_state_dict does.)
    assert [r["step"] for r in out["history"]] == [2, 3, 4]
    assert seen[:2] == [None, None] and seen[2:] == [True] * (len(seen) - 2) and len(seen) >= 5
    # The same trajectory up to the two kernels' rounding (about an ulp per step).
    assert out["loss"] == pytest.approx(whole["loss"], rel=1e-5)
