"""Training data: loading (hub name or local file), tokenization with loss masks, padding and packing, and a
resumable sampler.

Imported lazily (like ``fastrl.models``): ``fastrl.data.sources`` and ``DataConfig`` need no torch, so the
CLI checks a run's data before importing it."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "collate_dpo": "fastrl.data.collate",
    "collate_lm": "fastrl.data.collate",
    "collate_packed": "fastrl.data.collate",
    "collate_prompt_completion": "fastrl.data.collate",
    "pad": "fastrl.data.collate",
    "DataConfig": "fastrl.data.loading",
    "load_data": "fastrl.data.loading",
    "require_columns": "fastrl.data.loading",
    "EpochSampler": "fastrl.data.sampler",
    "dpo_example": "fastrl.data.tokenize",
    "encode_completion": "fastrl.data.tokenize",
    "encode_prompt": "fastrl.data.tokenize",
    "sft_example": "fastrl.data.tokenize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastrl.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
