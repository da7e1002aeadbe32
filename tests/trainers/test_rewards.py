"""Reward functions, their combination and group-normalised advantages (NaN/None-aware)."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.rewards import (
    RewardError,
    RewardWarning,
    check_reward_signature,
    combine_rewards,
    compute_rewards,
    exact_match,
    group_advantages,
    numeric_match,
    partial_match,
    resolve_reward,
    reward_metrics,
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
    with pytest.raises(ValueError, match="has no 'missing'; it defines .*'length_reward'"):
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
    with pytest.raises(RuntimeError, match="'<lambda>' must return a list of 2 rewards.*got 1 values"):
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


# ---------------------------------------------------------------------------------------------------------
# Issue 9 item 5: reward functions as TRL users write them.


def _call(fn, completions, prompts=None, **columns):
    n = len(completions)
    return compute_rewards(
        [fn], prompts=prompts or ["p"] * n, completions=completions, completion_ids=[[1]] * n, columns=columns
    )


def test_module_resolves_from_the_working_folder_and_the_config_folder_without_pythonpath(
    tmp_path, monkeypatch
):
    work, conf = tmp_path / "work", tmp_path / "conf"
    work.mkdir()
    conf.mkdir()
    (work / "my_rewards_cwd.py").write_text(
        "def f(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    (conf / "my_rewards_conf.py").write_text(
        "def g(completions, **kw):\n    return [2.0] * len(completions)\n"
    )
    (conf / "by_file.py").write_text("def h(completions, **kw):\n    return [3.0] * len(completions)\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(work))])
    assert _call(resolve_reward("my_rewards_cwd:f"), ["a"]).item() == 1.0
    with pytest.raises(RewardError, match="no module 'my_rewards_conf' .*looked on sys.path and in"):
        resolve_reward("my_rewards_conf:g")
    assert _call(resolve_reward("my_rewards_conf:g", search=(conf,)), ["a"]).item() == 2.0
    assert (
        _call(resolve_reward("my_rewards_conf.g", search=(conf,)), ["a"]).item() == 2.0
    )  # TRL's dotted form
    assert _call(resolve_reward("by_file.py:h", search=(conf,)), ["a"]).item() == 3.0
    assert _call(resolve_reward(f"{conf / 'by_file.py'}:h"), ["a"]).item() == 3.0
    (work / "broken_mod.py").write_text("def oops(:\n")
    with pytest.raises(RewardError, match="importing 'broken_mod' failed: SyntaxError"):
        resolve_reward("broken_mod:oops")
    (work / "not_fn.py").write_text("x = 3\n")
    with pytest.raises(RewardError, match="'not_fn:x' is a int, not a function"):
        resolve_reward("not_fn:x")


def test_conversational_prompts_give_trl_style_completions():
    seen = {}

    def trl_style(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    chat = [{"role": "user", "content": "2+2="}]
    r = _call(trl_style, ["4", "5"], prompts=[chat, chat], answer=["4", "4"])
    assert r.flatten().tolist() == [1.0, 0.0]
    assert seen["completions"] == [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
    ]
    assert seen["prompts"] == [chat, chat]
    # plain-text prompts keep plain-text completions; the built-ins read both
    assert _call(exact_match, ["4"], answer=["4"]).item() == 1.0
    assert _call(exact_match, ["4"], prompts=[chat], answer=["4"]).item() == 1.0


def test_trl_reward_function_runs_unchanged():
    rewards = pytest.importorskip("trl.rewards")
    chat = [{"role": "user", "content": "think first"}]
    r = _call(rewards.think_format_reward, ["<think>\nhm\n</think>\nyes", "no tags"], prompts=[chat, chat])
    assert r.flatten().tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (1.0, r"must return a list of 2 rewards .*got a float \(1.0\)"),
        (None, r"must return a list of 2 rewards .*got None"),
        ("0.5", r"must return a list of 2 rewards .*got a str"),
        (["1", "0"], r"must return numbers or None, got a str \('1'\) for completion 0"),
        ([1.0, 2.0, 3.0], r"must return a list of 2 rewards .*got 3 values"),
        ([1.0, float("inf")], r"returned inf for completion 1; rewards must be finite"),
        ([-math.inf, 0.0], r"returned -inf for completion 0"),
        ({"a": 1}, r"must return .*got a dict"),
    ],
)
def test_bad_reward_outputs_name_the_function_and_what_was_expected(returned, message):
    def my_reward(completions, **_):
        return returned

    with pytest.raises(RewardError, match=r"reward function 'my_reward' " + message):
        _call(my_reward, ["a", "b"])


def test_reward_outputs_as_tensors_arrays_bools_and_ints():
    import numpy as np

    for out in (torch.tensor([1.0, 0.0]), np.array([1, 0]), [True, False], [1, 0], (1.0, 0)):
        assert _call(lambda completions, o=out, **_: o, ["a", "b"]).flatten().tolist() == [1.0, 0.0]


def test_none_and_nan_are_counted_and_an_empty_round_warns_once(recwarn):
    import warnings

    from fastrl import rewards as rewards_mod

    rewards_mod._WARNED_NO_REWARD.discard("never_scores")

    def never_scores(completions, **_):
        return [None, float("nan"), None]

    fns = [never_scores, resolve_reward(f"{FIX}:partial_judge")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            r = compute_rewards(
                fns, prompts=["p"] * 3, completions=["a", "bb", "c"], completion_ids=[[0]] * 3, columns={}
            )
    ours = [w for w in caught if issubclass(w.category, RewardWarning)]
    assert len(ours) == 1 and "'never_scores' gave no reward" in str(ours[0].message)
    m = reward_metrics(r, fns)
    assert m["reward/never_scores/no_reward"] == 3.0 and math.isnan(m["reward/never_scores"])
    assert m["reward/partial_judge/no_reward"] == 1.0 and m["reward/partial_judge"] == 1.5


def test_signature_is_checked_against_the_columns():
    def needs_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(completions, answer):
        return [0.0] * len(completions)

    check_reward_signature(needs_answer, ["answer", "id"])
    with pytest.raises(
        RewardError, match=r"'needs_answer' needs \['answer'\].*the dataset has \['solution'\]"
    ):
        check_reward_signature(needs_answer, ["solution"])
    with pytest.raises(
        RewardError, match=r"'no_kwargs' does not take \['completion_ids', 'prompts'\].*add \*\*kwargs"
    ):
        check_reward_signature(no_kwargs, ["answer"])
    check_reward_signature(exact_match, ["answer"])
