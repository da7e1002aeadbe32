"""env helpers in a single process (the 2-rank behaviour is checked under torchrun in test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastrl.distributed.env import (
    DistInfo,
    all_reduce_dict_mean,
    all_reduce_mean,
    barrier,
    dist_info,
    init_distributed,
    is_main_process,
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    return monkeypatch


def test_defaults_without_launcher(clean_env):
    assert dist_info() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert is_main_process()
    assert init_distributed() == DistInfo()  # world size 1: no process group is started
    assert not dist.is_initialized()
    barrier()  # no-op


def test_reads_launcher_variables(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)
    assert not is_main_process()


@pytest.mark.parametrize("rank, world", [("4", "4"), ("-1", "2"), ("0", "0"), ("x", "2")])
def test_bad_launcher_variables(clean_env, rank, world):
    clean_env.setenv("RANK", rank)
    clean_env.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match="RANK"):
        dist_info()


def test_init_rejects_unknown_backend(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi-ish")


def test_reductions_are_identities_in_one_process(seed):
    t = torch.randn(3)
    out = all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert all_reduce_mean(2) == 2.0 and isinstance(all_reduce_mean(2), float)
    assert all_reduce_dict_mean({"a": 1, "b": 0.5}) == {"a": 1.0, "b": 0.5}
