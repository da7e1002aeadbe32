"""``grpo.share_prompt_forward``: a GRPO run with each distinct prompt run once equals the padded run."""

from __future__ import annotations

import pytest

import fastrl.models.shared_prompt as shared_prompt
from fastrl.losses.grpo_config import GRPOLossConfig
from fastrl.trainers.grpo import GRPOConfig, run_grpo

from .conftest import assert_same_history
from .test_grpo import FIX, _cfg, prompt_rows


def test_shared_prompt_run_equals_padded_run(tiny_dir, tmp_path, monkeypatch, seed):
    """Old log-probs (one micro-step per optimizer step, rounds of 2) and a KL reference: the training,
    old and reference passes all take the shared path, and the run's history is the padded run's."""
    shared_calls = []
    groups = shared_prompt.prompt_groups

    def counting_groups(ids, mask):
        out = groups(ids, mask)
        shared_calls.append((ids.shape[0], out[0].numel()))
        return out

    monkeypatch.setattr(shared_prompt, "prompt_groups", counting_groups)
    keys = ("loss", "grad_norm", "kl", "reward", "ratio/mean", "entropy")
    history = {}
    for share in (False, True):
        g = GRPOConfig(
            num_generations=4,
            max_completion_length=4,
            steps_per_generation=2,
            reward_funcs=[f"{FIX}:length_reward"],
            share_prompt_forward=share,
        )
        cfg = _cfg(
            tiny_dir, tmp_path / str(share), grpo=g, max_steps=3, seed=seed, loss=GRPOLossConfig(beta=0.1)
        )
        history[share] = run_grpo(cfg, dataset=prompt_rows())["history"]
        if not share:
            assert shared_calls == []  # the padded run never groups prompts
    # 2 rounds x 2 micro-batches x (old, ref, train) passes, each of 8 rows holding 2 distinct prompts
    assert len(shared_calls) >= 8 and all(u < b for b, u in shared_calls), shared_calls
    assert_same_history(history[True], history[False], keys)


def test_config_help():
    field = GRPOConfig.__dataclass_fields__["share_prompt_forward"]
    assert field.default is True and "exact" in field.metadata["help"]
    with pytest.raises(TypeError):
        GRPOConfig(True)  # keyword-only
