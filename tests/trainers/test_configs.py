"""Every example config in configs/ parses onto its run config (the command is in the file name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastrl.config import load_config
from fastrl.trainers.dpo import DPORunConfig
from fastrl.trainers.grpo import GRPORunConfig
from fastrl.trainers.sft import SFTRunConfig

# trl_*.yaml are TRL config files (tests/test_trl_config.py), not fastrl ones
CONFIGS = sorted(
    p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml") if not p.name.startswith("trl_")
)
KINDS = {"sft": SFTRunConfig, "dpo": DPORunConfig, "grpo": GRPORunConfig}


def test_there_are_examples():
    assert {p.name.split("_")[0] for p in CONFIGS} == set(KINDS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_parses(path):
    cfg = load_config(KINDS[path.name.split("_")[0]], path, [])
    assert cfg.model.name_or_path and cfg.data.dataset and cfg.train.max_steps > 0
    if isinstance(cfg, GRPORunConfig):
        from fastrl.rewards import resolve_reward

        assert [resolve_reward(r) for r in cfg.grpo.reward_funcs]


def test_unknown_key_is_refused_with_suggestions():
    with pytest.raises(ValueError, match="grpo.num_generations"):
        load_config(GRPORunConfig, None, ["--grpo.num_generation", "4"])
