"""GRPO end to end on a tiny local model: the decoupled generation schedule, reward rises, exact resume in
the middle of a generation round, LoRA with a KL reference, reward failures and missing rewards."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.losses.grpo_config import GRPOLossConfig
from fastrl.models import LoraConfig, ModelConfig, apply_lora, load_model_and_tokenizer
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, GRPOStep, run_grpo

from .conftest import InterruptedRunError, assert_same_history, interrupt_after

FIX = "tests.trainers.rewards_fixtures"


def prompt_rows(n: int = 32) -> list[dict]:
    return [{"prompt": f"{i % 10}+{(7 * i) % 10}=", "answer": str(i % 10 + (7 * i) % 10)} for i in range(n)]


def count_a(completions, **_):
    """The share of 'a' characters: easy for a random tiny model to learn."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def _cfg(tiny_dir, out, *, grpo=None, loss=None, **train):
    base = dict(
        output_dir=str(out), max_steps=4, per_device_batch_size=8, progress_bar=False, export_final=False
    )
    return GRPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        train=TrainConfig(**{**base, **train}),
        grpo=grpo
        or GRPOConfig(num_generations=4, max_completion_length=4, reward_funcs=[f"{FIX}:length_reward"]),
        loss=loss or GRPOLossConfig(),
    )


