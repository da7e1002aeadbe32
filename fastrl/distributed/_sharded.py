"""The sharded checkpoint format: model and optimizer state written by ``torch.distributed.checkpoint``.

Every rank writes only its own shards (``dcp/__<rank>_0.distcp``) and rank 0 the global metadata
(``dcp/.metadata``: each tensor's global shape and which file holds which slice), so no rank ever
gathers the full model or optimizer state. On load DCP reads, for each rank, the slices its current
shards cover, whatever the world size that wrote them: a checkpoint written on 2 ranks loads on 1 (and
on 4), and one written by a single unsharded process loads into FSDP shards.

The optimizer state is keyed by parameter name (``get_state_dict``'s convention), as in the full format;
``get_state_dict`` also initialises an optimizer that has not stepped yet, so that its state has
tensors to load into.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fastrl.distributed.env import is_distributed

DCP_DIR = "dcp"


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``model`` (and ``optimizer``) into ``directory / dcp``. Collective: every rank calls."""
    state = _state(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP says it assumes so, which is what no_dist asks
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory / DCP_DIR), no_dist=not is_distributed())


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load ``directory / dcp`` into ``model`` (and ``optimizer``), resharding to the current layout.
    Collective. Tuple hyper-parameters (Adam's betas) keep their type."""
    state = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR), no_dist=not is_distributed())
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            if isinstance(default, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
