"""Hugging Face causal LMs for fastrl: loading, the backbone / lm_head split, LoRA, tiny local models.

Public API (imported lazily so that ``import fastrl.models`` does not import transformers)::

    ModelConfig, load_model_and_tokenizer(cfg, *, device)      fastrl.models.loading
    backbone_hidden(model, input_ids, ...), lm_head_params(model) fastrl.models.heads
    LoraConfig, apply_lora(model, cfg), adapter_disabled(model),
    trainable_parameter_names(model)                            fastrl.models.lora
    build_char_tokenizer, build_tiny_model, save_tiny           fastrl.models.tiny
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "fastrl.models.loading",
    "load_model_and_tokenizer": "fastrl.models.loading",
    "backbone_hidden": "fastrl.models.heads",
    "lm_head_params": "fastrl.models.heads",
    "causal_lm": "fastrl.models.heads",
    "unwrap_model": "fastrl.models.heads",
    "LoraConfig": "fastrl.models.lora",
    "apply_lora": "fastrl.models.lora",
    "adapter_disabled": "fastrl.models.lora",
    "trainable_parameter_names": "fastrl.models.lora",
    "build_char_tokenizer": "fastrl.models.tiny",
    "build_tiny_model": "fastrl.models.tiny",
    "save_tiny": "fastrl.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastrl.models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
