"""Where a kernel module comes from: compiled for CUDA tensors, interpreted for CPU tensors.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted
(``TRITON_INTERPRET=1``). To run the same kernels on CPU tensors (tests, CI) without forcing every CUDA
launch in the process through the interpreter, an interpreted copy of a kernel module is loaded from its
source file with the interpreter switched on for the duration of the import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_env() -> bool:
    """True when the user asked for the interpreter for everything (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _load(name: str, interpreted: bool) -> ModuleType:
    qualified = f"fastrl.triton_kernels.{name}"
    if not interpreted or interpret_env():
        return importlib.import_module(qualified)
    import triton

    spec = importlib.util.find_spec(qualified)
    assert spec is not None and spec.origin is not None, qualified
    copy_name = f"{qualified}__interpreted"
    copy_spec = importlib.util.spec_from_file_location(copy_name, spec.origin)
    module = importlib.util.module_from_spec(copy_spec)
    old = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = True
    try:
        sys.modules[copy_name] = module
        copy_spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = old
    return module


def kernels(name: str, device: torch.device) -> ModuleType:
    """The kernel module ``fastrl.triton_kernels.<name>`` fit to launch on ``device``."""
    if not triton_available():
        raise RuntimeError("impl='triton' needs the `triton` package; install it or use impl='torch'")
    if device.type == "cuda":
        return _load(name, interpreted=False)
    if device.type == "cpu":
        return _load(name, interpreted=True)
    raise ValueError(f"impl='triton' supports CUDA and CPU tensors, got device {device}")


def interpreting(device: torch.device) -> bool:
    """Whether launches on ``device`` run under the Triton interpreter.

    Kernels pass this as a ``tl.constexpr`` to cast bf16 tiles to fp32 before ``tl.dot``: the interpreter
    (Triton 3.9) returns garbage for bf16 ``tl.dot`` while fp16 and fp32 are right.
    """
    return device.type == "cpu" or interpret_env()
