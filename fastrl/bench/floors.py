"""The floors the ratios are taken to: matrix work at the card's matmul ceiling, memory traffic at its
bandwidth ceiling.

On an H200 running bf16/fp16 the ceilings are benchmarks/ANCHORS.md's measured ones (790 TFLOP/s dense bf16,
4.3 TB/s), so ratios match the anchor tables. Anywhere else (and for fp32 on an H200) they are measured at
the start of the run (one large matmul in the bench dtype, one large copy) and the JSON says so: spec-sheet
numbers (989 TFLOP/s for an H100 SXM) are never reached by a real matmul and would make every floor look
further away than it is.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from fastrl.bench.harness import device_name, synchronize

# name fragment -> (TFLOP/s, TB/s) measured on that card (benchmarks/ANCHORS.md), for bf16/fp16 matmuls:
# an fp32 run (TF32 or not) has a far lower matmul ceiling and measures its own.
KNOWN = {"H200": (790.0, 4.3)}
KNOWN_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(kw_only=True)
class Ceilings:
    tflops: float
    tbps: float
    source: str

    def matmul_ms(self, flops: float) -> float:
        return flops / (self.tflops * 1e12) * 1e3

    def memory_ms(self, nbytes: float) -> float:
        return nbytes / (self.tbps * 1e12) * 1e3


def ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    name = device_name(device)
    for fragment, (tflops, tbps) in KNOWN.items():
        if device.type == "cuda" and dtype in KNOWN_DTYPES and fragment in name:
            return Ceilings(
                tflops=tflops, tbps=tbps, source=f"{fragment}: measured ceilings from benchmarks/ANCHORS.md"
            )
    return measure_ceilings(device, dtype)


def _best_ms(fn, device: torch.device, runs: int) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Best-of-runs throughput of one square matmul (2 n^3 flops) and one copy (2 x bytes moved)."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = _best_ms(lambda: torch.mm(a, b), device, runs=10)
    numel = (1 << 28) if gpu else (1 << 23)  # 512 MiB / 32 MiB of bf16/fp32-ish data
    src = torch.empty(numel, device=device, dtype=torch.float16 if gpu else torch.float32)
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, runs=10)
    nbytes = 2 * src.numel() * src.element_size()
    return Ceilings(
        tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12,
        tbps=nbytes / (copy_ms * 1e-3) / 1e12,
        source=f"measured in this run: {n}^3 {str(dtype).removeprefix('torch.')} matmul, "
        f"{nbytes // 2 // 2**20} MiB copy (best of runs)",
    )
