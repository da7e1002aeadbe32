"""The SmolLM2 demo's parts that need no model: answer parsing, the two rewards, the problem splits, and the
GPU config (it loads, its rewards resolve, its data file is what ``--write-data`` writes)."""

from __future__ import annotations

import json
from pathlib import Path

from fastrl import demo_smollm2 as demo

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_smollm2-135m_arith.yaml"


def test_parse_answer_prefers_the_answer_line():
    assert demo.parse_answer("12 + 5 = 17 apples.\nAnswer: 17") == 17
    assert demo.parse_answer("Answer: 3, then 12 + 5 = 17. Answer: 17") == 17
    assert demo.parse_answer("the answer is 9 (from 4 + 5)") == 9
    assert demo.parse_answer("4 + 5 = 9 pens") == 9  # no answer line: the last number
    assert demo.parse_answer("no number here") is None


def test_rewards():
    assert demo.correct_reward(["Answer: 7", "7 + 1 = 8", "none"], answer=[7, 7, 7]) == [1.0, 0.0, 0.0]
    eos = 2
    fmt = demo.make_format_reward(eos)
    texts = ["4 + 3 = 7\nAnswer: 7", "Answer: 7 apples", "Answer: 7", "Answer: 7"]
    ids = [[5, eos], [5, eos], [5], []]  # the third ran out of tokens, the fourth is empty
    assert fmt(texts, ids) == [demo.FORMAT_WEIGHT, 0.0, 0.0, 0.0]
    assert demo.format_reward(texts, ids) == [demo.FORMAT_WEIGHT, 0.0, demo.FORMAT_WEIGHT, demo.FORMAT_WEIGHT]


def test_splits_are_disjoint_and_answers_right(tmp_path):
    train, held_out = demo.write_data(str(tmp_path), seed=3)
    rows = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in (train, held_out)}
    plan = demo.SmolPlan()
    assert len(rows["train"]) == plan.n_train and len(rows["eval"]) == plan.n_eval
    questions = {name: {r["prompt"][-1]["content"] for r in rs} for name, rs in rows.items()}
    assert not questions["train"] & questions["eval"] and len(questions["train"]) == plan.n_train
    for r in rows["eval"]:
        q, nums = (
            r["prompt"][-1]["content"],
            [int(t) for t in r["prompt"][-1]["content"].split() if t.isdigit()],
        )
        assert r["answer"] == (nums[0] + nums[1] if "more" in q else nums[0] - nums[1]) >= 0, r


def test_gpu_config_loads_and_its_rewards_resolve():
    from fastrl.config import load_config
    from fastrl.rewards import resolve_reward
    from fastrl.trainers.grpo import GRPORunConfig

    cfg = load_config(GRPORunConfig, CONFIG)
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.lora.enabled
    funcs = [resolve_reward(r) for r in cfg.grpo.reward_funcs]
    assert funcs == [demo.correct_reward, demo.format_reward]
    assert cfg.data.dataset.endswith("train.jsonl")


def test_rewards_read_trl_conversational_completions():
    # Chat prompts give completions as TRL does, [{"role": "assistant", "content": ...}].
    from fastrl.demo_smollm2 import correct_reward, make_format_reward

    plain, chat = ["So 7.\nAnswer: 7"], [[{"role": "assistant", "content": "So 7.\nAnswer: 7"}]]
    assert correct_reward(chat, [7]) == correct_reward(plain, [7]) == [1.0]
    fmt = make_format_reward(None)
    assert fmt(chat, [[1]]) == fmt(plain, [[1]]) and fmt(plain, [[1]])[0] > 0
