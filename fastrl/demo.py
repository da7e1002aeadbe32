"""``fastrl demo``: SFT, then GRPO, then DPO of a tiny model on the CPU, no downloads.

Task: reverse a short lowercase string (``"abcd="`` -> ``"dcba"``). The reward is exact: partial credit
(``partial_match``: the fraction of positions right) plus 1 for a fully correct answer (``exact_match``).
A tiny Qwen2-architecture model with a character tokenizer is built locally, then

1. **SFT** on noisy demonstrations: half of them copy the string instead of reversing it (as human or
   model-written demonstrations are often imperfect), so the SFT model hesitates between the two;
2. **GRPO** with those two rewards, which must raise the held-out reward over the SFT model;
3. **DPO** on pairs (correct answer, the model's own wrong greedy answer).

Each stage's held-out reward and accuracy (greedy decoding) before and after go to ``summary.json``, the
curves of the three stages (SFT loss, GRPO reward, DPO loss) to ``reward_curve.png``, both in
``--output-dir``; a summary table is printed, and where the files are.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ALPHABET = "abcdefgh"


@dataclass(kw_only=True)
class DemoPlan:
    """Sizes and steps of one demo run (``--quick`` uses the smaller plan)."""

    min_len: int = 3
    max_len: int = 6
    n_train: int = 2000
    n_eval: int = 200
    copy_frac: float = 0.5
    hidden_size: int = 64
    num_layers: int = 2
    sft_steps: int = 300
    sft_batch: int = 32
    sft_lr: float = 3e-3
    grpo_steps: int = 300
    grpo_prompts: int = 16
    num_generations: int = 8
    grpo_lr: float = 3e-4
    dpo_steps: int = 30
    dpo_batch: int = 16
    dpo_lr: float = 3e-6


QUICK = DemoPlan(n_eval=128, sft_steps=150, grpo_steps=60, dpo_steps=15)


def make_rows(n: int, plan: DemoPlan, rng: random.Random, exclude: set[str]) -> list[dict]:
    rows, seen = [], set(exclude)
    while len(rows) < n:
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(plan.min_len, plan.max_len)))
        if s in seen and len(seen) < len(ALPHABET) ** plan.min_len:
            continue
        seen.add(s)
        rows.append({"prompt": s + "=", "answer": s[::-1]})
    return rows


def evaluate(model, tokenizer, rows: list[dict], plan: DemoPlan) -> dict:
    """Greedy answers on ``rows``: mean partial-credit reward and exact accuracy."""
    from fastrl.engine import EngineConfig, SamplingParams, build_engine
    from fastrl.rewards import exact_match, partial_match

    engine = build_engine(EngineConfig(), model, tokenizer)
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    was_training = model.training
    model.eval()
    out = engine.generate(ids, SamplingParams(max_new_tokens=plan.max_len + 1, temperature=0.0))
    model.train(was_training)
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    answers = [r["answer"] for r in rows]
    partial = partial_match(completions=texts, answer=answers)
    exact = exact_match(completions=texts, answer=answers)
    return {
        "reward": sum(p + e for p, e in zip(partial, exact)) / len(rows),
        "accuracy": sum(exact) / len(rows),
        "completions": texts,
    }


def _train_cfg(out: Path, stage: str, steps: int, batch: int, seed: int, progress: bool):
    from fastrl.trainers.core import TrainConfig

    return TrainConfig(
        output_dir=str(out / stage),
        max_steps=steps,
        per_device_batch_size=batch,
        seed=seed,
        device="cpu",
        progress_bar=progress,
        export_final=stage == "dpo",
    )


def run_demo(output_dir: str, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run the three stages (module docstring); returns the summary that is also written to disk."""
    import torch

    plan = QUICK if quick else DemoPlan()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices gain nothing from threads; spare the other core
    try:
        return _run(plan, Path(output_dir), quick=quick, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run(plan: DemoPlan, out: Path, *, quick: bool, seed: int, progress: bool) -> dict:
    import torch

    from fastrl.data import DataConfig
    from fastrl.losses.grpo_config import GRPOLossConfig
    from fastrl.models.tiny import build_char_tokenizer, build_tiny_model
    from fastrl.rewards import exact_match, partial_match
    from fastrl.trainers.core import OptimConfig
    from fastrl.trainers.dpo import DPOConfig, DPORunConfig, run_dpo
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo
    from fastrl.trainers.sft import SFTRunConfig, run_sft

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eval_rows = make_rows(plan.n_eval, plan, rng, set())
    train_rows = make_rows(plan.n_train, plan, rng, {r["answer"][::-1] for r in eval_rows})
    tok = build_char_tokenizer(ALPHABET + "=")
    heads = plan.hidden_size // 64
    model = build_tiny_model(
        tok, hidden_size=plan.hidden_size, num_layers=plan.num_layers, num_heads=heads, num_kv_heads=heads,
        intermediate_size=2 * plan.hidden_size, max_position_embeddings=64, seed=seed,
    )  # fmt: skip
    data = DataConfig(max_prompt_length=16, max_length=32)
    summary: dict = {"task": "reverse a string", "quick": quick, "seed": seed, "stages": {}}
    t_all = time.perf_counter()

    def stage(name: str, fn):
        before = evaluate(model, tok, eval_rows, plan)
        t0 = time.perf_counter()
        result = fn()
        after = evaluate(model, tok, eval_rows, plan)
        summary["stages"][name] = {
            "reward_before": before["reward"],
            "reward_after": after["reward"],
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "seconds": time.perf_counter() - t0,
            "steps": len(result["history"]),
        }
        return result, after

    noisy = random.Random(seed + 1)
    sft_rows = [
        {
            "prompt": r["prompt"],
            "completion": r["prompt"][:-1] if noisy.random() < plan.copy_frac else r["answer"],
        }
        for r in train_rows
    ]
    sft_cfg = SFTRunConfig(
        data=data,
        optim=OptimConfig(lr=plan.sft_lr, warmup_steps=5),
        train=_train_cfg(out, "sft", plan.sft_steps, plan.sft_batch, seed, progress),
    )
    sft_result, _ = stage("sft", lambda: run_sft(sft_cfg, model=model, tokenizer=tok, dataset=sft_rows))

    grpo_cfg = GRPORunConfig(
        data=data,
        optim=OptimConfig(lr=plan.grpo_lr, schedule="constant", warmup_steps=5),
        train=_train_cfg(
            out, "grpo", plan.grpo_steps, plan.grpo_prompts * plan.num_generations, seed, progress
        ),
        grpo=GRPOConfig(
            num_generations=plan.num_generations,
            max_completion_length=plan.max_len + 1,
            reward_funcs=["partial_match", "exact_match"],
        ),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.0),
    )
    rewards = [partial_match, exact_match]
    grpo_result, _ = stage(
        "grpo",
        lambda: run_grpo(grpo_cfg, model=model, tokenizer=tok, dataset=train_rows, reward_funcs=rewards),
    )

    pairs = preference_pairs(model, tok, train_rows[: plan.dpo_steps * plan.dpo_batch], plan, rng)
    dpo_cfg = DPORunConfig(
        data=data,
        optim=OptimConfig(lr=plan.dpo_lr, schedule="constant"),
        train=_train_cfg(out, "dpo", plan.dpo_steps, plan.dpo_batch, seed, progress),
        dpo=DPOConfig(beta=0.1, precompute_ref_log_probs=True),
    )
    dpo_result, _ = stage("dpo", lambda: run_dpo(dpo_cfg, model=model, tokenizer=tok, dataset=pairs))

    summary["total_seconds"] = time.perf_counter() - t_all
    summary["curves"] = {
        "sft_loss": [h["loss"] for h in sft_result["history"]],
        "grpo_reward": [h["reward"] for h in grpo_result["history"]],
        "dpo_loss": [h["loss"] for h in dpo_result["history"]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(summary, out / "reward_curve.png")
    print(format_table(summary))
    print(
        f"wrote {out / 'summary.json'}, {out / 'reward_curve.png'} (the three stages' curves) and the final "
        f"model {out / 'dpo' / 'final'}; per-stage metrics in {out}/<stage>/metrics.jsonl"
    )
    return summary


def preference_pairs(model, tok, rows: list[dict], plan: DemoPlan, rng: random.Random) -> list[dict]:
    """(prompt, correct answer, the model's greedy answer when wrong, else a corrupted answer)."""
    got = evaluate(model, tok, rows, plan)["completions"]
    pairs = []
    for r, g in zip(rows, got):
        rejected = g.strip()
        if rejected == r["answer"]:
            chars = list(r["answer"])
            i = rng.randrange(len(chars))
            chars[i] = rng.choice([c for c in ALPHABET if c != chars[i]])
            rejected = "".join(chars)
        pairs.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": rejected})
    return pairs


def format_table(summary: dict) -> str:
    cols = ("reward before", "reward after", "acc before", "acc after", "s")
    head = f"{'stage':<6} " + " ".join(f"{c:>13}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, st in summary["stages"].items():
        keys = ("reward_before", "reward_after", "accuracy_before", "accuracy_after")
        nums = [f"{st[k]:>13.3f}" for k in keys] + [f"{st['seconds']:>13.1f}"]
        lines.append(f"{name:<6} " + " ".join(nums))
    lines.append(
        f"held-out reward = partial credit + exact match (max 2); total {summary['total_seconds']:.0f} s"
    )
    return "\n".join(lines)


def plot_curves(summary: dict, path: Path) -> None:
    """``curves_figure(summary)`` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(summary)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(summary: dict):
    """One panel per stage: the SFT loss, the GRPO rollout reward (with the held-out reward before and
    after), the DPO loss; a title saying what ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, stages = summary["curves"], summary["stages"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (
        ("sft", "sft_loss", "1. SFT on noisy demonstrations", "loss"),
        ("grpo", "grpo_reward", "2. GRPO (partial + exact match)", "rollout reward (max 2)"),
        ("dpo", "dpo_loss", "3. DPO on own mistakes", "loss"),
    )
    for ax, (stage, key, title, ylabel) in zip(axes, panels):
        curve = curves[key]
        ax.plot(range(1, len(curve) + 1), curve, label=ylabel)
        st = stages[stage]
        ax.set_title(
            f"{title}\nheld-out reward {st['reward_before']:.2f} -> {st['reward_after']:.2f}", fontsize=9
        )
        ax.set_xlabel(f"{stage.upper()} step")
        ax.set_ylabel(ylabel)
    for key, style, label in (
        ("reward_before", ":", "held-out, SFT model"),
        ("reward_after", "--", "held-out, after"),
    ):
        axes[1].axhline(stages["grpo"][key], linestyle=style, color="gray", label=label)
    axes[1].legend(fontsize=7)
    kind = "quick run" if summary.get("quick") else "full run"
    fig.suptitle(
        f"fastrl demo: SFT -> GRPO -> DPO of a tiny model reversing strings ({kind}, seed {summary['seed']})"
    )
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="tiny")
    if pre.parse_known_args(argv)[0].model == "smollm2":  # GRPO on a real instruct model
        from fastrl.demo_smollm2 import main as smollm2_main

        return smollm2_main(argv)
    parser = argparse.ArgumentParser(prog="fastrl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=("tiny", "smollm2"), default="tiny", help="smollm2: fastrl.demo_smollm2"
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="where summary.json and the plot go")
    parser.add_argument("--quick", action="store_true", help="a shorter run (the test uses it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    return run_demo(args.output_dir, quick=args.quick, seed=args.seed, progress=not args.no_progress)


if __name__ == "__main__":
    main()
