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
