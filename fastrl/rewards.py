"""Reward functions and group-normalised advantages for GRPO.

A reward function is called as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` where
``columns`` are the dataset's other columns (one value per completion) and returns one float per completion,
or None / NaN for "no reward" (e.g. a function that only judges some prompts). Functions are named by a
built-in key (``exact_match``, ``partial_match``, ``numeric_match``, ``reverse_partial``...) or by
``"module:function"``.

Advantages (Shao et al. 2024, DeepSeekMath, eq. 3; Liu et al. 2025, Dr. GRPO, for ``scale_rewards="none"``):
``r_i = sum_f w_f r_{i,f}`` over the functions that scored completion i (NaN when none did),
``A_i = (r_i - mean_g(r)) / (std + eps)`` with mean and std over the scored completions of i's group
(``scale_rewards="group"``), the std over all scored completions (``"batch"``) or no division (``"none"``).
An unscored completion gets ``A_i = 0``; a group whose rewards are all equal gets zeros, never NaN.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

import torch

REWARDS: dict[str, Callable] = {}
SCALE_REWARDS = ("group", "batch", "none")


def register_reward(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn

    return deco


def _text(x) -> str:
    return x if isinstance(x, str) else x[-1]["content"] if isinstance(x, list) else str(x)


@register_reward("exact_match")
def exact_match(completions, answer, **_) -> list[float]:
    """1 when the stripped completion equals the stripped ``answer`` column, else 0."""
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


@register_reward("partial_match")
def partial_match(completions, answer, **_) -> list[float]:
    """Partial credit: characters equal to ``answer`` at the same position, divided by
    max(len(completion), len(answer)) (both stripped); 1 exactly when the two are equal."""
    out = []
    for c, a in zip(completions, answer):
        c, a = _text(c).strip(), str(a).strip()
        n = max(len(c), len(a))
        out.append(sum(x == y for x, y in zip(c, a)) / n if n else 1.0)
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


@register_reward("numeric_match")
def numeric_match(completions, answer, **_) -> list[float]:
    """1 when the completion's last number equals the answer's number (GSM8K style: the part after
    ``####`` when present), else 0."""
    out = []
    for c, a in zip(completions, answer):
        a = str(a).split("####")[-1]
        want, got = _last_number(a), _last_number(_text(c))
        out.append(float(want is not None and got is not None and abs(want - got) < 1e-6))
    return out


def resolve_reward(spec: str | Callable) -> Callable:
    """A built-in reward by name, ``"package.module:function"``, or a callable as is."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"reward function must be a name or 'module:function', got {spec!r}")
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {spec!r} could not be imported: {e}") from e
        return fn
    if spec not in REWARDS:
        raise ValueError(
            f"unknown reward function {spec!r}; built-ins are {sorted(REWARDS)}, or 'module:function'"
        )
    return REWARDS[spec]


def reward_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def compute_rewards(
    funcs: list[Callable],
    *,
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
) -> torch.Tensor:
    """[N, F] float32 rewards, NaN where a function gave None or NaN. A function that raises, or returns the
    wrong number of values, fails with a ``RuntimeError`` naming it."""
    n = len(completions)
    out = torch.full((n, len(funcs)), float("nan"))
    for j, fn in enumerate(funcs):
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        values = list(values) if values is not None else None
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise RuntimeError(
                f"reward function {name!r} must return {n} values (one per completion), got {got}"
            )
        for i, v in enumerate(values):
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[i, j] = float(v)
    return out


def combine_rewards(rewards_NF: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``sum_f w_f r_f`` over the functions that scored each completion; NaN where none did."""
    w = torch.tensor(weights, dtype=rewards_NF.dtype)
    scored = ~torch.isnan(rewards_NF)
    total = torch.where(scored, rewards_NF * w, torch.zeros_like(rewards_NF)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def _nan_mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over the non-NaN entries along ``dim`` (std 0 with fewer than two)."""
    ok = ~torch.isnan(x)
    count = ok.sum(dim, keepdim=True)
    x0 = torch.where(ok, x, torch.zeros_like(x))
    mean = x0.sum(dim, keepdim=True) / count.clamp(min=1)
    sq = torch.where(ok, (x - mean) ** 2, torch.zeros_like(x))
    var = sq.sum(dim, keepdim=True) / (count - 1).clamp(min=1)
    return mean, var.sqrt(), count


def group_advantages(
    rewards_N: torch.Tensor, num_generations: int, *, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [N] for N = groups x num_generations consecutive completions per prompt (see the module
    docstring), and metrics: group reward std, fraction of zero-std groups, unscored completions."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards_N.numel() % num_generations:
        raise ValueError(f"{rewards_N.numel()} rewards do not split into groups of {num_generations}")
    r_GK = rewards_N.float().view(-1, num_generations)
    mean, std_group, _ = _nan_mean_std(r_GK, 1)
    centred = r_GK - mean
    if scale_rewards == "group":
        centred = centred / (std_group + eps)
    elif scale_rewards == "batch":
        _, std_batch, _ = _nan_mean_std(r_GK.reshape(1, -1), 1)
        centred = centred / (std_batch + eps)
    adv = torch.nan_to_num(centred, nan=0.0).view(-1)
    std_g = std_group.view(-1)
    metrics = {
        "reward_std": float(std_g.mean()),
        "frac_reward_zero_std": float((std_g == 0).float().mean()),
        "no_reward_count": float(torch.isnan(rewards_N).sum()),
    }
    return adv, metrics
