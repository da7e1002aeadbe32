"""The suites ``fastrl bench`` knows. A suite is one function, ``build(ctx, ceilings) -> list[Case]``, in its
own module; add one by adding a line here. Modules are imported only when their suite runs, so a suite
whose code (or whose op) is missing becomes a "skipped"/"fails" row instead of breaking the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

SUITES: dict[str, str] = {
    "logprobs": "fastrl.bench.logprobs",
    "linear_logprobs": "fastrl.bench.linear_logprobs",
    "grpo": "fastrl.bench.grpo",
    "dpo": "fastrl.bench.dpo",
    "native": "fastrl.bench.native",
    "grpo_step": "fastrl.bench.grpo_step",  # filled in by the trainers
    "generate": "fastrl.bench.generate",  # the hf engine against transformers generate
    "sync": "fastrl.bench.sync",
}


def suite_builder(name: str) -> Callable:
    """The ``build`` function of suite ``name``; ValueError listing the valid names for an unknown one."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name]).build
