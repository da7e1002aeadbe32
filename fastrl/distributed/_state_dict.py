"""Full (unsharded) state dicts of a model and its optimizer, FSDP2 or not, and their mapping to PEFT.

Everything goes through ``torch.distributed.checkpoint.state_dict``: under FSDP2 it all-gathers the
shards (a collective: every rank must call) and, with ``cpu_offload``, only rank 0 ends up holding the
tensors, on the CPU; on a plain model it is the ordinary state dict with parameter names as keys. The
optimizer state is keyed by parameter name too (not by position), so it survives a change of wrapping.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastrl.distributed.env import is_distributed

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options(strict: bool = True) -> StateDictOptions:
    # Under a process group rank 0 holds the tensors and broadcasts them to the other ranks' shards.
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_distributed(), strict=strict)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty on the other ranks under FSDP). Collective."""
    return get_model_state_dict(model, options=_GATHER)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full CPU optimizer state dict keyed by parameter name on rank 0. Collective."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_full_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`full_model_state_dict` (rank 0's dict is what counts). Collective."""
    set_model_state_dict(model, state_dict, options=_load_options())


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=_load_options())
    # The round trip turns tuple hyper-parameters (Adam's betas) into lists; give back the original type.
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            if isinstance(default, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def untie_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses tied weights such as an lm_head
    tied to the embedding): a second name for the same storage gets its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state_dict.items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", "default")
    return name if isinstance(name, str) else name[0]


def adapter_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """The active adapter's tensors from the gathered ``full`` dict, keyed as PEFT keys them in
    ``adapter_model.safetensors``, and the map from those keys back to the model's parameter names.

    PEFT names every tensor of an adapter ``<module>.<adapter_name>.<param>`` (``q_proj.lora_A.default
    .weight``) and saves it without the adapter name (``q_proj.lora_A.weight``). The selection is done
    here on the names rather than by ``peft.get_peft_model_state_dict``, which inspects the module tree
    and silently drops the adapters of layers wrapped for activation checkpointing.
    """
    marker = f".{active_adapter(model)}."
    to_fqn = {name.replace(marker, ".", 1): name for name in full if marker in name}
    if not to_fqn:
        raise ValueError(f"model has no tensors of its active adapter {active_adapter(model)!r}")
    return {key: full[name] for key, name in to_fqn.items()}, to_fqn
