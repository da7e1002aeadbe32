"""Reward functions and group-normalised advantages for GRPO.

A reward function is called as TRL's ``GRPOTrainer`` calls one, so TRL reward functions run unchanged:
``f(prompts=..., completions=..., completion_ids=..., **columns)`` with ``columns`` the dataset's other
columns (one value per completion); for conversational prompts each completion is
``[{"role": "assistant", "content": text}]``, else the text. It returns one number per completion, or
None / NaN for "no reward" (e.g. a function that only judges some prompts). TRL's extra keywords
(``trainer_state``, ``log_extra``, ``log_metric``) are not passed. Functions are named by a built-in key
(``exact_match``, ``partial_match``, ``numeric_match``), by ``"module:function"`` or
``"path/to/file.py:function"``, or by TRL's dotted ``"module.function"``.

Advantages (Shao et al. 2024, DeepSeekMath, eq. 3; Liu et al. 2025, Dr. GRPO, for ``scale_rewards="none"``):
``r_i = sum_f w_f r_{i,f}`` over the functions that scored completion i (NaN when none did),
``A_i = (r_i - mean_g(r)) / (std + eps)`` with mean and std over the scored completions of i's group
(``scale_rewards="group"``), the std over all scored completions (``"batch"``) or no division (``"none"``).
An unscored completion gets ``A_i = 0``; a group whose rewards are all equal gets zeros, never NaN.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fastrl import FastRLWarning

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


class RewardError(ValueError, RuntimeError):
    """A reward function that cannot be found, cannot be called as fastrl calls it, raised, or returned
    something other than one number (or None) per completion. A user's error, so a ``ValueError`` (the CLI
    prints it as one line); also a ``RuntimeError``, which these errors were before."""


class RewardWarning(FastRLWarning):
    """A reward function gave no reward to any completion of a round (warned once per function)."""


_WARNED_NO_REWARD: set[str] = set()
# What fastrl passes to every reward function besides the dataset's columns (TRL's convention).
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")


def resolve_reward(spec: str | Callable, *, search: tuple[str | Path, ...] = ()) -> Callable:
    """A built-in reward by name, ``"module:function"`` / ``"path/to/file.py:function"`` / TRL's dotted
    ``"module.function"``, or a callable as is. A module that is not importable as it stands is looked for
    in the working folder, then in each folder of ``search`` (the CLI passes the config file's folder), so
    a ``rewards.py`` beside the config needs no ``PYTHONPATH``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"reward function must be a name or 'module:function', got {spec!r}")
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        module, _, name = spec.rpartition(":")
    elif "." in spec and not spec.endswith(".py"):
        module, _, name = spec.rpartition(".")  # TRL's CLI form: my_rewards.accuracy
    else:
        close = difflib.get_close_matches(spec, list(REWARDS), n=2)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise RewardError(
            f"unknown reward function {spec!r}; {hint}built-ins are {sorted(REWARDS)}, or give "
            "'module:function'"
        )
    if not module or not name:
        raise RewardError(f"reward function {spec!r} must look like 'module:function'")
    folders = [Path.cwd(), *(Path(d) for d in search)]
    mod = (
        _import_file(spec, module, folders)
        if module.endswith(".py")
        else _import_module(spec, module, folders)
    )
    fn = getattr(mod, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        where = getattr(mod, "__file__", None) or module
        raise RewardError(f"reward function {spec!r}: {where} has no {name!r}; it defines {found}")
    if not callable(fn):
        raise RewardError(f"reward function {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_module(spec: str, module: str, folders: list[Path]):
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != top:
            raise RewardError(f"reward function {spec!r}: importing {module!r} failed: {err}") from err
    except Exception as err:  # the user's module itself is broken (SyntaxError, a failing import...)
        raise RewardError(
            f"reward function {spec!r}: importing {module!r} failed: {type(err).__name__}: {err}"
        ) from err
    for folder in folders:
        if (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file():
            sys.path.insert(0, str(folder.resolve()))
            return _import_module(spec, module, [])
    looked = ", ".join(str(f) for f in dict.fromkeys(f.resolve() for f in folders))
    raise RewardError(
        f"reward function {spec!r}: no module {top!r} (looked on sys.path and in {looked or 'nothing else'})"
    )


def _import_file(spec: str, module: str, folders: list[Path]):
    candidates = [Path(module).expanduser()] if Path(module).is_absolute() else [f / module for f in folders]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RewardError(
            f"reward function {spec!r}: no file {module!r} (looked for {[str(p) for p in candidates]})"
        )
    name = f"fastrl_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(mod)
    except Exception as err:
        raise RewardError(
            f"reward function {spec!r}: running {str(path)!r} failed: {type(err).__name__}: {err}"
        ) from err
    sys.modules[name] = mod
    return mod


def reward_name(fn: Callable) -> str:
    inner = getattr(fn, "func", None)  # functools.partial
    return getattr(fn, "__name__", None) or getattr(inner, "__name__", None) or type(fn).__name__


def check_reward_signature(fn: Callable, columns: list[str]) -> None:
    """Raise ``RewardError`` when ``fn`` cannot be called with ``prompts``, ``completions``,
    ``completion_ids`` and the dataset's ``columns`` as keyword arguments (a parameter it needs that is none
    of them, or one of them it does not take and no ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    given = set(REWARD_ARGUMENTS) | set(columns)
    params = sig.parameters.values()
    name = reward_name(fn)
    needed = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in given
    ]
    if needed or any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in params):
        missing = needed or [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
        raise RewardError(
            f"reward function {name!r} needs {missing}, which are neither {list(REWARD_ARGUMENTS)} nor a "
            f"dataset column (the dataset has {sorted(columns)})"
        )
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        extra = sorted(given - {p.name for p in params})
        if extra:
            raise RewardError(
                f"reward function {name!r} does not take {extra}, which fastrl passes as keywords "
                f"({list(REWARD_ARGUMENTS)} and every dataset column, as TRL does); add **kwargs"
            )


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def compute_rewards(
    funcs: list[Callable],
    *,
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
) -> torch.Tensor:
    """[N, F] float32 rewards, NaN where a function gave None or NaN.

    Each function is called as TRL's ``GRPOTrainer`` calls it:
    ``f(prompts=..., completions=..., completion_ids=..., **columns)``, where for conversational prompts
    (lists of ``{"role", "content"}``) each completion is ``[{"role": "assistant", "content": text}]``.
    A function that raises, or returns anything but one finite number or None per completion, fails with
    a ``RewardError`` naming it; one that scores no completion of the round warns once (``RewardWarning``).
    """
    n = len(completions)
    if n and is_conversational(prompts[0]):
        completions = [
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions
        ]
    out = torch.full((n, len(funcs)), float("nan"))
    for j, fn in enumerate(funcs):
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        for i, v in enumerate(_reward_values(name, values, n)):
            out[i, j] = v
        if n and torch.isnan(out[:, j]).all() and name not in _WARNED_NO_REWARD:
            _WARNED_NO_REWARD.add(name)
            warnings.warn(
                f"reward function {name!r} gave no reward (None or NaN) to any of the {n} completions of "
                "this round; completions no function scores get advantage 0 (warned once per function)",
                RewardWarning,
                stacklevel=2,
            )
    return out


def _reward_values(name: str, values, n: int) -> list[float]:
    """``values`` as n floats (NaN for None/NaN), or a ``RewardError`` saying what was expected."""
    want = f"a list of {n} rewards (one number or None per completion)"
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):  # a tensor or a numpy array
        values = values.tolist()
    if (
        values is None
        or isinstance(values, (str, bytes, dict, numbers.Number))
        or not hasattr(values, "__len__")
    ):
        got = "None" if values is None else f"a {type(values).__name__} ({values!r:.40})"
        raise RewardError(f"reward function {name!r} must return {want}, got {got}")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} must return {want}, got {len(values)} values")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {name!r} must return numbers or None, got a {type(v).__name__} ({v!r:.40}) "
                f"for completion {i}"
            )
        if math.isinf(v):
            raise RewardError(
                f"reward function {name!r} returned {float(v)} for completion {i}; rewards must be finite "
                "(None or NaN mean 'no reward')"
            )
        out.append(float(v))
    return out


def reward_metrics(rewards_NF: torch.Tensor, funcs: list[Callable]) -> dict[str, float]:
    """Per function: ``reward/<name>`` (mean over the completions it scored, NaN if none) and
    ``reward/<name>/no_reward`` (how many completions it gave None or NaN)."""
    metrics = {}
    for j, fn in enumerate(funcs):
        col, name = rewards_NF[:, j], reward_name(fn)
        missing = torch.isnan(col)
        metrics[f"reward/{name}"] = float(col[~missing].mean()) if (~missing).any() else math.nan
        metrics[f"reward/{name}/no_reward"] = float(missing.sum())
    return metrics


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
