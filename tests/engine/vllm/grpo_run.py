"""GRPO end to end with a vLLM engine on the demo-like task of tests/trainers/test_grpo.py (reward: the
share of 'a' characters), importance-sampling correction with the engine's log-probs on."""

from __future__ import annotations

import math

from fastrl.engine import EngineConfig
from fastrl.losses.grpo_config import GRPOLossConfig
from fastrl.models import ModelConfig
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo


def count_a(completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


def rows(n: int = 32) -> list[dict]:
    return [{"prompt": f"{i % 10}+{(7 * i) % 10}=", "answer": str(i % 10 + (7 * i) % 10)} for i in range(n)]


def run_and_check(engine, model_dir: str, out_dir, *, steps: int = 12) -> list[float]:
    cfg = GRPORunConfig(
        model=ModelConfig(name_or_path=model_dir),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        train=TrainConfig(
            output_dir=str(out_dir), max_steps=steps, per_device_batch_size=32, progress_bar=False,
            export_final=False, seed=1,
        ),
        grpo=GRPOConfig(
            num_generations=8, max_completion_length=4, temperature=1.0, use_engine_logprobs=True
        ),
        loss=GRPOLossConfig(),
    )  # fmt: skip
    if isinstance(engine, EngineConfig):  # built by run_grpo from the config, as `fastrl grpo` does
        cfg.engine, engine = engine, None
    else:
        engine.cfg.verify_sync = False
    out = run_grpo(cfg, dataset=rows(), reward_funcs=[count_a], engine=engine)
    rewards = [r["reward"] for r in out["history"]]
    print("rewards:", [round(r, 3) for r in rewards])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert all(math.isfinite(r["loss"]) for r in out["history"])
    return rewards
