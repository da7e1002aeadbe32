"""A resumable stream of example indices: a fresh seeded permutation per epoch, read in batches. Its state
(epoch, position) is the data position a checkpoint saves."""

from __future__ import annotations

import torch


class EpochSampler:
    """Batches of ``batch_size`` indices from ``range(n)``; batches may span an epoch boundary, so every
    example is seen once per epoch. Epoch ``e`` is ``randperm(n)`` under seed ``seed + e`` (identity order
    when ``shuffle`` is False)."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("the dataset is empty; need at least one usable example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(self.batch_size - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


class ShardedSampler:
    """This rank's disjoint share of each global batch of ``batch_size * world_size`` indices.

    The global batches are those of ``EpochSampler(n, batch_size * world_size, seed=seed)``, the same on
    every rank, so the ranks together see exactly what one process with the whole batch sees. With
    ``lengths`` (tokens of each example) a global batch is split token-balanced
    (``fastrl.native.partition_balanced``, ``batch_size`` examples per rank: no rank waits on a longer
    share); without, rank ``r`` takes the ``r``-th contiguous slice. At world size 1 it is exactly the
    ``EpochSampler``. The state (the global position) is the same on every rank.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        shuffle: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths must have one entry per example ({n}), got {len(lengths)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.rank, self.world_size, self.lengths = batch_size, rank, world_size, lengths
        self.inner = EpochSampler(n, batch_size * world_size, seed=seed, shuffle=shuffle)

    def next_batch(self) -> list[int]:
        batch = self.inner.next_batch()
        if self.world_size == 1:
            return batch
        if self.lengths is None:
            return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        from fastrl.native import partition_balanced

        parts = partition_balanced([self.lengths[i] for i in batch], self.world_size, equal_size=True)
        return [batch[j] for j in parts[self.rank]]  # ascending positions: the global order is kept

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
