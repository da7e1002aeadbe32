"""Reward functions that tests name as ``"tests.trainers.rewards_fixtures:<name>"``."""

from __future__ import annotations


def length_reward(completions, **_):
    """Rewards short completions: 1 / (1 + len)."""
    return [1.0 / (1 + len(c)) for c in completions]


def sees_columns(prompts, completions, completion_ids, answer, **_):
    """1 where the completion's token count equals the ``answer`` column (an int)."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    return [float(len(ids) == a) for ids, a in zip(completion_ids, answer)]


def broken_reward(completions, **_):
    raise KeyError("boom")


def partial_judge(completions, **_):
    """No opinion (None) on every third completion; the length of the others."""
    return [None if i % 3 == 0 else float(len(c)) for i, c in enumerate(completions)]
