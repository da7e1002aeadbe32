"""Export a trained model in Hugging Face format, LoRA merged, written atomically.

The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` (and ``AutoTokenizer``) and needs
neither PEFT nor fastrl. A PEFT model is merged on a copy (``W + scaling * B @ A`` for each LoRA layer,
PEFT's ``merge_and_unload``); the training model is left as it was. Under FSDP2 the full weights are
gathered to rank 0 (collective: every rank calls), which rebuilds an unsharded CPU model from the config
to merge and save.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fastrl.distributed import _state_dict as sd
from fastrl.distributed._layers import unwrap_peft
from fastrl.distributed.env import barrier, dist_info


def _plain_copy_from_full(model: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU twin of an FSDP-wrapped ``model`` (PEFT or not) holding the gathered weights."""
    from transformers import AutoModelForCausalLM

    base = unwrap_peft(model)
    dtype = next((t.dtype for t in full.values() if t.is_floating_point()), torch.float32)
    twin = AutoModelForCausalLM.from_config(base.config).to(dtype)
    if sd.is_peft(model):
        from fastrl.models.lora import get_peft_model  # peft's, without its deprecation warning

        twin = get_peft_model(twin, copy.deepcopy(model.peft_config[sd.active_adapter(model)]))
    twin.load_state_dict(full, strict=True)
    return twin


def export_hf(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` (LoRA merged) and ``tokenizer`` (may be ``None``) to ``path`` with
    ``save_pretrained``; atomic (hidden temp dir, then rename). Returns ``path``."""
    from fastrl.distributed.checkpoint import _replace_dir
    from fastrl.distributed.fsdp import is_fsdp

    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"model must be a transformers or PEFT model, got {type(model).__name__}")
    path = Path(path)
    full = sd.full_model_state_dict(model) if is_fsdp(model) else None  # collective
    if dist_info().is_main:
        out = _plain_copy_from_full(model, full) if full is not None else model
        if sd.is_peft(out):
            out = (out if full is not None else copy.deepcopy(out)).merge_and_unload()
        tmp = path.parent / f".{path.name}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            out.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    barrier()
    return path
