"""Bucket layout, packing/unpacking and checksums (fastrl/engine/sync/buckets.py, verify.py)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from fastrl.engine.sync import (
    BucketPacker,
    ChecksumMismatchError,
    TensorSlot,
    bucket_nbytes,
    check_compatible,
    checksum,
    compare_checksums,
    plan_buckets,
    unpack_bucket,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool]  # fmt: skip
SHAPES = [(), (0,), (3, 0), (1,), (7,), (5, 3), (2, 3, 5), (129,), (1, 1, 1)]


def random_tensor(dtype, shape, g):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g).to(dtype)


def stream(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            out.append((f"t{i}_{j}", random_tensor(dtype, shape, g)))
    # a non-contiguous tensor and one at an odd storage offset
    base = random_tensor(torch.float32, (6, 8), g)
    out.append(("transposed", base.T))
    out.append(("odd_offset", random_tensor(torch.bfloat16, (11,), g)[1:]))
    return out


def specs_of(pairs):
    return [(n, t.dtype, tuple(t.shape)) for n, t in pairs]


def test_plan_aligns_and_respects_bucket_size(seed):
    pairs = stream(seed)
    plan = plan_buckets(specs_of(pairs), bucket_bytes=1024, align=256)
    names = [s.name for b in plan for s in b]
    assert names == [n for n, _ in pairs]  # stream order, every tensor once
    for bucket in plan:
        assert bucket_nbytes(bucket) <= 1024 or len(bucket) == 1  # an oversize tensor alone
        prev_end = 0
        for s in bucket:
            assert s.offset % 256 == 0 and s.offset >= prev_end
            assert s.offset - prev_end < 256  # no gap beyond the alignment padding
            prev_end = s.offset + s.nbytes
    # buckets are closed only when the next tensor does not fit
    for a, b in zip(plan, plan[1:]):
        nxt = b[0]
        start = -(-bucket_nbytes(a) // 256) * 256
        assert start + nxt.nbytes > 1024


def test_oversize_tensor_goes_alone():
    specs = [("a", torch.float32, (10,)), ("big", torch.float32, (1000,)), ("b", torch.float32, (10,))]
    plan = plan_buckets(specs, bucket_bytes=1024)
    assert [[s.name for s in b] for b in plan] == [["a"], ["big"], ["b"]]
    assert bucket_nbytes(plan[1]) == 4000 and plan[1][0].offset == 0


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], bucket_bytes=0)
    with pytest.raises(ValueError, match="align"):
        plan_buckets([], align=100)
    with pytest.raises(ValueError, match="duplicate"):
        plan_buckets([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(ValueError, match="dtype"):
        plan_buckets([("a", "floaty", (1,))])


@pytest.mark.parametrize("bucket_bytes", [256, 1024, 1 << 20])
def test_pack_unpack_round_trip_is_bit_identical(seed, bucket_bytes):
    pairs = stream(seed)
    plan = plan_buckets(specs_of(pairs), bucket_bytes=bucket_bytes)
    buffer = torch.zeros(max(bucket_nbytes(b) for b in plan), dtype=torch.uint8)
    got, flushed = {}, []

    def flush(slots, used):
        assert used == bucket_nbytes(slots)
        flushed.append(slots)
        for name, view in unpack_bucket(buffer, slots):
            assert view.numel() == 0 or view.untyped_storage().data_ptr() == buffer.data_ptr()  # a view
            got[name] = view.clone()
        buffer.fill_(0xAB)  # the next bucket must not depend on leftovers

    packer = BucketPacker(buffer, flush, bucket_bytes=bucket_bytes)
    for name, t in pairs:
        packer.add(name, t)
    packer.finish()
    assert flushed == plan  # the packer lays out exactly what plan_buckets planned
    for name, t in pairs:
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.bool else g,
                           t.view(torch.uint8) if t.dtype == torch.bool else t), name  # fmt: skip
        assert checksum(g) == checksum(t), name


def test_packer_refuses_a_tensor_larger_than_the_buffer():
    buffer = torch.zeros(512, dtype=torch.uint8)
    packer = BucketPacker(buffer, lambda s, n: None, bucket_bytes=256)
    with pytest.raises(ValueError, match="does not fit"):
        packer.add("big", torch.zeros(1000))


def test_slot_pickles_and_round_trips_through_json():
    slot = TensorSlot(name="w", dtype="bfloat16", shape=(3, 4), offset=256, nbytes=24)
    assert pickle.loads(pickle.dumps(slot)) == slot
    assert TensorSlot.from_json(json.loads(json.dumps(slot.to_json()))) == slot


def test_unpack_checks_slots():
    buffer = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        unpack_bucket(buffer, [TensorSlot("w", "float32", (32,), 0, 128)])
    with pytest.raises(ValueError, match="do not fit"):
        unpack_bucket(buffer, [TensorSlot("w", "float32", (3,), 0, 16)])


def test_checksum_detects_any_change(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(1001, generator=g).bfloat16()
    c = checksum(t)
    assert c == checksum(t.clone())
    flipped = t.clone()
    flipped.view(torch.int16)[500] ^= 1  # one bit
    assert checksum(flipped) != c
    swapped = t.clone()
    swapped[[3, 700]] = swapped[[700, 3]]
    if not torch.equal(swapped, t):
        assert checksum(swapped) != c  # order matters (the weighted sum)
    assert checksum(t.view(1, 1001)) != c  # shape is part of it
    assert checksum(t.view(torch.float16)) != c  # so is dtype


def test_compare_checksums_lists_names():
    a = {"x": checksum(torch.ones(3)), "y": checksum(torch.zeros(3)), "z": checksum(torch.ones(1))}
    compare_checksums(a, dict(a))
    b = {"x": a["x"], "y": checksum(torch.ones(3)), "extra": a["x"]}
    with pytest.raises(ChecksumMismatchError, match="differ: y.*not reported.*: z.*never sent: extra"):
        compare_checksums(a, b)


def test_check_compatible_names_unknown_and_mismatched():
    known = {"a": torch.zeros(2, 3), "b": (torch.bfloat16, (4,))}
    ok = [TensorSlot("a", "float32", (2, 3), 0, 24), TensorSlot("b", "bfloat16", (4,), 256, 8)]
    check_compatible(ok, known)
    bad = [TensorSlot("a", "float16", (2, 3), 0, 12), TensorSlot("b", "bfloat16", (5,), 256, 10),
           TensorSlot("nope.weight", "float32", (1,), 512, 4)]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"does not know: nope\.weight.*a: sent float16.*b: sent bfloat16\[5\]"
    ):
        check_compatible(bad, known)
