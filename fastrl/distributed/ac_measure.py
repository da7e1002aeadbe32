"""What each activation-checkpointing mode saves and costs, measured on the CPU:
``python -m fastrl.distributed.ac_measure [--hidden 256 --layers 4 --batch 8 --seq 256]``.

Each mode runs in a fresh process (same seed, same random-init Qwen2-architecture model and batch) with
glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own mapping and
the resident set size follows the live tensors. Per mode: ``act`` = resident memory after the forward
minus before it (what the forward keeps for the backward), ``peak`` = the highest resident memory
sampled every millisecond during forward + backward, minus before the forward, the step time (median of
3 forward + backward passes after a warm-up) and, with offloading, the bytes the hooks moved. On the CPU
offloading moves activations to other CPU memory, so it saves nothing there: its row shows the traffic
a GPU run would move over PCIe. Timings on a shared machine are noisy; compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

MODES = ("none", "full", "selective:2", "op", "none+offload")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _one(mode: str, hidden: int, layers: int, batch: int, seq: int) -> dict:
    import torch

    from fastrl.distributed.activation_checkpoint import apply_ac
    from fastrl.distributed.offload import apply_activation_offloading
    from fastrl.models.tiny import build_char_tokenizer, build_tiny_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = build_char_tokenizer("0123456789+=abcdefghijklmnopqrstuvwxyz ")
    model = build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64))
    model.config._attn_implementation = "sdpa"
    ac_mode, offload = mode.split("+")[0], mode.endswith("+offload")
    apply_ac(model, ac_mode)
    contexts = apply_activation_offloading(model, devices=("cpu",)) if offload else []
    ids = torch.randint(0, len(tok), (batch, seq))

    def step(sample: bool = False):
        peak = [0]
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        before = _rss()
        thread = threading.Thread(target=sampler) if sample else None
        if thread:
            thread.start()
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        after_fwd = _rss()
        loss.backward()
        elapsed = time.perf_counter() - t0
        if thread:
            stop.set()
            thread.join()
        model.zero_grad(set_to_none=True)
        return elapsed, after_fwd - before, max(peak[0], after_fwd) - before

    step()  # warm-up: allocator, lazy inits, gradients' first allocation
    model.zero_grad(set_to_none=True)
    times, acts, peaks = [], [], []
    for _ in range(3):
        t, a, p = step(sample=True)
        times.append(t)
        acts.append(a)
        peaks.append(p)
    moved = sum(c.offloaded_bytes for c in contexts) / 4  # 4 passes
    return {"mode": mode, "act": statistics.median(acts), "peak": statistics.median(peaks),
            "time": statistics.median(times), "offloaded": moved}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_one(a.one, a.hidden, a.layers, a.batch, a.seq)))
        return []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "fastrl.distributed.ac_measure", "--one", mode,
               "--hidden", str(a.hidden), "--layers", str(a.layers), "--batch", str(a.batch),
               "--seq", str(a.seq)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    mib = 2**20
    print(f"hidden {a.hidden}, {a.layers} layers, batch {a.batch} x {a.seq} tokens, fp32, CPU, 1 thread")
    print("| mode | activations kept (MiB) | vs none | peak fwd+bwd (MiB) | step (s) | vs none "
          "| offloaded (MiB) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        act, peak, t, moved = r["act"] / mib, r["peak"] / mib, r["time"], r["offloaded"] / mib
        print(f"| {r['mode']} | {act:.1f} | {r['act'] / base['act']:.2f} | {peak:.1f} | {t:.3f} | "
              f"{t / base['time']:.2f} | {moved:.1f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
