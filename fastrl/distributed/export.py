"""Export a trained model in Hugging Face format, LoRA merged, streamed tensor by tensor, written atomically.

The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` (and ``AutoTokenizer``) and needs
neither PEFT nor fastrl: ``config.json``, ``generation_config.json``, the weights as safetensors files of
at most ``max_shard_bytes`` each (``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` mapping every tensor to its file; one file is plain
``model.safetensors``), and the tokenizer.

Streaming: the modules are walked in order and each tensor is materialised on its own; under FSDP2 one
parameter at a time is all-gathered (``DTensor.full_tensor``, a collective every rank joins) and only
rank 0 keeps it, until the current file is full and written. So no process ever holds more than one
file's worth of weights plus one tensor: a 70B model exports with ~``max_shard_bytes`` of rank 0's CPU
memory, not 140 GB. A LoRA layer (PEFT) is merged as it streams: ``W + scaling * B @ A`` (transposed
for ``fan_in_fan_out``), computed in fp32 and cast to ``W``'s dtype, PEFT's ``merge_and_unload``
formula; the training model is never modified. Tied weights (an lm_head sharing the embedding) are
written once, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fastrl.distributed import _state_dict as sd
from fastrl.distributed._layers import hf_name, unwrap_peft
from fastrl.distributed.env import barrier, dist_info

DEFAULT_SHARD_BYTES = 5 * 10**9


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered if it is a DTensor: collective), detached, on the CPU."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu()


def _lora_layer_type():
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _merged(module: nn.Module, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA layer's base parameters with the active adapter merged into the weight."""
    if not isinstance(module.base_layer, nn.Linear) or module.use_dora.get(adapter, False):
        raise ValueError(
            f"export merges plain LoRA on nn.Linear only; {type(module.base_layer).__name__} "
            f"(DoRA: {module.use_dora.get(adapter, False)}) is not supported"
        )
    weight = _full(module.base_layer.weight)
    if adapter in module.lora_A:
        a, b = _full(module.lora_A[adapter].weight).float(), _full(module.lora_B[adapter].weight).float()
        delta = b @ a
        if module.fan_in_fan_out:
            delta = delta.T
        weight = (weight.float() + module.scaling[adapter] * delta).to(weight.dtype)
    yield "weight", weight
    if module.base_layer.bias is not None:
        yield "bias", _full(module.base_layer.bias)


def stream_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, full CPU tensor)`` of every parameter and persistent buffer of ``model``
    (PEFT: the base model with LoRA merged), one at a time. Collective under FSDP: every rank must
    consume the whole iterator (the tensors are complete on every rank)."""
    base = unwrap_peft(model)
    lora_type = _lora_layer_type() if sd.is_peft(model) else None
    adapter = sd.active_adapter(model) if lora_type is not None else None
    seen: set[int] = set()
    skip_under: list[str] = []
    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(p) for p in skip_under):
            continue  # the parts of a LoRA layer, already merged
        prefix = hf_name(f"{mod_name}.") if mod_name else ""
        if lora_type is not None and isinstance(module, lora_type):
            skip_under.append(f"{mod_name}.")
            for pname, t in _merged(module, adapter):
                yield prefix + pname, t
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied: written once
            seen.add(id(p))
            yield prefix + pname, _full(p)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and bname not in module._non_persistent_buffers_set:
                yield prefix + bname, _full(b)


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[str]:
    """Rank 0: write the stream into safetensors files of at most ``max_shard_bytes`` (a larger single
    tensor gets a file of its own), the index when there are several. Returns the file names. Other
    ranks consume the stream (its collectives) and write nothing."""
    from safetensors.torch import save_file

    main = dist_info().is_main
    files: list[str] = []
    weight_map: dict[str, int] = {}
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(sd.untie_for_safetensors(buf), out / files[-1], metadata={"format": "pt"})
            buf, size = {}, 0

    for name, t in tensors:
        if not main:
            continue
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[name], size = t, size + nbytes
        weight_map[name] = len(files)
        total += nbytes
    if not main:
        return []
    flush()
    if len(files) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: names[i] for k, i in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    for old, new in zip(files, names):
        os.replace(out / old, out / new)
    return names


def export_hf(
    model: nn.Module, tokenizer, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write ``model`` (LoRA merged) and ``tokenizer`` (may be ``None``) to ``path`` in Hugging Face
    format, streamed (see the module docstring); atomic (hidden temp dir, then rename). Collective under
    FSDP: every rank calls, rank 0 writes. Returns ``path``."""
    from fastrl.distributed.checkpoint import _replace_dir

    base = unwrap_peft(model)
    if not hasattr(base, "config") or not hasattr(base.config, "save_pretrained"):
        raise ValueError(f"model must be a transformers or PEFT model, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    path = Path(path)
    main = dist_info().is_main
    tmp = path.parent / f".{path.name}.tmp"
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        _write_shards(stream_tensors(model), tmp, max_shard_bytes)  # collective under FSDP
        if main:
            base.config.save_pretrained(str(tmp))
            generation = getattr(base, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _replace_dir(tmp, path)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return path
