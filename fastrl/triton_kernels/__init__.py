"""Triton kernels and their launchers. No autograd and no policy here: see ``fastrl.ops``.

Kernel modules are imported lazily through :func:`fastrl.triton_kernels._runtime.kernels`, which hands out
a compiled copy for CUDA tensors and an interpreted copy (``TRITON_INTERPRET`` semantics) for CPU tensors,
so both can live in one process.
"""
