"""Host-side sequence utilities: packing and token-balanced partitioning, in C++ with a Python twin.

The C++ extension ``fastrl._C`` (``csrc/``) is optional. Every function takes
``backend="auto" | "native" | "python"``: ``auto`` uses the extension when it was built (``HAS_NATIVE``),
``native`` insists on it, ``python`` runs the pure-Python code below, which performs the same steps with
the same tie-breaking and so returns IDENTICAL results (the tests assert it on many random inputs).

``pack_sequences(lengths, budget)`` -- first-fit decreasing (FFD):
    visit the sequences longest first, equal lengths in index order (a stable sort), and put each in
    the first bin, in opening order, whose remaining room ``budget - sum(lengths in bin)`` is at least
    its length, opening a new bin when none has room. Returns the bins in opening order, each a list of
    original indices in ascending order. Zero-length sequences go into the first bin. Uses at most
    ``11/9 OPT + 6/9`` bins (Dosa 2007). O(n log n): a max-segment tree over the bins' remaining room
    finds the first fitting bin.

``partition_balanced(lengths, k, equal_size=False)`` -- k-way largest differencing method
(Karmarkar & Karp 1982, "The differencing method of set partitioning"):
    every sequence starts as its own k-subset partition ``({i}, {}, ..., {})``; a max-heap keyed by a
    partition's spread ``max subset sum - min subset sum`` (ties: the earlier-created partition first)
    repeatedly takes the two partitions of largest spread and combines them, pairing the subset of the
    first with the largest sum with the subset of the second with the smallest, and so on; the combined
    subsets are re-sorted by sum, descending and stable. When one partition is left, its subsets are the
    k groups, ordered by total length descending, each group's indices ascending.
    ``equal_size=True`` (what data-parallel ranks need: the same number of sequences per rank, so every
    rank runs the same number of micro-batches) needs ``len(lengths) % k == 0``: the sequences are sorted
    by length (stable) and each run of k neighbours starts one partition, one sequence per subset, so each
    group ends with exactly ``len(lengths) // k`` sequences.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Sequence

try:
    from fastrl import _C

    HAS_NATIVE = True
except ImportError:  # extension not built: the Python twin below gives the same answers
    _C = None
    HAS_NATIVE = False

BACKENDS = ("auto", "native", "python")
_INT64_MAX = 2**63 - 1

__all__ = ["BACKENDS", "HAS_NATIVE", "pack_sequences", "partition_balanced"]


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    if hasattr(lengths, "tolist"):  # torch tensors, numpy arrays
        lengths = lengths.tolist()
    try:
        out = [operator.index(x) for x in lengths]
    except TypeError as e:
        raise ValueError(f"lengths must be a sequence of integers, got {lengths!r:.80}") from e
    for i, x in enumerate(out):
        if x < 0:
            raise ValueError(f"lengths must be >= 0; lengths[{i}] = {x}")
    if sum(out) > _INT64_MAX:
        raise ValueError(f"the sum of lengths must fit in int64, got {sum(out)}")
    return out


def _check_int(name: str, value: int, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError as e:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from e
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _use_native(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and not HAS_NATIVE:
        raise RuntimeError(
            "backend='native' needs the fastrl._C extension; build it with "
            "`python setup.py build_ext --inplace` or use backend='python'"
        )
    return backend == "native" or (backend == "auto" and HAS_NATIVE)


def pack_sequences(lengths: Sequence[int], budget: int, *, backend: str = "auto") -> list[list[int]]:
    """First-fit-decreasing packing into bins of at most ``budget`` tokens (see the module docstring).

    Returns a list of bins, each a list of original indices (ascending); bins in opening order.
    Raises ``ValueError`` on ``budget < 1``, a negative length, or a sequence longer than ``budget``.
    """
    lengths = _check_lengths(lengths)
    budget = _check_int("budget", budget, 1)
    for i, x in enumerate(lengths):
        if x > budget:
            raise ValueError(f"lengths[{i}] = {x} exceeds budget {budget}: that sequence fits in no bin")
    if budget > _INT64_MAX:
        raise ValueError(f"budget must fit in int64, got {budget}")
    if _use_native(backend):
        return _C.pack_sequences(lengths, budget)
    return _pack_python(lengths, budget)


def partition_balanced(
    lengths: Sequence[int], k: int, equal_size: bool = False, *, backend: str = "auto"
) -> list[list[int]]:
    """Token-balanced partition into ``k`` groups by the k-way largest differencing method.

    Returns ``k`` lists of original indices (each ascending), ordered by total length descending; groups
    are empty where ``k > len(lengths)``. ``equal_size=True`` gives every group ``len(lengths) // k``
    sequences and needs ``len(lengths) % k == 0``. Raises ``ValueError`` on bad input.
    """
    lengths = _check_lengths(lengths)
    k = _check_int("k", k, 1)
    if equal_size and len(lengths) % k:
        raise ValueError(
            f"equal_size=True needs len(lengths) divisible by k; got {len(lengths)} sequences and k = {k}"
        )
    if _use_native(backend):
        return _C.partition_balanced(lengths, k, bool(equal_size))
    return _partition_python(lengths, k, bool(equal_size))


# ---- the pure-Python twin; mirrors csrc/packing.cpp step by step ----


def _pack_python(lengths: list[int], budget: int) -> list[list[int]]:
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: equal lengths keep index order
    # Max segment tree over the bins' remaining room; unopened bins hold `budget`, padding leaves -1.
    # All opened bins lie left of all unopened ones, so "leftmost leaf with room" is exactly first fit.
    size = 1
    while size < n:
        size *= 2
    tree = [-1] * (2 * size)
    tree[size : size + n] = [budget] * n
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for idx in order:
        need = lengths[idx]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        leaf = node - size
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(idx)
    for b in bins:
        b.sort()
    return bins


def _sort_desc(partition: list[list]) -> list[list]:
    """Subsets ``[sum, items]`` by sum, descending; stable like the C++ ``std::stable_sort``."""
    return sorted(partition, key=lambda s: -s[0])


def _partition_python(lengths: list[int], k: int, equal_size: bool) -> list[list[int]]:
    n = len(lengths)
    if n == 0:
        return [[] for _ in range(k)]
    heap: list[tuple[int, int, list[list]]] = []  # (-spread, creation counter, partition)
    counter = 0

    def push(partition: list[list]) -> None:
        nonlocal counter
        heapq.heappush(heap, (-(partition[0][0] - partition[-1][0]), counter, partition))
        counter += 1

    if equal_size:
        order = sorted(range(n), key=lambda i: lengths[i])
        for start in range(0, n, k):
            push(_sort_desc([[lengths[i], [i]] for i in order[start : start + k]]))
    else:
        for i in range(n):
            push([[lengths[i], [i]]] + [[0, []] for _ in range(k - 1)])

    while len(heap) > 1:
        a = heapq.heappop(heap)[2]
        b = heapq.heappop(heap)[2]
        merged = []
        for x, y in zip(a, reversed(b)):  # largest of a with smallest of b
            big, small = (x[1], y[1]) if len(x[1]) >= len(y[1]) else (y[1], x[1])
            big.extend(small)  # small-to-large, as in C++
            merged.append([x[0] + y[0], big])
        push(_sort_desc(merged))

    return [sorted(items) for _, items in heap[0][2]]
