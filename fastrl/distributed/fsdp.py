"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for Hugging Face causal LMs, PEFT-wrapped or not.

Each decoder layer becomes one FSDP unit (its parameters are all-gathered just before it runs and freed
after), then the root takes what is left (embeddings, final norm, lm_head). Parameters are sharded
along dim 0 over the mesh; the gradients are reduce-scattered, so after ``backward`` every rank holds the
mean gradient of its shard over the ranks' local losses. Works on CUDA with NCCL and on the CPU with gloo
(pass ``init_device_mesh("cpu", (world,))``).

The trainers shard a ``fastrl.models.policy.Policy`` (``apply_fsdp_policy``): the decoder layers as above,
the wrapper as the root, so that the root's hooks run around the backbone *and* the fused loss, which
reads the lm_head weight directly (see ``fastrl/models/policy.py``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from fastrl.distributed._layers import decoder_layers
from fastrl.distributed.env import dist_info


def build_mesh(device_type: str, world_size: int, replicate: int = 1) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D over all ranks, or with ``replicate > 1`` HSDP's 2-D mesh
    ``(replicate, world_size / replicate)`` named ``("replicate", "shard")``: parameters are sharded
    within each group of ``world_size / replicate`` ranks (one node, say) and replicated across groups,
    so the all-gathers stay inside a group and only the gradient all-reduce crosses groups."""
    if not isinstance(replicate, int) or replicate < 1 or world_size % replicate:
        raise ValueError(
            f"fsdp_replicate must be a positive divisor of the world size {world_size}, got {replicate!r}"
        )
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,))
    return init_device_mesh(
        device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


def pinned_memory_available() -> bool:
    """Whether page-locked host memory can be allocated (it needs a CUDA driver)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.empty(1).pin_memory()
    except RuntimeError:
        return False
    return True


def offload_policy(cpu_offload: bool) -> OffloadPolicy:
    """``CPUOffloadPolicy`` (pinned) when asked for; unpinned, with a warning, where pinned memory is
    unavailable (host-to-device copies are then synchronous and slower); no offload otherwise."""
    if not cpu_offload:
        return OffloadPolicy()
    if pinned_memory_available():
        return CPUOffloadPolicy(pin_memory=True)
    warnings.warn(
        "train.fsdp_cpu_offload: pinned memory is unavailable here (no CUDA); offloading to unpinned CPU "
        "memory instead",
        stacklevel=2,
    )
    return CPUOffloadPolicy(pin_memory=False)


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


def apply_fsdp_policy(
    policy: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    root_reshard_after_forward: bool = False,
    offload: OffloadPolicy | None = None,
) -> nn.Module:
    """``fully_shard`` each decoder layer of ``policy.model``, then ``policy`` itself as the root.

    ``policy`` is a ``fastrl.models.policy.Policy``; options as :func:`apply_fsdp`. The root keeps its
    parameters (embeddings, final norm, lm_head) gathered from its forward to the end of the backward
    unless ``root_reshard_after_forward`` (use it for a model that only runs without gradients, such as a
    frozen reference, whose root would otherwise stay gathered). Inputs are never cast to
    ``param_dtype``: a batch carries fp32 advantages and log-probs. ``offload``: an FSDP offload policy
    (:func:`offload_policy`). Returns ``policy``.
    """
    from fastrl.models.policy import Policy

    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a fastrl.models.policy.Policy, got {type(policy).__name__}")
    if is_fsdp(policy):
        raise ValueError("policy is already FSDP-wrapped; apply_fsdp_policy once")
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    mesh = default_mesh() if mesh is None else mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kw = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload or OffloadPolicy()}
    for layer in decoder_layers(policy.model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(policy, reshard_after_forward=root_reshard_after_forward, **kw)
    return policy


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Keep every FSDP unit of ``module`` gathered once it has run, until the block ends (then reshard).

    For generation: without it each decode step would all-gather every layer again. Costs the memory of
    the unsharded model for the duration. A no-op without FSDP.
    """
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    before = [_reshards_after_forward(m) for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m, setting in zip(units, before):
            m.reshard()
            m.set_reshard_after_forward(setting, recurse=False)


def _reshards_after_forward(module: FSDPModule) -> bool:
    group = module._get_fsdp_state()._fsdp_param_group  # torch has no public getter for the setting
    return group is not None and group.post_forward_mesh_info is not None


def grad_norm_value(norm) -> float:
    """A float of the total norm ``clip_grad_norm_`` returned (a DTensor under FSDP)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) is FSDP2-wrapped."""
    return any(isinstance(m, FSDPModule) for m in model.modules())
