"""Suite ``grpo_step``: one whole GRPO training step (generation included) of a small model, for the
tokens/s and peak-memory comparison with TRL in ANCHORS.md.

The hook for the trainers: this module's ``build(ctx, ceil)`` returns the cases; until the trainers expose
a step that can be timed on its own, the suite reports itself as skipped rather than measuring a stand-in.
"""

from __future__ import annotations

from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Skip


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    raise Skip("not filled in yet: the trainers' GRPO step hook (fastrl/bench/grpo_step.py)")
