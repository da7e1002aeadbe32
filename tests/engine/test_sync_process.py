"""The shared-memory transport across a real spawned process, and its faults (receiver.py, transport.py)."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch

from fastrl.engine.sync import (
    BufferHandle,
    SharedBuffer,
    SyncError,
    SyncTimeoutError,
    WeightSyncer,
    iter_sync_weights,
    sync_specs,
)
from fastrl.engine.sync.receiver import ReceiverProcess
from tests.distributed._models import tiny_model


def leftovers(prefix):
    return glob.glob(f"/dev/shm/{prefix}-*")


def test_shared_buffer_unlink_keeps_the_mapping(tmp_path):
    buf = SharedBuffer.create(1000, prefix="fastrl-test-unlink")
    assert buf.nbytes == 1000 and os.path.exists(buf.handle.path)
    other = SharedBuffer.open(buf.handle)
    buf.unlink()
    assert not os.path.exists(buf.handle.path)
    buf.tensor[:10] = 7
    assert other.tensor[:10].tolist() == [7] * 10  # still one memory
    with pytest.raises(SyncError, match="does not exist"):
        SharedBuffer.open(buf.handle)
    buf.close()
    other.close()
    lost = SharedBuffer.create(10, prefix="fastrl-test-lost")
    path = lost.handle.path
    del lost  # never opened, never closed: the finalizer unlinks
    assert not os.path.exists(path)
    with pytest.raises(SyncError, match="cannot reserve .* enlarge it"):
        SharedBuffer.create(1 << 50, prefix="fastrl-test-huge")  # a PiB: more than any /dev/shm
    assert not leftovers("fastrl-test-huge")
    with pytest.raises(ValueError, match="BufferHandle"):
        SharedBuffer.open({"kind": "shm"})
    with pytest.raises(ValueError, match="kind"):
        SharedBuffer.open(BufferHandle(kind="tcp", nbytes=1))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, tie=True)


def test_bucketed_sync_into_a_receiver_process(model):
    prefix = f"fastrl-test-{os.getpid()}"
    specs = sync_specs(model)
    with ReceiverProcess(specs, timeout_s=30) as rx:
        syncer = WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, bucket_bytes=50_000, prefix=prefix)
        assert not leftovers(prefix)
        stats = syncer.sync(model, verify=True)  # checksums of every tensor compared inside
        assert not leftovers(prefix)  # unlinked as soon as the receiver mapped it
        assert stats.n_buckets > 2 and stats.n_tensors == len(specs)
        got = rx.params()
        for name, t in iter_sync_weights(model):
            assert torch.equal(got[name], t), name
        # a second sync reuses the buffer (no second open) and delivers new values
        buffer = syncer.buffer
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)
        syncer.sync(model, verify=True)
        assert syncer.buffer is buffer
        assert torch.equal(rx.params()["model.norm.weight"], model.model.norm.weight)

        # a name the receiver does not know is refused before anything is copied, with the name
        extra = tiny_model(seed=3, tie=True)
        extra.register_parameter("surprise", torch.nn.Parameter(torch.ones(3)))
        with pytest.raises(ValueError, match="does not know: surprise"):
            WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, bucket_bytes=1 << 30).sync(extra)
        # and a dtype mismatch names the tensor
        with pytest.raises(ValueError, match="lm_head|embed_tokens.*sent bfloat16"):
            WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, dtype=torch.bfloat16).sync(model)
        syncer.close()
    assert not leftovers(prefix)


def test_stuck_then_killed_receiver_raises_within_the_timeout(model):
    rx = ReceiverProcess(sync_specs(model), timeout_s=30).start()
    try:
        syncer = WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, bucket_bytes=50_000)
        syncer.sync(model)
        # stuck: no answer within the timeout -> SyncTimeoutError naming the bucket
        rx.channel.timeout_s = 2.0
        rx.stall(4.0)
        t0 = time.monotonic()
        with pytest.raises(SyncTimeoutError, match=r"within 2 s during bucket 0"):
            syncer.sync(model)
        assert time.monotonic() - t0 < 10
        # the late answer to that bucket is dropped, not taken for the next request's
        rx.channel.timeout_s = 30.0
        with torch.no_grad():
            model.model.norm.weight.mul_(-1.0)
        syncer.sync(model, verify=True)
        assert torch.equal(rx.params()["model.norm.weight"], model.model.norm.weight)

        # killed mid-sync -> SyncError naming the bucket, long before the timeout
        def send_bucket(bucket):
            if bucket.index == 1:
                rx.proc.kill()
            return rx.send_bucket(bucket)

        syncer.send_bucket = send_bucket
        t0 = time.monotonic()
        with pytest.raises(SyncError, match="died during bucket 1"):
            syncer.sync(model)
        assert time.monotonic() - t0 < 20
        syncer.close()
    finally:
        rx.close()
    assert rx.proc is None
