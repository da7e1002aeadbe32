"""Suite ``native``: the host-side sequence utilities, the C++ extension against the pure-Python fallback.

``pack_sequences`` (first-fit decreasing into token budgets) and ``partition_balanced`` (Karmarkar-Karp
into k parts) on random lengths; no backward and no device memory, so only times are reported.
"""

from __future__ import annotations

import random

from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip


def sizes(ctx: BenchContext) -> dict[str, int]:
    if ctx.quick:
        return dict(n=256, budget=4096, k=4)
    return dict(n=2048, budget=8192, k=8)


def _method(op: str, backend: str, args) -> Method:
    def setup(inputs):
        try:
            import fastrl.native as native
        except ImportError as err:
            raise Skip(f"fastrl.native not importable ({err})") from err
        if backend == "native" and not getattr(native, "HAS_NATIVE", False):
            raise Skip("fastrl._C not built (no C++ compiler at install time)")
        fn = getattr(native, op)
        lengths = inputs["lengths"]

        def step():
            fn(lengths, args, backend=backend)
            return None

        return step

    kind = "fastrl" if backend == "native" else "method"
    return Method(name=f"{op} ({backend})", setup=setup, kind=kind)


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    s = sizes(ctx)
    rng = random.Random(ctx.seed)
    lengths = [rng.randint(16, s["budget"] // 2) for _ in range(s["n"])]
    cases = []
    for op, arg, label in (("pack_sequences", s["budget"], "budget"), ("partition_balanced", s["k"], "k")):
        cases.append(
            Case(
                suite="native",
                name=f"{op} n={s['n']} {label}={arg}",
                shape={"n": s["n"], label: arg},
                make_inputs=lambda: {"lengths": list(lengths)},
                methods=[_method(op, "native", arg), _method(op, "python", arg)],
                measure_memory=False,
            )
        )
    return cases
