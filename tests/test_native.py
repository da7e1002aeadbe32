"""fastrl.native: the C++ extension and its Python twin agree exactly, and both are right.

Rightness is checked against independent oracles (a plain quadratic first-fit-decreasing, hand-worked
examples of the differencing method) and invariants (every index exactly once, bins within budget, equal
group sizes); the native/python equality then carries it over to the extension.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastrl import native
from fastrl.native import pack_sequences, partition_balanced

needs_native = pytest.mark.skipif(not native.HAS_NATIVE, reason="fastrl._C not built")
BACKENDS = ["python", pytest.param("native", marks=needs_native)]


def naive_ffd(lengths, budget):
    """Textbook FFD with a linear scan over the bins: the oracle for the segment-tree version."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def random_lengths(rng: random.Random, n: int) -> list[int]:
    kind = rng.choice(["uniform", "small", "zeros", "equal", "skewed"])
    if kind == "uniform":
        return [rng.randint(0, 100) for _ in range(n)]
    if kind == "small":
        return [rng.randint(0, 3) for _ in range(n)]
    if kind == "zeros":
        return [0] * n
    if kind == "equal":
        return [rng.randint(1, 50)] * n
    return [int(rng.paretovariate(1.2) * 10) for _ in range(n)]


def check_is_partition(groups, n):
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(n)), "every index exactly once"
    for g in groups:
        assert g == sorted(g), "indices ascending within a group"


@needs_native
def test_native_matches_python_on_random_inputs(seed):
    rng = random.Random(seed)
    for _ in range(400):
        n = rng.choice([0, 1, 2, 3, 7, 16, 33, rng.randint(0, 200)])
        lengths = random_lengths(rng, n)
        budget = max(lengths + [1]) + rng.choice([0, 0, 1, rng.randint(0, 300)])
        assert pack_sequences(lengths, budget, backend="native") == pack_sequences(
            lengths, budget, backend="python"
        ), (lengths, budget)
        k = rng.choice([1, 2, 3, 4, 8, rng.randint(1, n + 3)])
        for equal_size in [False, True] if n % k == 0 else [False]:
            got = partition_balanced(lengths, k, equal_size, backend="native")
            want = partition_balanced(lengths, k, equal_size, backend="python")
            assert got == want, (lengths, k, equal_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_matches_naive_ffd(seed, backend):
    rng = random.Random(seed)
    for _ in range(200):
        lengths = random_lengths(rng, rng.randint(0, 60))
        budget = max(lengths + [1]) + rng.randint(0, 120)
        bins = pack_sequences(lengths, budget, backend=backend)
        assert bins == naive_ffd(lengths, budget), (lengths, budget)
        check_is_partition(bins, len(lengths))
        assert all(sum(lengths[i] for i in b) <= budget for b in bins)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_worked_example_and_edges(backend):
    # Longest first: 8 -> bin0, 7 -> bin1, 5 -> bin2, 5 -> bin2, 3 -> bin1, 2 -> bin0.
    assert pack_sequences([3, 7, 5, 5, 2, 8], 10, backend=backend) == [[4, 5], [0, 1], [2, 3]]
    assert pack_sequences([], 5, backend=backend) == []
    assert pack_sequences([0, 0, 0], 1, backend=backend) == [[0, 1, 2]]
    assert pack_sequences([4, 4, 4], 4, backend=backend) == [[0], [1], [2]]
    assert pack_sequences([2, 2, 2, 2], 4, backend=backend) == [[0, 1], [2, 3]]
    assert pack_sequences(torch.tensor([1, 9, 1]), 10, backend=backend) == [[0, 1], [2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partition_worked_example(backend):
    # Differencing [8, 7, 6, 5, 4]: (8|7) -> 1, (6|5) -> 1, 4 with (8|7) -> {4,7}|{8} = 11|8,
    # then with (6|5) -> {4,7,5}|{8,6} = 16|14.
    assert partition_balanced([8, 7, 6, 5, 4], 2, backend=backend) == [[1, 3, 4], [0, 2]]
    assert partition_balanced([], 3, backend=backend) == [[], [], []]
    assert partition_balanced([], 3, equal_size=True, backend=backend) == [[], [], []]
    assert partition_balanced([5, 1], 4, backend=backend) == [[0], [1], [], []]
    # Zeros, equal sizes: starting partitions {0}|{1} and {2}|{3}; largest-with-smallest pairs 0 with 3.
    assert partition_balanced([0, 0, 0, 0], 2, equal_size=True, backend=backend) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partition_invariants(seed, backend):
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randint(0, 80)
        lengths = random_lengths(rng, n)
        k = rng.randint(1, 12)
        groups = partition_balanced(lengths, k, backend=backend)
        assert len(groups) == k
        check_is_partition(groups, n)
        sums = [sum(lengths[i] for i in g) for g in groups]
        assert sums == sorted(sums, reverse=True), "groups by total length, descending"
        if k == 2:  # two-way differencing never leaves a difference above the largest item
            assert sums[0] - sums[1] <= max(lengths + [0])
        if n and n % k == 0:
            eq = partition_balanced(lengths, k, equal_size=True, backend=backend)
            check_is_partition(eq, n)
            assert all(len(g) == n // k for g in eq)
            if len(set(lengths)) == 1:
                assert len({sum(lengths[i] for i in g) for g in eq}) == 1, "equal lengths split evenly"


@pytest.mark.parametrize("backend", BACKENDS)
def test_partition_balances_better_than_round_robin(seed, backend):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 4096) for _ in range(512)]
    groups = partition_balanced(lengths, 8, equal_size=True, backend=backend)
    sums = [sum(lengths[i] for i in g) for g in groups]
    rr = [sum(lengths[r::8]) for r in range(8)]
    assert max(sums) - min(sums) <= max(rr) - min(rr)
    assert max(sums) - min(sums) <= max(lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error(backend):
    with pytest.raises(ValueError, match="budget"):
        pack_sequences([1, 2], 0, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 exceeds budget 8"):
        pack_sequences([1, 9], 8, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1"):
        pack_sequences([-1, 2], 8, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[2\] = -3"):
        partition_balanced([1, 2, -3], 2, backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        partition_balanced([1, 2], 0, backend=backend)
    with pytest.raises(ValueError, match="divisible by k"):
        partition_balanced([1, 2, 3], 2, equal_size=True, backend=backend)
    with pytest.raises(ValueError, match="lengths must be a sequence of integers"):
        pack_sequences([1.5, 2], 8, backend=backend)
    with pytest.raises(ValueError, match="budget must be"):
        pack_sequences([1], 2.0, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        pack_sequences([1], 2, backend="cuda")


@needs_native
def test_extension_raises_value_error_directly():
    # Callers of fastrl._C itself get the same ValueError from the C++ checks.
    from fastrl import _C

    with pytest.raises(ValueError, match="exceeds budget"):
        _C.pack_sequences([5], 4)
    with pytest.raises(ValueError, match="k must be"):
        _C.partition_balanced([1], 0, False)


def test_native_backend_without_extension(monkeypatch):
    monkeypatch.setattr(native, "HAS_NATIVE", False)
    with pytest.raises(RuntimeError, match="build_ext"):
        pack_sequences([1], 2, backend="native")
    assert pack_sequences([1, 1], 2, backend="auto") == [[0, 1]]  # auto falls back to Python
