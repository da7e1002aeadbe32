"""Triton helpers shared by the kernel modules, written to run under the interpreter as well as compiled.

Why helpers come through :func:`load` rather than as module-level ``@triton.jit`` functions: ``triton.jit``
binds a function to compiled or interpreted mode when it decorates it (``triton.knobs.runtime.interpret``
at that moment). ``_runtime.kernels`` runs the kernels of CPU tensors from an interpreted copy of their
module, and such a copy can only call jit helpers decorated in interpreted mode too (a compiled-mode one
raises "Cannot call @triton.jit'd outside of the scope of a kernel"). A plain import of a shared module
would give every kernel module whichever mode happened to import it first. ``load()`` decorates the
helpers once per mode and returns the set that matches the mode of the kernel module being imported::

    from fastrl.triton_kernels import _lang

    _L = _lang.load()   # at module level of a kernel module
    _add, _max, _to_bf16_rtne = _L.add, _L.maximum, _L.to_bf16_rtne

Reductions go through ``tl.reduce(x, axis, _L.add)`` with triton.language's own combine functions
(exactly what ``tl.sum`` / ``tl.max`` compile to), which the interpreter recognises and runs as one numpy
reduction; constants come from ``tl.full`` (``tl.zeros`` is a jit helper too).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl


def _to_bf16_rtne(x):
    # The interpreter (Triton 3.9) truncates fp32 -> bf16 casts where the compiled cast rounds to nearest
    # even; rounding by integer arithmetic on the fp32 bits gives the compiled result in both modes.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@functools.cache
def _helpers(interpret: bool) -> SimpleNamespace:
    assert bool(triton.knobs.runtime.interpret) == interpret
    return SimpleNamespace(
        add=tl.standard._sum_combine,  # combine functions for tl.reduce
        maximum=tl.standard._elementwise_max,
        to_bf16_rtne=triton.jit(_to_bf16_rtne),  # fp32 -> bf16, round to nearest even
    )


def load() -> SimpleNamespace:
    """The helpers (``add``, ``maximum``, ``to_bf16_rtne``) decorated in the mode now in force: interpreted
    while ``_runtime`` imports an interpreted kernel copy or under ``TRITON_INTERPRET=1``, else compiled.
    Call it at module level of a kernel module."""
    return _helpers(bool(triton.knobs.runtime.interpret))
