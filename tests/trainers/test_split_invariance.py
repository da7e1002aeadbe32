"""One process, the same global batch per optimizer step split into 1, 2 or 4 micro-batches: the loss, the
gradients and every logged metric must not change (fp32, 1e-5 relative), for SFT, DPO and every GRPO
loss_type. (World size 2 against one process: tests/distributed/test_trainer_fsdp.py.) Also the metric
reduction itself and the global generation_batch_size schedule."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.losses.grpo_config import LOSS_TYPES
from fastrl.models import ModelConfig, load_model_and_tokenizer
from fastrl.trainers.core import OptimConfig
from fastrl.trainers.metrics import Metric, reduce_step
from tests.distributed._trainer_fsdp_worker import PromptEngine, dpo_rows, grpo_rows, spread_reward

from .invariance import (
    ENGINE_LOGPROBS,
    GRPO_OPTIONS,
    OPTIM,
    assert_same_grads,
    assert_same_history,
    grpo_cfg,
    recorded_grads,
    train_cfg,
)

_train = train_cfg


def _run(runner, cfg, rows, **kw):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=cfg.model.name_or_path))
    if kw.get("engine") == "prompt":
        kw["engine"] = PromptEngine(tok.eos_token_id, cfg.grpo.num_generations)
    with recorded_grads() as grads:
        history = runner(cfg, model=model, tokenizer=tok, dataset=rows, **kw)["history"]
    return history, grads


def test_sft_split_invariant(tiny_dir, tmp_path, seed):
    """Examples of unequal lengths: per-micro-batch token means would weigh them differently."""
    from fastrl.data import DataConfig
    from fastrl.trainers.sft import SFTConfig, SFTRunConfig, run_sft

    runs = {}
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        cfg = SFTRunConfig(
            model=ModelConfig(name_or_path=tiny_dir), data=DataConfig(max_length=32),
            optim=OptimConfig(**OPTIM), train=_train(tmp_path / f"{bs}x{ga}", seed, bs, ga),
            sft=SFTConfig(completion_only_loss=False),
        )  # fmt: skip
        rows = [{"text": "1+2=3" * (1 + i % 5)} for i in range(24)]
        runs[bs, ga] = _run(run_sft, cfg, rows)
    want_hist, want_grads = runs[8, 1]
    for split in ((4, 2), (2, 4)):
        assert_same_history(runs[split][0], want_hist, what=f"sft {split}")
        assert_same_grads(runs[split][1], want_grads, what=f"sft {split}")


def test_dpo_split_invariant(tiny_dir, tmp_path, seed):
    from fastrl.data import DataConfig
    from fastrl.trainers.dpo import DPOConfig, DPORunConfig, run_dpo

    runs = {}
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        cfg = DPORunConfig(
            model=ModelConfig(name_or_path=tiny_dir), data=DataConfig(max_length=32),
            optim=OptimConfig(**OPTIM), train=_train(tmp_path / f"{bs}x{ga}", seed, bs, ga),
            dpo=DPOConfig(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]),
        )  # fmt: skip
        runs[bs, ga] = _run(run_dpo, cfg, dpo_rows())
    for split in ((2, 2), (1, 4)):
        assert_same_history(runs[split][0], runs[4, 1][0], what=f"dpo {split}")
        assert_same_grads(runs[split][1], runs[4, 1][1], what=f"dpo {split}")


def test_grpo_options_cover_every_loss_type():
    assert set(GRPO_OPTIONS) == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_grpo_split_invariant(tiny_dir, tmp_path, seed, loss_type):
    """8 completions per step, as one micro-batch or two; deterministic rollouts (PromptEngine)."""
    from fastrl.trainers.grpo import run_grpo

    runs = {}
    for bs, ga in ((8, 1), (4, 2)):
        cfg = grpo_cfg(tiny_dir, tmp_path / f"{bs}x{ga}", seed, bs, ga, loss_type)
        runs[bs, ga] = _run(run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt")
    hist = runs[8, 1][0]
    assert {"completion_length_min", "ratio/max", "entropy"} <= set(hist[0])
    if loss_type in ENGINE_LOGPROBS:
        assert "is_weight/mean" in hist[0]
    assert_same_history(runs[4, 2][0], hist, what=loss_type)
    assert_same_grads(runs[4, 2][1], runs[8, 1][1], what=loss_type)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_grpo_split_invariant_across_rounds(tiny_dir, tmp_path, seed, loss_type):
    """Two optimizer steps per round of 8 (old log-probs computed at generation): 4 completions a step as
    one micro-batch (steps_per_generation 2) or two (4); and one step over two rounds (bnpo's step token
    count then needs the second round before the first micro-step)."""
    from fastrl.trainers.grpo import run_grpo

    runs = {}
    for bs, ga, spg in ((4, 1, 2), (2, 2, 4)):
        cfg = grpo_cfg(tiny_dir, tmp_path / f"{bs}x{ga}x{spg}", seed, bs, ga, loss_type, spg=spg)
        runs[bs, ga, spg] = _run(run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt")
    assert_same_history(runs[2, 2, 4][0], runs[4, 1, 2][0], what=loss_type)
    assert_same_grads(runs[2, 2, 4][1], runs[4, 1, 2][1], what=loss_type)
    if loss_type == "bnpo":  # a step of 8 over two rounds of 4 against one round of 8 in one micro-batch
        # (group-scaled rewards: a round's batch std would depend on the round's size)
        got, want = [], []
        for (bs, ga, spg), res in (((4, 2, 1), got), ((8, 1, None), want)):
            cfg = grpo_cfg(tiny_dir, tmp_path / f"r{bs}x{ga}", seed, bs, ga, loss_type, spg=spg)
            cfg.grpo.scale_rewards = "group"
            res += _run(run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt")
        for g, w in zip(got[0], want[0]):
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6)
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
        assert_same_grads(got[1], want[1], what="bnpo over two rounds")


def test_reduce_step():
    micro = [
        {"loss": 1.0, "tok": Metric.mean(6.0, 3), "num_x": 2, "lo": Metric.min(0.5), "hi": Metric.max(2.0)},
        {"loss": 3.0, "tok": Metric.mean(1.0, 1), "num_x": 5, "lo": Metric.min(math.nan),
         "hi": Metric.max(4)},
        {"loss": torch.tensor([0.0, 4.0]), "tok": Metric.mean(0.0, 0), "num_x": torch.tensor(1),
         "lo": Metric.min(-1.0), "hi": Metric.max(math.nan)},
    ]  # fmt: skip
    out = reduce_step(micro)
    assert out == {"hi": 4.0, "lo": -1.0, "loss": 2.0, "num_x": 8.0, "tok": 7.0 / 4}
    assert reduce_step([{"m": Metric.mean(0.0, 0)}, {"m": Metric.mean(0.0, 0)}]) == {"m": 0.0}
    assert math.isnan(reduce_step([{"m": Metric.max(math.nan)}])["m"])
    with pytest.raises(ValueError, match="metric 'tok' is reduced as 'mean' and as 'sum'"):
        reduce_step([{"tok": Metric.mean(1, 1)}, {"tok": Metric.sum(1)}])
    with pytest.raises(ValueError, match="Metric.kind"):
        Metric(1.0, 1.0, "median")
    assert Metric.from_json(Metric.mean(3, 2).to_json()) == Metric(3.0, 2.0, "mean")
    assert Metric.from_json(0.5) == 0.5


def test_generation_batch_size_is_global(tiny_dir, tmp_path, monkeypatch):
    """TRL's meaning: the completions of a round over all ranks; each rank's share is derived."""
    from fastrl.trainers.grpo import schedule

    cfg = grpo_cfg(tiny_dir, tmp_path, 0, 4, 2, "dapo")
    assert schedule(cfg, world_size=1) == (8, 2)
    assert schedule(cfg, world_size=4) == (32, 2)  # default: per_device_batch_size x spg x WORLD_SIZE
    cfg.grpo.generation_batch_size = 32
    cfg.grpo.steps_per_generation = None
    assert schedule(cfg, world_size=2) == (32, 4)
    assert schedule(cfg, world_size=4) == (32, 2)
    with pytest.raises(ValueError, match=r"generation_batch_size \(32, global\) must be a multiple of "
                       r"per_device_batch_size x WORLD_SIZE \(4 x 3 = 12\)"):  # fmt: skip
        schedule(cfg, world_size=3)
    cfg.grpo.steps_per_generation = 2
    with pytest.raises(ValueError, match=r"must equal per_device_batch_size x steps_per_generation x "
                       r"WORLD_SIZE \(4 x 2 x 2 = 16\)"):  # fmt: skip
        schedule(cfg, world_size=2)
    cfg.grpo.generation_batch_size, cfg.grpo.num_generations = 8, 8
    cfg.train.per_device_batch_size, cfg.grpo.steps_per_generation = 2, 2
    with pytest.raises(ValueError, match=r"each rank's share of grpo.generation_batch_size \(8 / WORLD_SIZE 2"
                       r" = 4\) must be a multiple of grpo.num_generations \(8\)"):  # fmt: skip
        schedule(cfg, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.grpo.generation_batch_size, cfg.grpo.num_generations, cfg.grpo.steps_per_generation = 16, 2, None
    assert schedule(cfg) == (16, 4)  # the process group's world size by default


def test_grpo_two_passes_split_invariant(tiny_dir, tmp_path, monkeypatch, seed):
    """num_iterations 2: old log-probs and the entropy come from the rollout's pass; the rollout's token
    means and extremes are Metrics the loop reduces over ranks (checked at world size 2 elsewhere)."""
    import fastrl.trainers.grpo as grpo

    rounds = []
    original = grpo.make_rollout

    def spy(*args):
        out = original(*args)
        rounds.append(out[1])
        return out

    monkeypatch.setattr(grpo, "make_rollout", spy)
    runs = {}
    for bs, ga in ((8, 1), (4, 2)):
        cfg = grpo_cfg(tiny_dir, tmp_path / f"{bs}x{ga}", seed, bs, ga, "bnpo", iters=2)
        runs[bs, ga] = _run(grpo.run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt")
    assert runs[8, 1][0][1]["ratio/mean"] != 1.0
    assert_same_history(runs[4, 2][0], runs[8, 1][0], what="bnpo mu=2")
    assert_same_grads(runs[4, 2][1], runs[8, 1][1], what="bnpo mu=2")
    kinds = {k: v.kind for k, v in rounds[0].items() if isinstance(v, Metric)}
    assert kinds == {
        "entropy": "mean",
        "completion_length": "mean",
        "completion_length_min": "min",
        "completion_length_max": "max",
    }


@pytest.mark.parametrize("trainer", ["sft", "grpo_bnpo"])
def test_resume_with_step_lookahead_is_bit_identical(tiny_dir, tmp_path, monkeypatch, seed, trainer):
    """SFT draws a step's micro-batches at its first micro-step, bnpo makes the rounds a step spans at
    its first (3 micro-steps a step, rounds of 2: steps straddle rounds): a run killed mid-step resumes
    from the last checkpoint to the very numbers of the uninterrupted run."""
    from fastrl.data import DataConfig
    from fastrl.trainers.grpo import GRPOStep, run_grpo
    from fastrl.trainers.sft import SFTRunConfig, SFTStep, run_sft

    from .conftest import InterruptedRunError, interrupt_after

    def make(out):
        if trainer == "sft":
            cfg = SFTRunConfig(
                model=ModelConfig(name_or_path=tiny_dir), data=DataConfig(max_length=32),
                optim=OptimConfig(**OPTIM), train=train_cfg(out, seed, 2, 3),
            )  # fmt: skip
            rows = [{"text": "1+2=3" * (1 + i % 5)} for i in range(10)]
            return cfg, lambda c: run_sft(c, dataset=rows), SFTStep
        cfg = grpo_cfg(tiny_dir, out, seed, 2, 3, "bnpo", spg=2)
        kw = dict(dataset=grpo_rows(), reward_funcs=[spread_reward])

        def go(c):
            model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
            engine = PromptEngine(tok.eos_token_id, c.grpo.num_generations)
            return run_grpo(c, model=model, tokenizer=tok, engine=engine, **kw)

        return cfg, go, GRPOStep

    cfg, go, cls = make(tmp_path / "full")
    cfg.train.max_steps = 4
    full = go(cfg)["history"]
    cfg, go, cls = make(tmp_path / "cut")
    cfg.train.max_steps, cfg.train.save_steps = 4, 1
    with monkeypatch.context() as m:
        interrupt_after(m, cls, 4)  # dies in step 2's second micro-step; checkpoint-1 falls mid-round
        with pytest.raises(InterruptedRunError):
            go(cfg)
    cfg.train.resume_from_checkpoint = "auto"
    resumed = go(cfg)["history"]
    keys = [k for k in full[0] if k != "elapsed_s"]
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in full[1:]]


def test_lora_adapters_seeded_after_load(tiny_dir):
    """init_lora_adapters: PEFT's default distribution, a function of the seed and the names only, so the
    meta-device path (adapters built on meta, base weights from the files) gives the loaded path's model."""
    from fastrl.distributed.meta_init import build_on_meta, init_lora_adapters, materialize_and_load
    from fastrl.models import LoraConfig, apply_lora

    lora = LoraConfig(enabled=True, r=4, alpha=8)
    loaded = apply_lora(load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))[0], lora)
    assert init_lora_adapters(loaded, 7) == 28
    meta = apply_lora(build_on_meta(ModelConfig(name_or_path=tiny_dir)), lora)
    materialize_and_load(meta, tiny_dir, torch.device("cpu"))
    init_lora_adapters(meta, 7)
    want, got = loaded.state_dict(), meta.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    a = {k: v.clone() for k, v in want.items() if "lora_A" in k}
    assert all(float(v.abs().max()) <= 64**-0.5 and float(v.abs().max()) > 0.5 * 64**-0.5 for v in a.values())
    assert all(not v.any() for k, v in want.items() if "lora_B" in k)
    assert len({float(v.sum()) for v in a.values()}) == len(a)  # each adapter its own draw
    init_lora_adapters(loaded, 8)
    assert not torch.equal(
        next(iter(a.values())), next(v for k, v in loaded.state_dict().items() if "lora_A" in k)
    )
