"""``train.num_train_epochs`` turned into ``train.max_steps`` once the trainer knows its data.

TRL's count (``transformers.Trainer``): ``steps_per_epoch = max(1, ceil(ceil(N / (B * W)) / A))`` with
``N`` the training units, ``B`` the units per micro-step and rank, ``W`` the world size and ``A`` the
gradient-accumulation steps, and ``max_steps = ceil(epochs * steps_per_epoch)``. The units are SFT's
examples (or packs), DPO's pairs, and for GRPO completion passes: each of the ``N`` prompts gives
``num_generations`` completions that are trained on ``num_iterations`` times, so ``N`` counts
``prompts * num_generations * num_iterations`` against ``B = per_device_batch_size`` completions.
The count depends only on the data and the config, so a resume derives the same ``max_steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import math


def steps_for_epochs(
    epochs: float, units: int, per_micro_step: int, world_size: int, accumulation: int
) -> int:
    """``ceil(epochs * max(1, ceil(ceil(units / (per_micro_step * world_size)) / accumulation)))``."""
    micro = math.ceil(units / (per_micro_step * world_size))
    return max(1, math.ceil(epochs * max(1, math.ceil(micro / accumulation))))


def resolve_max_steps(cfg, units: int):
    """``cfg`` itself when ``train.max_steps`` is set; else a copy whose ``train.max_steps`` comes from
    ``train.num_train_epochs`` over ``units`` (see the module docstring), announced on rank 0."""
    from fastrl.distributed.env import dist_info

    train = cfg.train
    if train.num_train_epochs is None:
        return cfg
    info = dist_info()
    n = steps_for_epochs(
        train.num_train_epochs,
        units,
        train.per_device_batch_size,
        info.world_size,
        train.gradient_accumulation_steps,
    )
    resolved = copy.copy(train)  # not dataclasses.replace: its check refuses both fields set
    resolved.max_steps = n
    if info.is_main:
        print(f"train.num_train_epochs {train.num_train_epochs:g} over {units} units: max_steps {n}")
    return dataclasses.replace(cfg, train=resolved)
