"""FSDP2 weight sync on 2 CPU ranks (gloo): full tensors streamed into a receiver process.

The test launches this same file under torchrun (``python -m torch.distributed.run --nproc_per_node 2
-m tests.engine.test_sync_fsdp --worker OUT``). Every rank runs ``WeightSyncer.sync`` (``full_tensor`` is
a collective); rank 0 sends to a spawned :class:`ReceiverProcess`, rank 1 only takes part in the
gathers. Rank 0 checks, in the worker, that the receiver holds exactly what one process computes from
the same unsharded model (plain, tied, and LoRA merged), and that the trainer's shards are unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _check_model(name, build, mesh, rx):
    """``rx``: rank 0's receiver (its parameter set covers every model here), None on rank 1."""
    from fastrl.distributed.fsdp import apply_fsdp_policy
    from fastrl.engine.sync import WeightSyncer, iter_sync_weights, sync_specs
    from fastrl.models.policy import Policy

    want = {n: t.clone() for n, t in iter_sync_weights(build())}  # one process, nothing sharded
    policy = apply_fsdp_policy(Policy(build()), mesh)
    shards = {n: p.to_local().clone() for n, p in policy.named_parameters()}
    assert all(s.shape[0] < p.shape[0] for (n, s), p in zip(shards.items(), policy.parameters()) if
               p.dim() and p.shape[0] > 1), "parameters are not sharded"  # fmt: skip
    assert [s[0] for s in sync_specs(policy)] == list(want)
    if rx is not None:
        syncer = WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, bucket_bytes=30_000)
        stats = syncer.sync(policy, verify=True)
        got = rx.params()
        syncer.close()
        assert stats.n_buckets > 2 and stats.n_tensors == len(want), stats
        for n, t in want.items():
            assert torch.equal(got[n], t), f"{name}: {n}"
    else:
        WeightSyncer(None, sender=False).sync(policy)
    for n, p in policy.named_parameters():
        assert torch.equal(p.to_local(), shards[n]), f"{name}: trainer shard {n} changed"


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fastrl.distributed.env import init_distributed
    from tests.distributed._models import tiny_lora, tiny_model

    torch.set_num_threads(1)
    info = init_distributed("gloo")
    mesh = init_device_mesh("cpu", (info.world_size,))

    def lora():
        model = tiny_lora(tiny_model(seed=5))
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:  # B starts at zero; make the merge matter
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return model

    from fastrl.engine.sync import sync_specs
    from fastrl.engine.sync.receiver import ReceiverProcess

    models = {"plain": lambda: tiny_model(seed=4), "tied": lambda: tiny_model(seed=4, tie=True), "lora": lora}
    rx = ReceiverProcess(sync_specs(tiny_model()), timeout_s=60).start() if info.rank == 0 else None
    try:
        for name, build in models.items():
            _check_model(name, build, mesh, rx)
    finally:
        if rx is not None:
            rx.close()
    dist.barrier()
    if info.rank == 0:
        (out / "ok").write_text("ok")
    dist.destroy_process_group()


def test_fsdp2_two_ranks_stream_full_tensors_into_a_receiver(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.engine.test_sync_fsdp", "--worker", str(tmp_path)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-rank sync did not finish in 240 s: {err.stderr}")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "ok").read_text() == "ok"


if __name__ == "__main__":
    assert sys.argv[1] == "--worker", sys.argv
    worker(Path(sys.argv[2]))
