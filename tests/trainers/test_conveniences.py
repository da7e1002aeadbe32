"""TRL's trainer conveniences: the linear schedule, num_train_epochs, held-out evaluation (SFT/DPO loss
checked against an independent HF-logits computation, GRPO rewards) and GRPO's sample completions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastrl.models import ModelConfig, load_model_and_tokenizer
from fastrl.trainers.core import OptimConfig, TrainConfig, lr_factor
from fastrl.trainers.epochs import steps_for_epochs

from .conftest import InterruptedRunError, interrupt_after

QUIET = dict(progress_bar=False, export_final=False)


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt": f"{i % 7}+{i % 5}=", "completion": str(i % 7 + i % 5) * (1 + i % 3)}
        for i in range(offset, offset + n)
    ]


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_schedule_is_transformers_after_warmup(warmup):
    from transformers import get_linear_schedule_with_warmup

    total = 11
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total + 2):
        theirs.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    cfg = OptimConfig(schedule="linear", warmup_steps=warmup)
    for s in range(warmup, total + 2):
        assert lr_factor(s, cfg, total) == pytest.approx(theirs[s], abs=1e-12), s


def test_linear_schedule_floor():
    cfg = OptimConfig(schedule="linear", warmup_steps=2, min_lr_ratio=0.1)
    # by hand: 0.1 + 0.9 * (10 - s) / 8
    assert lr_factor(2, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(6, cfg, 10) == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert lr_factor(10, cfg, 10) == pytest.approx(0.1)
    assert lr_factor(13, cfg, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)


# ------------------------------------------------------------------------------------------ epochs


def test_max_steps_and_epochs_config():
    assert TrainConfig().max_steps == 100
    assert TrainConfig(num_train_epochs=2).max_steps is None
    with pytest.raises(ValueError, match=r"train.max_steps \(5\) and train.num_train_epochs \(2\)"):
        TrainConfig(max_steps=5, num_train_epochs=2)
    with pytest.raises(ValueError, match="train.num_train_epochs must be > 0"):
        TrainConfig(num_train_epochs=0)


@pytest.mark.parametrize(
    ("epochs", "units", "bs", "world", "ga", "expected"),
    [
        (1, 40, 8, 1, 1, 5),
        (1.5, 40, 8, 1, 1, 8),  # ceil(7.5)
        (1, 41, 8, 1, 1, 6),  # a last short batch counts
        (2, 40, 8, 2, 3, 2),  # ceil(40 / 16) = 3 micro-steps = 1 optimizer step per epoch
        (3, 40, 4, 1, 3, 12),  # 10 micro-steps -> ceil(10 / 3) = 4 per epoch
        (0.1, 5, 8, 1, 1, 1),
    ],
)
def test_steps_for_epochs(epochs, units, bs, world, ga, expected):
    assert steps_for_epochs(epochs, units, bs, world, ga) == expected


# ------------------------------------------------------------------------------------------ SFT eval


def _nll_by_hand(model, tokenizer, rows) -> float:
    """Token-weighted NLL of the completion tokens over all rows, from full HF logits in float64."""
    from fastrl.data import sft_example

    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ex = sft_example(
                tokenizer, row, max_length=1024, completion_only_loss=None, assistant_only_loss=False
            )
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            targets, mask = ids[0, 1:], torch.tensor(ex["loss_mask"][1:], dtype=torch.bool)
            nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            total += float(nll[mask].sum())
            count += float(mask.sum())
    return total / count


def test_sft_eval_loss_epochs_and_resume(tiny_dir, tmp_path, monkeypatch, seed):
    from fastrl.trainers.sft import SFTRunConfig, SFTStep, run_sft

    train_rows, eval_rows = sft_rows(20), sft_rows(7, offset=100)

    def cfg(**kw):
        return SFTRunConfig(
            model=ModelConfig(name_or_path=tiny_dir),
            optim=OptimConfig(lr=5e-3, schedule="linear", warmup_steps=1),
            train=TrainConfig(
                output_dir=str(tmp_path / "run"), num_train_epochs=1.5, per_device_batch_size=4,
                per_device_eval_batch_size=3, eval_steps=3, save_steps=4, **QUIET, **kw,
            ),
        )  # fmt: skip

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    out = run_sft(cfg(), model=model, tokenizer=tok, dataset=train_rows, eval_dataset=eval_rows)
    # 20 examples / 4 per step = 5 steps per epoch; 1.5 epochs = 8 steps; eval at 3, 6 and the last
    assert out["step"] == 8 and [r["step"] for r in out["history"]] == list(range(1, 9))
    assert [r["step"] for r in out["eval_history"]] == [3, 6, 8]
    final = out["eval_history"][-1]
    assert final["eval_loss"] == pytest.approx(_nll_by_hand(model, tok, eval_rows), rel=1e-5)
    assert final["eval_num_loss_tokens"] > 0
    losses = [r["eval_loss"] for r in out["eval_history"]]
    assert losses[-1] < losses[0]  # lr 5e-3 on a tiny model: it learns the format
    for r in out["history"]:  # the linear schedule in the loop: lr(s) with s = step - 1
        expected = 5e-3 * lr_factor(r["step"] - 1, OptimConfig(schedule="linear", warmup_steps=1), 8)
        assert r["lr"] == pytest.approx(expected, rel=1e-9)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [3, 6, 8]

    # interrupted after step 5 (checkpoint at 4), resumed: the same 8 steps, from the checkpoint
    second = tmp_path / "second"
    c = cfg()
    c.train.output_dir = str(second)
    interrupt_after(monkeypatch, SFTStep, 5)
    with pytest.raises(InterruptedRunError):
        run_sft(c, dataset=train_rows, eval_dataset=eval_rows)
    monkeypatch.undo()
    c.train.resume_from_checkpoint = "auto"
    resumed = run_sft(c, dataset=train_rows, eval_dataset=eval_rows)
    assert [r["step"] for r in resumed["history"]] == [5, 6, 7, 8]
    assert resumed["eval_history"][-1]["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_eval_needs_data_and_fraction_split(tiny_dir, tmp_path):
    from fastrl.data import DataConfig
    from fastrl.data.loading import load_eval_data
    from fastrl.trainers.common import as_dataset
    from fastrl.trainers.sft import SFTRunConfig, run_sft

    cfg = SFTRunConfig(
        model=ModelConfig(name_or_path="/does/not/matter"),
        train=TrainConfig(output_dir=str(tmp_path / "x"), eval_steps=2, **QUIET),
    )
    with pytest.raises(ValueError, match="train.eval_steps 2 needs eval data"):
        run_sft(cfg, dataset=sft_rows(4))  # before any model loads
    assert not (tmp_path / "x").exists()

    ds = as_dataset(sft_rows(20))
    train, held = load_eval_data(DataConfig(eval_fraction=0.25), ds, seed=3)
    assert (len(train), len(held)) == (15, 5)
    pairs = {(r["prompt"], r["completion"]) for r in train} | {(r["prompt"], r["completion"]) for r in held}
    assert len(train) + len(held) == len(ds) and len(pairs) <= len(ds)
    again = load_eval_data(DataConfig(eval_fraction=0.25), ds, seed=3)[1]
    assert again["prompt"] == held["prompt"]  # seeded

    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(4)))
    with pytest.raises(ValueError, match="data.eval_split 'test': the local file"):
        load_eval_data(DataConfig(dataset=str(f), eval_split="test"), ds, seed=0)
    with pytest.raises(ValueError, match="data.eval_dataset"):
        load_eval_data(DataConfig(dataset=str(f), eval_dataset=str(tmp_path / "nope.jsonl")), ds, seed=0)
    g = tmp_path / "eval.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(3, offset=50)))
    assert len(load_eval_data(DataConfig(dataset=str(f), eval_dataset=str(g)), ds, seed=0)[1]) == 3
    with pytest.raises(ValueError, match="data.eval_fraction cannot be combined"):
        DataConfig(eval_fraction=0.1, eval_split="test")


# ------------------------------------------------------------------------------------------ DPO eval


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_eval_loss_matches_closed_form(tiny_dir, tmp_path, seed, precompute):
    import copy

    from fastrl.data import dpo_example
    from fastrl.trainers.dpo import DPOConfig, DPORunConfig, run_dpo

    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a * b + 3) * 2}
        for a in range(4)
        for b in range(3)
    ]
    held = [
        {"prompt": f"{a}*{b}=", "chosen": str(a * b), "rejected": "x" * (a + 1)}
        for a in range(5)
        for b in (1,)
    ]
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    ref = copy.deepcopy(model).eval()
    beta = 0.3
    cfg = DPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        optim=OptimConfig(lr=5e-3),
        dpo=DPOConfig(beta=beta, precompute_ref_log_probs=precompute),  # eval pairs' reference too
        train=TrainConfig(
            output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_batch_size=4,
            per_device_eval_batch_size=2, eval_steps=2, **QUIET,
        ),
    )  # fmt: skip
    out = run_dpo(cfg, model=model, tokenizer=tok, dataset=pairs, eval_dataset=held)
    assert [r["step"] for r in out["eval_history"]] == [2, 3]

    def seq_logp(m, prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].double(), -1)
        t = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        return float(logp[t, ids[0, t + 1]].sum())

    model.eval()
    losses, acc = [], []
    for row in held:
        ex = dpo_example(tok, row, max_prompt_length=512, max_length=1024)
        pc, pr = (
            seq_logp(model, ex["prompt_ids"], ex["chosen_ids"]),
            seq_logp(model, ex["prompt_ids"], ex["rejected_ids"]),
        )
        rc, rr = (
            seq_logp(ref, ex["prompt_ids"], ex["chosen_ids"]),
            seq_logp(ref, ex["prompt_ids"], ex["rejected_ids"]),
        )
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
        acc.append(float(margin > 0))
    final = out["eval_history"][-1]
    assert final["eval_num_pairs"] == 5
    assert final["eval_loss"] == pytest.approx(sum(losses) / 5, rel=1e-4)
    assert final["eval_rewards/accuracies"] == pytest.approx(sum(acc) / 5)


# ------------------------------------------------------------------------------------------ GRPO


def test_grpo_eval_rewards_and_sample_completions(tiny_dir, tmp_path, seed, capsys):
    from fastrl.rewards import group_advantages
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo

    seen_eval = []

    def tokens(completions, completion_ids, prompts, **_):
        seen_eval.extend(p for p in prompts if p.startswith("EVAL"))
        return [float(len(c)) for c in completion_ids]

    def half(completions, **_):  # None for every other completion: scored ones only count
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    G = 4
    cfg = GRPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        optim=OptimConfig(lr=1e-3),
        grpo=GRPOConfig(num_generations=G, max_completion_length=5, reward_weights=[1.0, 2.0]),
        train=TrainConfig(
            output_dir=str(tmp_path / "grpo"), num_train_epochs=0.75, per_device_batch_size=8, eval_steps=2,
            per_device_eval_batch_size=2, log_completions_steps=2, num_completions_to_print=G, **QUIET,
        ),
    )  # fmt: skip
    prompts = [{"prompt": f"{i}+{i}="} for i in range(8)]
    held = [{"prompt": f"EVAL {i}:"} for i in range(3)]
    out = run_grpo(cfg, dataset=prompts, eval_dataset=held, reward_funcs=[tokens, half])
    # 8 prompts x 4 completions = 32 per epoch, 8 per step: 4 steps per epoch, 0.75 epochs = 3 steps
    assert out["step"] == 3
    assert [r["step"] for r in out["eval_history"]] == [2, 3]
    ev = out["eval_history"][-1]
    assert ev["eval_num_completions"] == 3 * G
    assert sorted(set(seen_eval)) == [r["prompt"] for r in held]
    assert ev["eval_reward/tokens"] == pytest.approx(ev["eval_completion_length"])
    assert ev["eval_reward/half"] == 1.0
    # the weighted total of each completion: tokens + 2 * half where half scored, tokens alone elsewhere
    assert ev["eval_reward"] == pytest.approx(ev["eval_completion_length"] + 1.0, rel=1e-6)

    lines = (tmp_path / "grpo" / "completions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2] * G  # every 2 steps: only step 2 of 3
    for i, r in enumerate(records):
        assert set(r) == {"step", "prompt", "completion", "reward", "rewards", "advantage"}
        assert r["rewards"]["half"] == (None if i % 2 else 1.0)
        assert r["reward"] == pytest.approx(r["rewards"]["tokens"] + (2.0 if i % 2 == 0 else 0.0))
    assert len({r["prompt"] for r in records}) == 1  # one prompt's group
    rewards = torch.tensor([[r["reward"] for r in records]]).flatten()
    adv, _ = group_advantages(rewards, G, scale_rewards="group")
    assert [r["advantage"] for r in records] == pytest.approx(adv.tolist(), abs=1e-5)
    printed = capsys.readouterr().out
    assert "completion" in printed and records[0]["prompt"] in printed


def test_grpo_eval_columns_are_checked_before_training(tiny_dir, tmp_path):
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo

    def needs_answer(completions, answer, **_):
        return [float(a in c) for c, a in zip(completions, answer)]

    cfg = GRPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        grpo=GRPOConfig(num_generations=2, max_completion_length=2),
        train=TrainConfig(
            output_dir=str(tmp_path / "g"), max_steps=1, per_device_batch_size=2, eval_steps=1, **QUIET
        ),
    )
    rows = [{"prompt": "1+1=", "answer": "2"}] * 4
    with pytest.raises(ValueError, match="needs_answer.*answer"):
        run_grpo(cfg, dataset=rows, eval_dataset=[{"prompt": "2+2="}], reward_funcs=[needs_answer])
    assert not (tmp_path / "g" / "metrics.jsonl").exists()
