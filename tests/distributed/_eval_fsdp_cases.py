"""The runs tests/distributed/test_eval_fsdp.py makes on 2 ranks (the worker) and in one process."""

from __future__ import annotations

from fastrl.models import ModelConfig
from fastrl.trainers.core import OptimConfig, TrainConfig

# Large AdamW eps: rounding noise on exactly-zero gradients stays small (as in _trainer_fsdp_worker).
_OPTIM = dict(lr=3e-3, adam_eps=1e-3, schedule="constant")


def _per_rank(n: int) -> int:
    """A share of the global micro-batch ``n``: 2 ranks together take what one process takes."""
    from fastrl.distributed.env import dist_info

    return n // dist_info().world_size


def _train(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=2, eval_steps=1, progress_bar=False, export_final=False)
    return TrainConfig(**{**base, **kw})


def sft_case(model_dir: str, out):
    from fastrl.trainers.sft import SFTRunConfig, run_sft

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(2)]
    held = [{"prompt": f"{a}-{a}=", "completion": "0" * (a + 1)} for a in range(7)]
    cfg = SFTRunConfig(
        model=ModelConfig(name_or_path=model_dir),
        optim=OptimConfig(**_OPTIM),
        train=_train(out, per_device_batch_size=_per_rank(4), per_device_eval_batch_size=2),
    )
    return run_sft(cfg, dataset=rows, eval_dataset=held)


def dpo_case(model_dir: str, out):
    from fastrl.trainers.dpo import DPORunConfig, run_dpo

    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a * b + 2) * 2}
        for a in range(4)
        for b in range(2)
    ]
    held = [{"prompt": f"{a}*2=", "chosen": str(2 * a), "rejected": "x" * (a + 1)} for a in range(5)]
    cfg = DPORunConfig(
        model=ModelConfig(name_or_path=model_dir),
        optim=OptimConfig(**_OPTIM),
        train=_train(out, per_device_batch_size=_per_rank(2), per_device_eval_batch_size=2),
    )
    return run_dpo(cfg, dataset=rows, eval_dataset=held)


def tokens(completion_ids, **_):
    return [float(len(c)) for c in completion_ids]


def grpo_case(model_dir: str, out):
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo

    cfg = GRPORunConfig(
        model=ModelConfig(name_or_path=model_dir),
        optim=OptimConfig(**_OPTIM),
        grpo=GRPOConfig(num_generations=2, max_completion_length=3),
        train=_train(out, max_steps=1, per_device_batch_size=4, per_device_eval_batch_size=1),
    )
    prompts = [{"prompt": f"{i}+{i}="} for i in range(8)]
    held = [{"prompt": f"{i}-{i}="} for i in range(3)]
    return run_grpo(cfg, dataset=prompts, eval_dataset=held, reward_funcs=[tokens])
