"""GPU check of the weight-sync machinery (issue 7): the CUDA-IPC bucket path against a device copy.

For Qwen2.5-1.5B- and 7B-shaped bf16 parameter sets, in one run: a flat device-to-device ``copy_`` of
all the bytes (the floor), per-tensor ``copy_`` in process, and the bucketed WeightSyncer into a
separate receiver process through a CUDA-IPC buffer (found by GPU UUID), 64 and 512 MiB buckets. Then
one verified sync (checksums of every tensor, computed on both sides) of the 1.5B set. Prints the
table and, last, the bandwidth ratio of the 512 MiB IPC path to the flat copy (goal: >= 50%).
Writes sync.json and sync.md under --out. Exit code 1 on any failure (a method that fails, a checksum
mismatch); a ratio under the goal is reported, not an error.

    python benchmarks/gpu_sync_check.py --out "$OUT/sync"        # about 2-3 minutes on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GOAL = 0.5


def verified_sync(set_name: str) -> str:
    """One sync with verify=True into a receiver process; returns a one-line summary."""
    from fastrl.bench.sync import SHAPES, flat_params, qwen2_specs
    from fastrl.engine.sync import WeightSyncer
    from fastrl.engine.sync.receiver import ReceiverProcess

    specs = qwen2_specs(SHAPES[set_name], torch.bfloat16)
    _, src = flat_params(specs, torch.device("cuda"), seed=1)
    with ReceiverProcess(specs, timeout_s=120, device="cuda") as rx:
        syncer = WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, device="cuda")
        stats = syncer.sync_stream(specs, src.items(), verify=True)  # raises on any mismatch
        syncer.close()
    return (
        f"verified sync {set_name}: {stats.n_tensors} tensors in {stats.n_buckets} buckets, "
        f"{stats.bytes / 1e9:.2f} GB, checksums equal for every tensor ({stats.seconds:.2f} s with "
        "checksums)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_out/sync")
    p.add_argument("--sets", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device visible", file=sys.stderr)
        return 2
    from fastrl.bench import harness
    from fastrl.bench.harness import BenchContext
    from fastrl.bench.sync import cases_for

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(
        device=torch.device("cuda"), dtype=torch.bfloat16, gpu_shapes=True, repeats=a.repeats, warmup=a.warmup
    )
    print(f"gpu_sync_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    records, lines, summary, failed = [], [], [], False
    for case in cases_for(ctx, a.sets):
        t0 = time.perf_counter()
        rows = harness.run_case(case, ctx, progress=lambda m: print(f"  done {m}", flush=True))
        lines += [
            f"## {case.name} ({time.perf_counter() - t0:.0f} s)",
            "",
            "| method | status | ms | x flat copy | note |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            ms = f"{r.ms:.3g}" if r.ms is not None else ""
            xb = f"{r.x_baseline:.2f}" if r.x_baseline is not None else ""
            lines.append(f"| {r.method} | {r.status} | {ms} | {xb} | {r.note} |")
            if r.status.startswith("fails") or r.status == "OOM":
                failed = True
        lines.append("")
        flat = next((r for r in rows if r.kind == "baseline" and r.ms), None)
        ipc = next((r for r in rows if r.kind == "fastrl" and r.ms), None)
        if flat and ipc:
            ratio = flat.ms / ipc.ms
            verdict = "PASS" if ratio >= GOAL else "below the goal"
            summary.append(
                f"{case.name}: IPC bucketed {ipc.ms:.3g} ms vs flat d2d copy {flat.ms:.3g} ms = "
                f"{ratio:.0%} of its bandwidth (goal >= {GOAL:.0%}: {verdict})"
            )
        else:
            summary.append(f"{case.name}: no ratio (flat or IPC row missing)")
            failed = True
        records.append({"case": case.name, "rows": [r.__dict__ for r in rows]})
        (out / "sync.json").write_text(json.dumps(records, indent=1, default=str))
        (out / "sync.md").write_text("\n".join(lines))
    try:
        summary.append(verified_sync(a.sets[0]))
    except Exception as err:
        summary.append(f"verified sync FAILED: {type(err).__name__}: {err}")
        failed = True
    text = "\n".join(lines + ["## summary", ""] + summary)
    (out / "sync.md").write_text(text + "\n")
    print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
