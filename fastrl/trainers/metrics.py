"""How the loop turns the metrics of one optimizer step's micro-steps, on every rank, into one logged value.

A micro-step returns ``metrics: dict[str, float | Tensor | Metric]``. The step's value of each key is
that of the whole global batch (all micro-steps, all ranks), whatever the world size and the split
into micro-batches, by the key's reduction:

- ``Metric.mean(total, count)``: ``sum(total) / sum(count)`` over micro-steps and ranks (0 when the counts
  sum to 0). For token- or sequence-averaged metrics: ``total`` is the micro-batch's sum, ``count`` the
  number of tokens (or sequences) it is taken over, so a rank with more tokens weighs more.
- ``Metric.sum(x)`` and every key starting with ``num_``: the total over micro-steps and ranks.
- ``Metric.min(x)`` / ``Metric.max(x)``: the extreme over micro-steps and ranks (NaN entries ignored;
  NaN when all are).
- a plain number: the mean over micro-steps and ranks (every rank runs the same number of micro-steps).
  Right for values that are already the global batch's (the loss, whose normaliser is global; round
  metrics computed from gathered rewards) or means over equal counts.

``reduce_step`` does it with three small collectives per optimizer step (a checksum of the keys, which
must be the same on every rank, then a SUM and a MIN all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("mean", "sum", "min", "max")


@dataclass(frozen=True)
class Metric:
    """One micro-step's contribution to a metric: ``kind`` says how the loop reduces it (module docstring).
    ``value`` is a sum for ``mean`` (``weight`` its count) and the value itself otherwise."""

    value: float
    weight: float = 1.0
    kind: str = "mean"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Metric.kind must be one of {KINDS}, got {self.kind!r}")

    @staticmethod
    def mean(total, count) -> Metric:
        return Metric(_float(total), _float(count), "mean")

    @staticmethod
    def sum(x) -> Metric:
        return Metric(_float(x), 1.0, "sum")

    @staticmethod
    def min(x) -> Metric:
        return Metric(_float(x), 1.0, "min")

    @staticmethod
    def max(x) -> Metric:
        return Metric(_float(x), 1.0, "max")

    def to_json(self) -> dict:
        return {"metric": self.kind, "value": self.value, "weight": self.weight}

    @staticmethod
    def from_json(obj):
        """A ``Metric`` from ``to_json``'s dict; any other value as it is."""
        if isinstance(obj, dict) and "metric" in obj:
            return Metric(float(obj["value"]), float(obj["weight"]), obj["metric"])
        return obj


def _float(v) -> float:
    return float(v.detach().double().sum()) if isinstance(v, torch.Tensor) else float(v)


def as_metric(key: str, v) -> Metric:
    """``v`` (a ``Metric``, a number or a tensor, whose mean is taken) as a ``Metric`` of key ``key``."""
    if isinstance(v, Metric):
        return v
    x = float(v.detach().double().mean()) if isinstance(v, torch.Tensor) else float(v)
    return Metric(x, 1.0, "sum" if key.startswith("num_") else "mean")


def reduce_step(micro_metrics: list[dict]) -> dict[str, float]:
    """The global value of each key of the micro-steps' metric dicts (module docstring). Collective under
    a process group: every rank calls it with the same keys and kinds."""
    acc: dict[str, list[float]] = {}  # key -> [value, weight]
    kinds: dict[str, str] = {}
    for metrics in micro_metrics:
        for key, v in metrics.items():
            m = as_metric(key, v)
            if kinds.setdefault(key, m.kind) != m.kind:
                raise ValueError(f"metric {key!r} is reduced as {kinds[key]!r} and as {m.kind!r}")
            if key not in acc:
                acc[key] = [m.value, m.weight]
            elif m.kind in ("mean", "sum"):
                acc[key] = [acc[key][0] + m.value, acc[key][1] + m.weight]
            else:
                pick = min if m.kind == "min" else max
                a = acc[key][0]
                acc[key][0] = m.value if math.isnan(a) else a if math.isnan(m.value) else pick(a, m.value)
    keys = sorted(acc)
    summed = [k for k in keys if kinds[k] in ("mean", "sum")]
    extreme = [k for k in keys if kinds[k] in ("min", "max")]
    sums = torch.tensor([x for k in summed for x in acc[k]], dtype=torch.float64)
    # min and max in one MIN all-reduce: max(x) = -min(-x); NaN (nothing to take the extreme of) as +inf
    ext = torch.tensor([acc[k][0] * (1 if kinds[k] == "min" else -1) for k in extreme], dtype=torch.float64)
    ext = torch.nan_to_num(ext, nan=math.inf)
    from fastrl.distributed.env import is_distributed

    if is_distributed():
        import zlib

        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        # Every rank must bring the same keys and kinds, else the reductions below would mix metrics:
        # compare a checksum first (min of it and of its negation: equal on every rank iff all agree).
        crc = float(zlib.crc32(repr([(k, kinds[k]) for k in keys]).encode()))
        check = torch.tensor([crc, -crc], dtype=torch.float64, device=device)
        dist.all_reduce(check, op=dist.ReduceOp.MIN)
        if check.tolist() != [crc, -crc]:
            raise RuntimeError(f"the ranks log different metrics (keys and kinds); this rank's: {keys}")
        sums, ext = sums.to(device), ext.to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(ext, op=dist.ReduceOp.MIN)
        sums, ext = sums.cpu(), ext.cpu()
    out: dict[str, float] = {}
    for i, k in enumerate(summed):
        total, weight = float(sums[2 * i]), float(sums[2 * i + 1])
        out[k] = total if kinds[k] == "sum" else (total / weight if weight else 0.0)
    for i, k in enumerate(extreme):
        x = float(ext[i])
        out[k] = math.nan if math.isinf(x) else x if kinds[k] == "min" else -x
    return {k: out[k] for k in keys}


def global_sum(x: torch.Tensor | float) -> float:
    """``x`` summed over ranks (fp64), ``x`` itself at world size 1."""
    from fastrl.distributed.env import is_distributed

    t = torch.as_tensor(x, dtype=torch.float64).detach().reshape(())
    if is_distributed():
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)
