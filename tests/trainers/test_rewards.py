"""Reward functions, their combination and group-normalised advantages (NaN/None-aware)."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.rewards import (
    combine_rewards,
    compute_rewards,
    exact_match,
    group_advantages,
    numeric_match,
    partial_match,
    resolve_reward,
)

FIX = "tests.trainers.rewards_fixtures"


def test_builtins():
    assert exact_match(completions=[" 12 ", "13"], answer=["12", "12"]) == [1.0, 0.0]
    assert partial_match(completions=["abc", "abd", "ab", ""], answer=["abc"] * 3 + [""]) == [
        1.0,
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        1.0,
    ]
    got = numeric_match(completions=["so 1,234", "x 7", "none"], answer=["... #### 1234", "8", "1"])
    assert got == [1.0, 0.0, 0.0]
    assert resolve_reward("exact_match") is exact_match


def test_resolve_errors_and_user_functions():
    with pytest.raises(ValueError, match="exact_match"):
        resolve_reward("no_such_reward")
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward(f"{FIX}:missing")
    fn = resolve_reward(f"{FIX}:sees_columns")
    r = compute_rewards(
        [fn],
        prompts=["p", "q"],
        completions=["ab", "c"],
        completion_ids=[[1, 2], [3]],
        columns={"answer": [2, 2]},
    )
    assert r.tolist() == [[1.0], [0.0]]


def test_raising_reward_names_the_function():
    with pytest.raises(RuntimeError, match="broken_reward.*KeyError"):
        compute_rewards(
            [resolve_reward(f"{FIX}:broken_reward")],
            prompts=["p"],
            completions=["a"],
            completion_ids=[[1]],
            columns={},
        )
    with pytest.raises(RuntimeError, match="'<lambda>' must return 2 values"):
        compute_rewards(
            [lambda **_: [1.0]],
            prompts=["p"] * 2,
            completions=["a"] * 2,
            completion_ids=[[1]] * 2,
            columns={},
        )


def test_none_and_nan_rewards():
    fns = [resolve_reward(f"{FIX}:partial_judge"), lambda completions, **_: [float("nan"), 2.0, 0.5, None]]
    r = compute_rewards(
        fns, prompts=["p"] * 4, completions=["a", "bb", "c", "dd"], completion_ids=[[0]] * 4, columns={}
    )
    # judge: None at 0 and 3, else the length; second function: NaN at 0, None at 3
    assert torch.isnan(r[0]).all() and r[1].tolist() == [2.0, 2.0] and torch.isnan(r[3]).all()
    total = combine_rewards(r, [1.0, 0.5])
    assert math.isnan(total[0]) and math.isnan(total[3])
    assert total[1].item() == 3.0 and total[2].item() == 1.25


def _reference_advantages(r, G, scale, eps=1e-4):
    """Float64 loop version of the documented formula."""
    r = r.double().view(-1, G)
    out = torch.zeros_like(r)
    scored_all = r[~torch.isnan(r)]
    std_b = scored_all.std() if scored_all.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    for g in range(r.shape[0]):
        ok = ~torch.isnan(r[g])
        if not ok.any():
            continue
        vals = r[g][ok]
        mean = vals.mean()
        std = vals.std() if vals.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        denom = {"group": std + eps, "batch": std_b + eps, "none": 1.0}[scale]
        out[g][ok] = (vals - mean) / denom
    return out.view(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_formula(seed, scale):
    G = 5
    r = torch.randn(7 * G)
    r[torch.rand(r.shape) < 0.2] = float("nan")  # unscored completions
    r[G : 2 * G] = 0.7  # a zero-variance group
    r[2 * G : 3 * G] = float("nan")  # a group nobody scored
    r[3 * G] = 1.0
    r[3 * G + 1 : 4 * G] = float("nan")  # a single scored completion
    adv, metrics = group_advantages(r, G, scale_rewards=scale)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), _reference_advantages(r, G, scale), rtol=1e-5, atol=1e-5)
    assert (adv[torch.isnan(r)] == 0).all()
    assert (adv[G : 2 * G] == 0).all()
    assert metrics["no_reward_count"] == float(torch.isnan(r).sum())
    assert metrics["frac_reward_zero_std"] >= 3 / 7


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="rank")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
