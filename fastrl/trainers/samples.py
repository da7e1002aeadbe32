"""GRPO sample completions every ``train.log_completions_steps`` optimizer steps (TRL's
``log_completions`` / ``num_completions_to_print``): a hook of the training loop that writes the first
``train.num_completions_to_print`` completions (0: all) of the latest generation round to
``output_dir/completions.jsonl``, one JSON object per completion::

    {"step": 4, "prompt": "...", "completion": "...", "reward": 0.5, "rewards": {"f": 0.5}, "advantage": 1.2}

(``reward``: the weighted total; ``rewards``: each reward function's score, ``null`` where it gave none),
and a short table of them on the console. Rank 0 only, from its own share of the round (the first
completions are one prompt's group when ``num_completions_to_print <= num_generations``, so the
advantages read as that group's). On resume, records after the checkpoint's step are dropped, as
``metrics.jsonl``'s are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastrl.distributed.env import dist_info


def _number(v: float) -> float | None:
    return None if math.isnan(v) else v


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row
    return text if len(text) <= width else text[: width - 3] + "..."


class SampleLog:
    """The hook: ``begin(start_step)`` trims the file, ``__call__(step, max_steps)`` writes when due."""

    def __init__(self, step, cfg):
        self.step, self.every = step, cfg.train.log_completions_steps
        self.count = cfg.train.num_completions_to_print
        self.path = Path(cfg.train.output_dir) / "completions.jsonl"
        self.enabled = self.every > 0 and dist_info().is_main

    def begin(self, start: int) -> None:
        if not self.enabled:
            return
        kept = []
        if start and self.path.exists():
            kept = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= start]
        self.path.write_text("".join(r + "\n" for r in kept))

    def records(self, step: int) -> list[dict]:
        from fastrl.rewards import reward_name

        s = getattr(self.step, "last_samples", None)
        if s is None:
            return []
        names = [reward_name(f) for f in self.step.reward_funcs]
        n = len(s["completions"]) if self.count == 0 else min(self.count, len(s["completions"]))
        decode = self.step.tokenizer.decode
        return [
            {
                "step": step,
                "prompt": decode(s["prompt_ids"][i], skip_special_tokens=True),
                "completion": s["completions"][i],
                "reward": _number(float(s["reward"][i])),
                "rewards": {name: _number(float(s["rewards"][i, j])) for j, name in enumerate(names)},
                "advantage": float(s["advantages"][i]),
            }
            for i in range(n)
        ]

    def __call__(self, step: int, max_steps: int) -> None:
        if not self.enabled or step % self.every:
            return None
        records = self.records(step)
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(table(records), flush=True)
        return None


def table(records: list[dict]) -> str:
    """A few fixed-width lines: step, reward, advantage, prompt and completion (cut to fit)."""
    head = f"{'step':>6} {'reward':>8} {'adv':>7}  {'prompt':<30}  completion"
    lines = [head, "-" * len(head)]
    for r in records:
        reward = "None" if r["reward"] is None else f"{r['reward']:.3g}"
        lines.append(
            f"{r['step']:>6} {reward:>8} {r['advantage']:>7.3f}  {_cell(r['prompt'], 30):<30}  "
            f"{_cell(r['completion'], 60)}"
        )
    return "\n".join(lines)
