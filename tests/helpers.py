"""The comparison helper every kernel test uses.

Tolerance rule (after Cut Cross-Entropy's): a kernel passes when its error against a float64 truth is at
most PyTorch's own error at the same input dtype plus a small absolute term, elementwise:
``|truth - kernel| <= factor * max(|truth - torch|, q90(|truth - torch|)) + atol + 4 ulp32 * |truth|``; the
floor (PyTorch's 90th-percentile error over the tensor) keeps an element where PyTorch happens to round
exactly from demanding the same luck of the kernel, and the last term scales atol's few fp32 ulps to values
far from one. A failure prints the worst indices.
"""

from __future__ import annotations

import torch

# Absolute slack per input dtype: a few ulps of an fp32 accumulation of values of order one, and of the
# input rounding for the half types.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_to_truth(
    name: str,
    kernel: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    *,
    dtype: torch.dtype,
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """``|truth - kernel| <= factor * max(|truth - reference|, q90 |truth - reference|) + atol`` elementwise,
    with a mismatch report.

    ``reference`` is the plain PyTorch computation at the same input dtype, so the bound is PyTorch's own
    error there; ``truth`` is a float64 computation.
    """
    atol = ATOL[dtype] if atol is None else atol
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    k, r, t = kernel.double(), reference.double(), truth.double()
    both_nonfinite = ~torch.isfinite(t) & (k == t)
    err = (k - t).abs()
    # PyTorch's error at each element, floored at its 90th-percentile error over the tensor: two
    # computations with different (equally valid) rounding orders each err by about the same amount, so
    # where PyTorch's error is accidentally ~0 at one element the pointwise bound alone would be flaky
    # (seen on fp32 reductions over a 50k vocabulary). A percentile, not the max, so that a few outliers
    # of PyTorch's do not widen the bound everywhere.
    ref_err = (r - t).abs()
    finite = ref_err[torch.isfinite(ref_err)]
    typical = finite.quantile(0.9) if finite.numel() else ref_err.new_zeros(())
    # atol is a few fp32 ulps for values of order one; the same few ulps scale with larger values.
    ulps = 4 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = factor * torch.maximum(ref_err, typical) + atol + ulps * t.abs()
    bad = ~((err <= bound) | both_nonfinite)
    if bool(bad.any()):
        idx = bad.nonzero()[:8].tolist()
        rows = [
            f"  at {tuple(i)}: kernel={k[tuple(i)].item():.6g} torch={r[tuple(i)].item():.6g} "
            f"truth={t[tuple(i)].item():.6g} err={err[tuple(i)].item():.3g} "
            f"bound={bound[tuple(i)].item():.3g}"
            for i in idx
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside |truth-kernel| <= "
            f"{factor}*|truth-torch| + {atol:g} (dtype {dtype})\n" + "\n".join(rows)
        )