class CountingEngine:
    """Wraps the real engine; records the trainer's micro-step index at each generate call."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def generate(self, prompt_ids, params):
        self.log.append(len(prompt_ids))
        return self.inner.generate(prompt_ids, params)

    def sync_weights(self, model):
        self.inner.sync_weights(model)


@pytest.mark.parametrize(
    ("ga", "spg", "iters", "old_needed"),
    [(2, None, 1, False), (1, 2, 1, True), (1, 1, 3, True), (4, 2, 2, False), (3, 2, 1, True)],
)
def test_generation_schedule(tiny_dir, tmp_path, monkeypatch, seed, ga, spg, iters, old_needed):
    from fastrl.engine import EngineConfig, build_engine

    calls, micro_seen, old_seen = [], [], []
    original = GRPOStep.micro_step

    def spy(self, index):
        before = len(calls)
        out = original(self, index)
        micro_seen.append((index, len(calls) > before))
        old_seen.append("old_logp" in self.buffer[0])
        return out

    monkeypatch.setattr(GRPOStep, "micro_step", spy)
    g = GRPOConfig(
        num_generations=4, max_completion_length=3, steps_per_generation=spg, num_iterations=iters,
        reward_funcs=[f"{FIX}:length_reward"],
    )  # fmt: skip
    cfg = _cfg(
        tiny_dir, tmp_path, grpo=g, max_steps=3, gradient_accumulation_steps=ga, per_device_batch_size=4
    )
    model, tok = load_model_and_tokenizer(cfg.model)
    engine = CountingEngine(build_engine(EngineConfig(), model, tok), calls)
    out = run_grpo(cfg, model=model, tokenizer=tok, dataset=prompt_rows(), engine=engine)
    spg = spg or ga
    cycle = spg * iters
    assert [i for i, _ in micro_seen] == list(range(3 * ga))
    assert [i for i, gen in micro_seen if gen] == [i for i in range(3 * ga) if i % cycle == 0]
    assert calls == [4 * spg] * len(calls)  # generation_batch_size completions per round
    assert out["generate_calls"] == len(calls)
    assert set(old_seen) == {old_needed}


def test_reward_rises(tiny_dir, tmp_path, seed):
    g = GRPOConfig(num_generations=8, max_completion_length=4, temperature=1.0)
    cfg = _cfg(tiny_dir, tmp_path, grpo=g, max_steps=14, per_device_batch_size=32, seed=seed)
    out = run_grpo(cfg, dataset=prompt_rows(), reward_funcs=[count_a])
    rewards = [r["reward"] for r in out["history"]]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    for key in ("reward/count_a", "advantage_abs_mean", "completion_length", "clip_ratio/region", "loss"):
        assert all(math.isfinite(r[key]) for r in out["history"]), key


def test_resume_mid_round_is_exact(tiny_dir, tmp_path, monkeypatch, seed):
    """Rounds of 2 micro-steps (steps_per_generation=2, one micro-step per optimizer step): checkpoint-3
    falls inside the round generated at step 3, so the resumed run must reuse the saved rollouts."""
    g = GRPOConfig(
        num_generations=4,
        max_completion_length=3,
        steps_per_generation=2,
        reward_funcs=[f"{FIX}:length_reward"],
    )
    keys = ("loss", "grad_norm", "reward", "ratio/mean", "completion_length")
    full = run_grpo(_cfg(tiny_dir, tmp_path / "a", grpo=g, max_steps=5, seed=seed), dataset=prompt_rows())
    cfg = _cfg(tiny_dir, tmp_path / "b", grpo=g, max_steps=5, seed=seed, save_steps=3)
    with monkeypatch.context() as m:
        interrupt_after(m, GRPOStep, 4)
        with pytest.raises(InterruptedRunError):
            run_grpo(cfg, dataset=prompt_rows())
    cfg.train.resume_from_checkpoint = "auto"
    resumed = run_grpo(cfg, dataset=prompt_rows())
    assert resumed["generate_calls"] == 1  # step 4 reuses the saved round, step 5 generates
    assert_same_history(resumed["history"], full["history"][3:], keys)


def test_lora_with_kl_reference(tiny_dir, tmp_path, seed):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    cfg = _cfg(tiny_dir, tmp_path, max_steps=3, seed=seed, loss=GRPOLossConfig(beta=0.1))
    cfg.lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = apply_lora(model, cfg.lora)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    out = run_grpo(cfg, model=model, tokenizer=tok, dataset=prompt_rows())
    kls = [r["kl"] for r in out["history"]]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapter starts as the identity
    assert all(math.isfinite(k) for k in kls)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_missing_rewards_are_counted(tiny_dir, tmp_path, seed):
    g = GRPOConfig(num_generations=4, max_completion_length=4, reward_funcs=[f"{FIX}:partial_judge"])
    out = run_grpo(_cfg(tiny_dir, tmp_path, grpo=g, max_steps=2, seed=seed), dataset=prompt_rows())
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["advantage_abs_mean"]) for r in out["history"])
    assert [r["no_reward_count"] for r in out["history"]] == [3.0, 3.0]  # completions 0, 3, 6 of 8


def test_bad_grpo_input(tiny_dir, tmp_path):
    bad = GRPOConfig(num_generations=4, max_completion_length=3, reward_funcs=[f"{FIX}:broken_reward"])
    with pytest.raises(RuntimeError, match="broken_reward"):
        run_grpo(_cfg(tiny_dir, tmp_path, grpo=bad), dataset=prompt_rows())
    with pytest.raises(ValueError, match="'prompt'"):
        run_grpo(_cfg(tiny_dir, tmp_path), dataset=[{"question": "x"}])
    g = GRPOConfig(num_generations=3, max_completion_length=3, reward_funcs=["exact_match"])
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        run_grpo(_cfg(tiny_dir, tmp_path, grpo=g), dataset=prompt_rows())
    g = GRPOConfig(num_generations=4, reward_funcs=["exact_match"], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="reward_weights"):
        run_grpo(_cfg(tiny_dir, tmp_path, grpo=g), dataset=prompt_rows())
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="rank")
    with pytest.raises(ValueError, match="reward_funcs"):
        run_grpo(_cfg(tiny_dir, tmp_path, grpo=GRPOConfig()), dataset=prompt_rows())


@pytest.mark.gpu
def test_grpo_bf16_autocast_on_cuda(tiny_dir, tmp_path, seed):
    """The CUDA path: bf16 autocast around the backbone, Triton log-prob kernels, the hf engine on the GPU."""
    g = GRPOConfig(num_generations=8, max_completion_length=4)
    cfg = _cfg(tiny_dir, tmp_path, grpo=g, max_steps=14, per_device_batch_size=32, seed=seed, device="cuda")
    out = run_grpo(cfg, dataset=prompt_rows(), reward_funcs=[count_a])
    rewards = [r["reward"] for r in out["history"]]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in out["history"])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


class ScriptedEngine:
    """Returns fixed completions (token ids of the tiny tokenizer) for every prompt, cycling."""

    def __init__(self, completions, truncated):
        self.completions, self.truncated = completions, truncated

    def generate(self, prompt_ids, params):
        from fastrl.engine import GenerationOutput

        n = len(prompt_ids)
        ids = [self.completions[i % len(self.completions)] for i in range(n)]
        return GenerationOutput(
            completion_ids=ids,
            logprobs=[[-1.0] * len(c) for c in ids],
            truncated=[self.truncated[i % len(self.truncated)] for i in range(n)],
        )

    def sync_weights(self, model):
        pass


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_rollout_masks(tiny_dir, tmp_path, mask_truncated):
    from fastrl.trainers.common import Reference, as_dataset
    from fastrl.trainers.grpo import prepare_prompts

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    eos, a = tok.eos_token_id, tok.convert_tokens_to_ids("a")
    # one stopped early (tokens after EOS must be dropped), one truncated, one stopped at the last token
    engine = ScriptedEngine([[a, eos, a, a], [a, a, a, a], [a, a, a, eos]], [False, True, False])
    g = GRPOConfig(
        num_generations=3, max_completion_length=4, mask_truncated_completions=mask_truncated,
        reward_funcs=["x"], shuffle_rollouts=False,
    )  # fmt: skip
    cfg = _cfg(tiny_dir, tmp_path, grpo=g, per_device_batch_size=3)
    rows = prepare_prompts(as_dataset(prompt_rows(3)), tok, cfg.data)
    step = GRPOStep(
        model, Reference(model, lora=False, needed=False), tok, rows, [count_a], engine, cfg, "cpu"
    )
    from fastrl.trainers.metrics import reduce_step

    loss, metrics = step.micro_step(0)
    metrics = reduce_step([metrics])  # the logged values (token means as Metric sums and counts)
    mb = step.buffer[0]
    want = [[1, 1, 0, 0], [0 if mask_truncated else 1] * 4, [1, 1, 1, 1]]
    assert mb["completion_mask"].tolist() == want
    assert mb["completion_ids"][0, :2].tolist() == [a, eos]
    assert metrics["truncated_frac"] == pytest.approx(1 / 3)
    assert metrics["completion_length"] == pytest.approx((2 + 4 + 4) / 3)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("ga", "spg", "old_needed"), [(2, None, False), (1, 2, True)])
def test_entropy_logged_without_an_extra_pass(tiny_dir, tmp_path, monkeypatch, seed, ga, spg, old_needed):
    """The entropy metric comes from the old-log-prob pass when the schedule needs one, else from the
    loss's own pass: the rollout never sweeps the vocabulary just for it."""
    import fastrl.trainers.rollout as rollout

    policy_passes = []
    original = rollout.completion_logps

    def spy(model, mb, **kw):
        policy_passes.append(kw.get("entropy", False))
        return original(model, mb, **kw)

    monkeypatch.setattr(rollout, "completion_logps", spy)
    g = GRPOConfig(
        num_generations=4, max_completion_length=3, steps_per_generation=spg,
        reward_funcs=[f"{FIX}:length_reward"], log_entropy=True,
    )  # fmt: skip
    cfg = _cfg(
        tiny_dir, tmp_path, grpo=g, max_steps=2, gradient_accumulation_steps=ga, per_device_batch_size=4
    )
    model, tok = load_model_and_tokenizer(cfg.model)
    out = run_grpo(cfg, model=model, tokenizer=tok, dataset=prompt_rows())
    assert bool(policy_passes) == old_needed  # beta = 0: no reference pass either
    vocab = model.config.vocab_size
    for record in out["history"]:
        assert 0.0 < record["entropy"] <= math.log(vocab) + 1e-4, record
