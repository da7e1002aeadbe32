"""Worker for tests/distributed/test_fsdp.py, launched as ``torchrun --nproc_per_node 2 -m <this>``.

On a CPU gloo group of 2 ranks: FSDP2 (+ selective AC) one SGD-with-momentum step on each rank's half of
a batch, then a full checkpoint save / load into a differently initialised FSDP model, then an adapter-only
checkpoint and an HF export of a LoRA model. Rank 0 writes what the test compares to ``<out>/result.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from fastrl.distributed._state_dict import full_model_state_dict
from fastrl.distributed.activation_checkpoint import apply_ac
from fastrl.distributed.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from fastrl.distributed.env import (
    all_reduce_dict_mean,
    all_reduce_mean,
    barrier,
    dist_info,
    init_distributed,
    is_main_process,
)
from fastrl.distributed.fsdp import apply_fsdp, is_fsdp
from tests.distributed._models import batch, lm_loss, tiny_lora, tiny_model


def make_optimizer(params) -> torch.optim.Optimizer:
    # SGD: its step is linear in the gradient, so the comparison with one process measures the gradient.
    # (Adam's first step is ~lr * sign(grad), which turns rounding noise on gradients that are zero in
    # exact arithmetic, such as the attention key bias's, into full-size differences.)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def sharded(seed: int, mesh, *, lora: bool = False, ac: bool = True, param_dtype=None):
    model = tiny_model(seed=seed)
    if lora:
        model = tiny_lora(model)
    if ac:
        apply_ac(model, "selective", every=2)
    apply_fsdp(model, mesh, param_dtype=param_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(params)


def local_half(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = ids.shape[0] // world
    return ids[rank * per : (rank + 1) * per]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    out, seed = Path(a.out), a.seed

    info = init_distributed()
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert info == dist_info() and info.world_size == 2, info
    rank, world = info.rank, info.world_size
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"ranks": [None] * world}
    dist.all_gather_object(result["ranks"], (rank, info.local_rank, is_main_process()))

    # 1. One step on half the batch per rank equals one step on the full batch in one process.
    model, opt = sharded(seed, mesh)
    assert is_fsdp(model)
    ids = batch(seed, b=4)
    loss = lm_loss(model, local_half(ids, rank, world))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    result["loss"] = all_reduce_mean(loss.detach()).item()
    result["mean_of_floats"] = all_reduce_mean(float(rank))
    result["dict_mean"] = all_reduce_dict_mean({"rank": rank, "one": 1})
    result["weights"] = full_model_state_dict(model)

    # Mixed precision: bf16 compute, fp32 sharded parameters and gradients.
    bf16, _ = sharded(seed, mesh, param_dtype=torch.bfloat16)
    bf16_loss = lm_loss(bf16, local_half(ids, rank, world))
    bf16_loss.backward()
    result["bf16_loss"] = all_reduce_mean(bf16_loss.detach().float()).item()
    result["bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in bf16.parameters()})
    result["bf16_param_dtypes"] = sorted({str(p.dtype) for p in bf16.parameters()})
    del bf16

    # 2. Full checkpoint round trip between differently initialised sharded models.
    ckpt_dir = out / "ckpt" / "checkpoint-1"
    save_checkpoint(ckpt_dir, model=model, optimizer=opt, state={"step": 1})
    assert latest_checkpoint(out / "ckpt") == ckpt_dir
    model2, opt2 = sharded(seed + 1, mesh)
    assert load_checkpoint(ckpt_dir, model=model2, optimizer=opt2) == {"step": 1}
    result["restored"] = full_model_state_dict(model2)
    ids2 = local_half(batch(seed + 1, b=4), rank, world)
    for m, o, key in ((model, opt, "next_loss"), (model2, opt2, "next_loss_restored")):
        step_loss = lm_loss(m, ids2)
        step_loss.backward()
        o.step()
        result[key] = all_reduce_mean(step_loss.detach()).item()
    result["after_next"] = full_model_state_dict(model)
    result["after_next_restored"] = full_model_state_dict(model2)

    # 3. LoRA under FSDP: adapter-only checkpoint round trip, and a merged HF export.
    lmodel, lopt = sharded(seed, mesh, lora=True)
    lloss = lm_loss(lmodel, local_half(ids, rank, world))
    lloss.backward()
    lopt.step()
    save_checkpoint(out / "lora" / "checkpoint-1", model=lmodel, optimizer=lopt, state={}, adapter_only=True)
    lmodel2, lopt2 = sharded(seed, mesh, lora=True)
    load_checkpoint(out / "lora" / "checkpoint-1", model=lmodel2, optimizer=lopt2)
    result["lora"] = full_model_state_dict(lmodel)
    result["lora_restored"] = full_model_state_dict(lmodel2)
    with torch.no_grad():
        result["lora_logits"] = lmodel(batch(seed + 2, b=world)).logits  # same input on every rank
    export_hf(lmodel, None, out / "export")
    barrier()
    if rank == 0:
        torch.save(result, out / "result.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
