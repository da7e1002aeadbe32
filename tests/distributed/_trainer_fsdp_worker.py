"""Worker for tests/distributed/test_trainer_fsdp.py, launched as ``torchrun --nproc_per_node 2 -m <this>``.

The trainers as a user runs them under torchrun (CPU, gloo; ``train.fsdp`` on by default): SFT with
selective activation checkpointing, DPO with a sharded frozen reference, GRPO (dapo, a KL reference,
a checkpoint and the final export), and every GRPO loss_type with its gradients recorded. Rank 0 writes
the histories, the recorded gradients and the gathered SFT/DPO weights to ``<out>/result.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from fastrl.distributed._state_dict import full_model_state_dict
from fastrl.distributed.env import dist_info
from fastrl.distributed.fsdp import is_fsdp
from fastrl.models import ModelConfig, load_model_and_tokenizer
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.sft import run_sft
from tests.trainers.invariance import recorded_grads

# Adam's first steps are ~lr * sign(grad): a large eps keeps rounding noise on gradients that are zero in
# exact arithmetic (the attention key bias's) from turning into full-size weight differences.
_OPTIM = dict(lr=3e-3, adam_eps=1e-3, schedule="constant")


def _train(out, seed: int, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=3, progress_bar=False, export_final=True, seed=seed)
    return TrainConfig(**{**base, **kw})


def sft_rows() -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(0, 10, 3)]


def sft_config(model_dir: str, out, *, seed: int, per_device_batch_size: int):
    from fastrl.data import DataConfig
    from fastrl.trainers.sft import SFTRunConfig

    return SFTRunConfig(
        model=ModelConfig(name_or_path=model_dir),
        data=DataConfig(max_length=32),
        optim=OptimConfig(**_OPTIM),
        train=_train(out, seed, per_device_batch_size=per_device_batch_size, gradient_accumulation_steps=2),
    )


def sft_dcp_config(model_dir: str, out, *, seed: int, per_device_batch_size: int):
    """4 AdamW steps, a sharded checkpoint at step 2 (whatever the world size), final weights exported."""
    cfg = sft_config(model_dir, out, seed=seed, per_device_batch_size=per_device_batch_size)
    cfg.train.max_steps, cfg.train.save_steps, cfg.train.checkpoint_format = 4, 2, "sharded"
    return cfg


def dpo_rows() -> list[dict]:
    """Chosen: the right sum; rejected: a wrong one of varying length (pairs of unequal token counts)."""
    return [
        {
            "prompt": f"{i % 10}+{3 * i % 10}=",
            "chosen": str(i % 10 + 3 * i % 10),
            "rejected": "7" + "9" * (i % 3),
        }
        for i in range(24)
    ]


def dpo_config(model_dir: str, out, *, seed: int, per_device_batch_size: int, lora: bool = False):
    from fastrl.data import DataConfig
    from fastrl.models import LoraConfig
    from fastrl.trainers.dpo import DPORunConfig

    return DPORunConfig(
        model=ModelConfig(name_or_path=model_dir),
        lora=LoraConfig(enabled=lora, r=4, alpha=8),
        data=DataConfig(max_length=32),
        optim=OptimConfig(**_OPTIM),
        train=_train(out, seed, per_device_batch_size=per_device_batch_size),
    )


def grpo_rows() -> list[dict]:
    return [{"prompt": f"{i % 10}+{(7 * i) % 10}="} for i in range(16)]


def spread_reward(completions, **_):
    """A deterministic reward that differs between almost any two texts (random tiny models rarely stop
    early, so a length reward would often be the same for the whole batch: zero advantages)."""
    return [(sum(map(ord, c)) % 11) / 10 for c in completions]


class PromptEngine:
    """Deterministic completions: a function of the prompt and of the copy's index in its group (copies
    are consecutive), so a 2-rank run and a 1-process run generate the same rollouts."""

    def __init__(self, eos_id: int, group: int):
        self.eos_id, self.group = eos_id, group

    def generate(self, prompt_ids, params):
        from fastrl.engine import GenerationOutput

        ids = []
        for i, p in enumerate(prompt_ids):
            k = i % self.group
            n = 1 + (sum(p) + 3 * k) % params.max_new_tokens
            ids.append([p[(j + k) % len(p)] for j in range(n)] + [self.eos_id] * (n < params.max_new_tokens))
        return GenerationOutput(
            completion_ids=ids,
            logprobs=[[-1.0] * len(c) for c in ids],
            truncated=[self.eos_id not in c for c in ids],
        )

    def sync_weights(self, model):
        pass


def grpo_config(model_dir: str, out, *, seed: int, per_device_batch_size: int = 4):
    from fastrl.losses.grpo_config import GRPOLossConfig
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig

    return GRPORunConfig(
        model=ModelConfig(name_or_path=model_dir),
        optim=OptimConfig(**{**_OPTIM, "lr": 1e-2}),
        train=_train(
            out,
            seed,
            max_steps=2,
            per_device_batch_size=per_device_batch_size,
            save_steps=1,
            export_final=True,
        ),
        grpo=GRPOConfig(
            num_generations=2, max_completion_length=4, reward_funcs=["unused"], scale_rewards="batch"
        ),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.04),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    out, seed = Path(a.out), a.seed
    torch.set_num_threads(1)
    assert dist_info().world_size == 2
    result: dict = {}

    # SFT: per-rank batch 2 (the single-process reference takes 4), selective AC under FSDP.
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
    cfg = sft_config(a.model, out / "sft", seed=seed, per_device_batch_size=2)
    cfg.train.activation_checkpointing = "selective"
    with recorded_grads() as grads:
        res = run_sft(cfg, model=model, tokenizer=tok, dataset=sft_rows())
    result["sft_grads"] = grads
    assert dist.is_initialized() and dist.get_backend() == "gloo" and is_fsdp(model)
    result["sft_history"], result["sft_weights"] = res["history"], full_model_state_dict(model)

    # Sharded (DCP) checkpoints: an uninterrupted 4-step run saving at step 2, the same run resumed from
    # that checkpoint on 2 ranks, and a run resumed from a checkpoint one process wrote (1 -> 2 ranks).
    cfg = sft_dcp_config(a.model, out / "sft_dcp", seed=seed, per_device_batch_size=2)
    res = run_sft(cfg, dataset=sft_rows())
    model = None
    result["sft_dcp_history"] = res["history"]
    cfg = sft_dcp_config(a.model, out / "sft_dcp_resumed", seed=seed, per_device_batch_size=2)
    cfg.train.resume_from_checkpoint = str(out / "sft_dcp" / "checkpoint-2")
    result["sft_dcp_resumed_history"] = run_sft(cfg, dataset=sft_rows())["history"]
    cfg = sft_dcp_config(a.model, out / "sft_dcp_from_1", seed=seed, per_device_batch_size=2)
    cfg.train.resume_from_checkpoint = str(out / "sft_dcp_ws1" / "checkpoint-2")
    result["sft_dcp_from_1_history"] = run_sft(cfg, dataset=sft_rows())["history"]

    # LoRA by name: built on the meta device, the base weights loaded shard by shard, the adapters seeded
    # after the load (the same as one process's).
    from fastrl.models import LoraConfig
    from fastrl.trainers.common import _meta_init_applies

    cfg = sft_config(a.model, out / "sft_lora_meta", seed=seed, per_device_batch_size=2)
    cfg.lora, cfg.train.export_final = LoraConfig(enabled=True, r=4, alpha=8), False
    result["sft_lora_meta_applies"] = _meta_init_applies(cfg)
    with recorded_grads() as grads:
        res = run_sft(cfg, dataset=sft_rows())
    result["sft_lora_meta"] = (res["history"], grads)

    # FSDP options: HSDP on a 2-D mesh (2 replicas x 1 shard), and CPU offload (unpinned on the CPU,
    # with a warning) without resharding after forward; both must train as the plain run does.
    cfg = sft_config(a.model, out / "sft_hsdp", seed=seed, per_device_batch_size=2)
    cfg.train.fsdp_replicate, cfg.train.export_final = 2, False
    cfg.train.activation_checkpointing = "op"  # op-level selective AC under FSDP2 changes no number either
    result["sft_hsdp_history"] = run_sft(cfg, dataset=sft_rows())["history"]
    cfg = sft_config(a.model, out / "sft_offload", seed=seed, per_device_batch_size=2)
    cfg.train.fsdp_cpu_offload, cfg.train.export_final, cfg.train.fsdp_reshard_after_forward = (
        True,
        False,
        False,
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["sft_offload_history"] = run_sft(cfg, dataset=sft_rows())["history"]
    result["offload_warnings"] = [str(w.message) for w in caught if "pinned memory" in str(w.message)]

    # Meta-device init: what each rank holds after loading its shards, and the weights it loaded.
    from fastrl.distributed.fsdp import apply_fsdp
    from fastrl.distributed.meta_init import build_on_meta, materialize_and_load

    model = build_on_meta(ModelConfig(name_or_path=a.model))
    apply_fsdp(model)
    report = materialize_and_load(model, a.model, torch.device("cpu"))
    reports = [None] * dist_info().world_size
    dist.all_gather_object(reports, report)
    result["meta_reports"], result["meta_weights"] = reports, full_model_state_dict(model)

    from fastrl.trainers.dpo import run_dpo

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
    with recorded_grads() as grads:
        res = run_dpo(dpo_config(a.model, out / "dpo", seed=seed, per_device_batch_size=2), model=model,
                      tokenizer=tok, dataset=dpo_rows())  # fmt: skip
    result["dpo_grads"] = grads
    result["dpo_history"], result["dpo_weights"] = res["history"], full_model_state_dict(model)

    from fastrl.trainers.grpo import run_grpo

    res = run_grpo(
        grpo_config(a.model, out / "grpo", seed=seed), dataset=grpo_rows(), reward_funcs=[spread_reward]
    )
    result["grpo_history"] = res["history"]
    result["grpo_generate_calls"] = res["generate_calls"]
    # Resume on 2 ranks from its checkpoint-1 (collective load, each rank's own RNG and rollout state).
    cfg = grpo_config(a.model, out / "grpo_resumed", seed=seed)
    cfg.train.resume_from_checkpoint = str(out / "grpo" / "checkpoint-1")
    res = run_grpo(cfg, dataset=grpo_rows(), reward_funcs=[spread_reward])
    result["grpo_resumed_history"] = res["history"]

    # DPO with LoRA: the reference is the policy with its adapter disabled, through the sharded wrapper.
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
    cfg = dpo_config(a.model, out / "dpo_lora", seed=seed, per_device_batch_size=2, lora=True)
    res = run_dpo(cfg, model=model, tokenizer=tok, dataset=dpo_rows())
    result["dpo_lora_history"], result["dpo_lora_weights"] = res["history"], full_model_state_dict(model)

    # GRPO with deterministic rollouts: comparable with one process on the whole generation batch.
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
    cfg = grpo_config(a.model, out / "grpo_exact", seed=seed)
    res = run_grpo(cfg, model=model, tokenizer=tok, dataset=grpo_rows(), reward_funcs=[spread_reward],
                   engine=PromptEngine(tok.eos_token_id, cfg.grpo.num_generations))  # fmt: skip
    result["grpo_exact_history"], result["grpo_exact_weights"] = res["history"], full_model_state_dict(model)
    # Every GRPO loss_type at world size 2 and 2 micro-steps per rank (per_device_batch_size 2): the loss,
    # gradients and every metric of one process with the step's 8 completions in one micro-batch.
    from fastrl.losses.grpo_config import LOSS_TYPES
    from tests.trainers.invariance import grpo_cfg

    for loss_type in sorted(LOSS_TYPES):
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
        cfg = grpo_cfg(a.model, out / f"grpo_{loss_type}", seed, 2, 2, loss_type)
        with recorded_grads() as grads:
            res = run_grpo(cfg, model=model, tokenizer=tok, dataset=grpo_rows(), reward_funcs=[spread_reward],
                           engine=PromptEngine(tok.eos_token_id, cfg.grpo.num_generations))  # fmt: skip
        result[f"grpo_{loss_type}"] = (res["history"], grads)
    # Two passes over each round (num_iterations 2): old log-probs and the entropy from the rollout's pass,
    # ratios away from 1 at the second step.
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=a.model))
    cfg = grpo_cfg(a.model, out / "grpo_mu2", seed, 2, 2, "bnpo", iters=2)
    with recorded_grads() as grads:
        res = run_grpo(cfg, model=model, tokenizer=tok, dataset=grpo_rows(), reward_funcs=[spread_reward],
                       engine=PromptEngine(tok.eos_token_id, cfg.grpo.num_generations))  # fmt: skip
    result["grpo_mu2"] = (res["history"], grads)
    if dist_info().rank == 0:
        torch.save(result, out / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
