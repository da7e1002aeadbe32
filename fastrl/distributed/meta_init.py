"""Meta-device initialisation under FSDP2: no rank ever holds the full model.

1. :func:`build_on_meta` builds the model from its config with every *parameter* on the meta device (no
   memory, no init compute); buffers (rotary ``inv_freq`` and the like, which the config computes and no
   weight file holds) are built for real, they are small.
2. The trainer applies activation checkpointing and ``fully_shard`` as usual: FSDP2 shards meta
   parameters into meta DTensors.
3. :func:`materialize_and_load` allocates each rank's shards on its device (``to_empty``; the buffers
   are kept) and fills them from the safetensors files: for each parameter, this rank's slice only
   (``safe_open(...).get_slice(name)[rows]``, the rows of its dim-0 shard, or whatever the placements
   say), so the bytes read per rank are ~the model size / world size, plus one tensor's slice in flight.

LoRA runs build the adapters on the meta device too (PEFT wraps the meta model); they are not in the
weight files: :func:`init_lora_adapters` then sets them from a generator seeded by the run's seed and
each adapter's name, which the unsharded trainers use as well, so a LoRA run starts from the same
adapters at any world size, sharded or not.

The peak it holds (its own shards plus the largest slice in flight) is returned with the model's
full size, so a run can print both: ``model_bytes / world_size + max_slice_bytes`` versus ``model_bytes``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastrl.distributed._layers import hf_name


@contextlib.contextmanager
def params_on_meta():
    """Inside the block, every parameter a module registers moves to the meta device (buffers do not).

    An existing meta parameter is registered as it is, so tied weights (``lm_head.weight =
    embed_tokens.weight``) stay one parameter."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def weight_files(model_dir: str | Path) -> dict[str, Path] | None:
    """``{tensor name: file}`` of a local Hugging Face model folder (sharded with an index, or one
    ``model.safetensors``); ``None`` if it has no safetensors weights."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def build_on_meta(model_cfg):
    """The Hugging Face model of ``model_cfg`` (a ``fastrl.models.ModelConfig``) with meta parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastrl.models.loading import DTYPES

    config = AutoConfig.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    config._attn_implementation = model_cfg.attn_implementation
    dtype = DTYPES[model_cfg.torch_dtype]
    if not isinstance(dtype, torch.dtype):  # "auto": the dtype the checkpoint was saved in
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code
        )
    return model


def file_key(name: str) -> str:
    """A parameter's name in the base model's weight files: wrapper module names removed and, under a
    PEFT model, its ``base_model.model.`` prefix and the ``.base_layer`` of wrapped layers."""
    key = hf_name(name).removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


def _is_lora(key: str) -> bool:
    return ".lora_" in key


def init_lora_adapters(model: nn.Module, seed: int) -> int:
    """Initialise ``model``'s LoRA adapters (in place, after the base weights are loaded) so that they do
    not depend on the world size, on sharding or on the RNG state: ``lora_A`` ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) (PEFT's default, kaiming-uniform with a = sqrt(5)), drawn from a generator seeded by
    ``seed`` and the parameter's name, full-size on the CPU (adapters are small) and this rank's slice
    kept; ``lora_B`` = 0. Returns the number of tensors set. ``ValueError`` for adapter kinds other than
    linear ``lora_A`` / ``lora_B`` (embedding adapters, DoRA)."""
    import zlib

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    count = 0
    for name, p in model.named_parameters():
        key = file_key(name)
        if not _is_lora(key):
            continue
        if ".lora_A." in key and p.dim() == 2:
            # one 32-bit seed (the CPU generator's Mersenne twister ignores higher bits) of both
            g = torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}:{key}".encode()))
            bound = 1.0 / p.shape[1] ** 0.5
            full = (torch.rand(tuple(p.shape), generator=g, dtype=torch.float32) * 2 - 1) * bound
        elif ".lora_B." in key:
            full = torch.zeros(tuple(p.shape))
        else:
            raise ValueError(
                f"seeded LoRA init knows linear lora_A / lora_B adapters, not {key!r}: set "
                "train.fsdp_meta_init false to load this LoRA model the ordinary way"
            )
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
        else:
            shape, offset, local = tuple(p.shape), (0,) * p.dim(), p.data
        part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        with torch.no_grad():
            local.copy_(part.reshape(local.shape).to(local.dtype))
        count += 1
    return count


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    model_bytes: int
    """Bytes of the whole model (every parameter once)."""
    local_bytes: int
    """Bytes of this rank's shards."""
    max_slice_bytes: int
    """The largest slice read at once."""

    @property
    def peak_bytes(self) -> int:
        return self.local_bytes + self.max_slice_bytes


def materialize_and_load(model: nn.Module, model_dir: str | Path, device: torch.device) -> LoadReport:
    """Allocate ``model``'s (sharded) meta parameters on ``device`` and load this rank's slice of each
    from the safetensors files of ``model_dir``; buffers keep their values. ``ValueError`` naming a
    parameter the files lack or hold in another shape."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = weight_files(model_dir)
    if files is None:
        raise ValueError(f"meta-device loading needs safetensors weights in {model_dir}")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    handles: dict[Path, object] = {}
    total = local_total = max_slice = 0
    with contextlib.ExitStack() as stack:
        for name, p in model.named_parameters():
            key = file_key(name)
            if _is_lora(key):  # not in the base model's files: init_lora_adapters fills them
                total += p.numel() * p.element_size()
                local_total += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                continue
            if key not in files:
                raise ValueError(f"parameter {key!r} is not in the weight files of {model_dir}")
            if files[key] not in handles:
                handles[files[key]] = stack.enter_context(safe_open(str(files[key]), framework="pt"))
            sl = handles[files[key]].get_slice(key)
            if list(sl.get_shape()) != list(p.shape):
                raise ValueError(f"parameter {key!r} has shape {list(sl.get_shape())} in {model_dir}, "
                                 f"the model expects {list(p.shape)}")  # fmt: skip
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
            else:
                shape, offset, local = tuple(p.shape), (0,) * p.dim(), p.data
            if local.numel():
                part = sl[tuple(slice(o, o + s) for o, s in zip(offset, shape))] if p.dim() else sl[:]
                with torch.no_grad():
                    local.copy_(part.reshape(local.shape))
                max_slice = max(max_slice, part.numel() * part.element_size())
            total += p.numel() * p.element_size()
            local_total += local.numel() * local.element_size()
    return LoadReport(model_bytes=total, local_bytes=local_total, max_slice_bytes=max_slice)
