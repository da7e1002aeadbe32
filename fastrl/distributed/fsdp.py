"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for Hugging Face causal LMs, PEFT-wrapped or not.

Each decoder layer becomes one FSDP unit (its parameters are all-gathered just before it runs and freed
after), then the root takes what is left (embeddings, final norm, lm_head). Parameters are sharded
along dim 0 over the mesh; the gradients are reduce-scattered, so after ``backward`` every rank holds the
mean gradient of its shard over the ranks' local losses. Works on CUDA with NCCL and on the CPU with gloo
(pass ``init_device_mesh("cpu", (world,))``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fastrl.distributed._layers import decoder_layers
from fastrl.distributed.env import dist_info


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over all ranks, on CUDA when available, else on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (dist_info().world_size,))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` per decoder layer, then the root.

    ``param_dtype``: dtype the all-gathered parameters compute in (``None``: keep the stored dtype).
    ``reduce_dtype``: dtype of the gradient reduce-scatter (fp32 by default, so bf16 compute still sums
    gradients exactly enough). ``reshard_after_forward``: free the gathered layer after its forward and
    gather again in backward (ZeRO-3); ``False`` keeps it (ZeRO-2, more memory, less communication).
    The root never reshards after forward: its parameters are needed first in backward anyway.
    Returns ``model`` (now also an ``FSDPModule``).
    """
    if isinstance(model, FSDPModule):
        raise ValueError("model is already FSDP-wrapped (an FSDPModule); apply_fsdp once")
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    mesh = default_mesh() if mesh is None else mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) is FSDP2-wrapped."""
    return any(isinstance(m, FSDPModule) for m in model.modules())
