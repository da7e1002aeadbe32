"""Native (C++) vs pure-Python sequence packing and balanced partitioning.

    python benchmarks/bench_native.py [--n 10000] [--budget 8192] [--k 8] [--repeats 5] [--out FILE]

Lengths are drawn uniformly from [1, max_len] with a fixed seed. Prints a markdown table (median wall
time over ``--repeats`` runs, speed-up, and a quality column: bins used for packing, max - min group
total for partitioning) and writes the rows as JSON when ``--out`` is given. Both backends return
identical results; the script checks that too.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from fastrl import native


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(n: int, budget: int, k: int, max_len: int, repeats: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lengths = [rng.randint(1, max_len) for _ in range(n)]
    cases = {
        f"pack_sequences(budget={budget})": lambda be: native.pack_sequences(lengths, budget, backend=be),
        f"partition_balanced(k={k})": lambda be: native.partition_balanced(lengths, k, backend=be),
        f"partition_balanced(k={k}, equal_size)": lambda be: native.partition_balanced(
            lengths, k, equal_size=True, backend=be
        ),
    }
    backends = ["python"] + (["native"] if native.HAS_NATIVE else [])
    rows = []
    for name, fn in cases.items():
        results, times = {}, {}
        for be in backends:
            times[be], results[be] = _time(lambda be=be, fn=fn: fn(be), repeats)
        assert all(r == results["python"] for r in results.values()), f"{name}: backends disagree"
        out = results["python"]
        if name.startswith("pack"):
            quality = f"{len(out)} bins (lower bound {-(-sum(lengths) // budget)})"
        else:
            sums = [sum(lengths[i] for i in g) for g in out]
            quality = f"spread {max(sums) - min(sums)} of mean {sum(sums) / k:.0f}"
        rows.append(
            {
                "op": name,
                "n": n,
                "python_ms": times["python"] * 1e3,
                "native_ms": times["native"] * 1e3 if "native" in times else None,
                "speedup": times["python"] / times["native"] if "native" in times else None,
                "quality": quality,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op | n | python ms | native ms | speed-up | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        nat = f"{r['native_ms']:.2f}" if r["native_ms"] is not None else "n/a"
        sp = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "n/a"
        lines.append(f"| {r['op']} | {r['n']} | {r['python_ms']:.2f} | {nat} | {sp} | {r['quality']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="number of sequences")
    p.add_argument("--budget", type=int, default=8192, help="packing budget in tokens")
    p.add_argument("--k", type=int, default=8, help="number of groups (data-parallel ranks)")
    p.add_argument("--max-len", type=int, default=4096, help="lengths are uniform in [1, max_len]")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    n = a.n - a.n % a.k  # equal_size needs n divisible by k
    rows = run(n, a.budget, a.k, a.max_len, a.repeats, a.seed)
    print(f"native extension: {'built' if native.HAS_NATIVE else 'NOT built (python only)'}")
    print(table(rows))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"suite": "native", "has_native": native.HAS_NATIVE, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
