"""Process-group environment: who am I, start the group, and the few collectives the trainers need.

The launcher contract is torchrun's: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT`` for the rendezvous) in the environment. ``accelerate launch`` sets the same variables, so
both work unchanged; a plain ``python`` run has none of them and is world size 1, where everything here
is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int = 0
    """Global rank of this process, 0 .. world_size - 1."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank among the processes on this machine: picks the GPU."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from e


def dist_info() -> DistInfo:
    """Rank, world size and local rank: from the live process group when there is one, else from the
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` environment variables (defaults 0, 1, 0)."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    info = DistInfo(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=local_rank)
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={info.rank} WORLD_SIZE={info.world_size}")
    return info


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment; a no-op at world size 1 or when joined.

    ``backend=None`` picks ``nccl`` when CUDA is available (and sets this process's GPU to
    ``LOCAL_RANK``), else ``gloo``. Returns :func:`dist_info`.
    """
    info = dist_info()
    if info.world_size == 1 or dist.is_initialized():
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "cpu:gloo,cuda:nccl"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if "nccl" in backend:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend)
    return dist_info()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single-process run)."""
    return dist_info().rank == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks of a tensor (returned as a new tensor) or a Python number (returned as a float).

    Numbers travel as fp64 on the process group's device (CUDA for nccl), so a logged metric is exact.
    """
    if not is_distributed():
        return value.clone() if isinstance(value, torch.Tensor) else float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    if isinstance(value, torch.Tensor):
        out = value.detach().to(device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / dist.get_world_size()).to(value.device)
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def all_reduce_dict_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of a dict of scalars in one collective (keys must match on every rank)."""
    if not is_distributed() or not metrics:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
