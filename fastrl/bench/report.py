"""Benchmark results as JSON (every number plus the environment), a markdown table and a PNG bar plot."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fastrl.bench.harness import NOISY_SPREAD, Case, MiB, Row, device_name

# Relative loss difference to the reference method above which a row gets a note: the methods round
# differently (bf16 logits or fp32 accumulation), so half-precision runs get a wider band.
LOSS_NOTE_THRESHOLD = {"float32": 1e-4, "float64": 1e-8}
LOSS_NOTE_THRESHOLD_HALF = 2e-2


def environment(device: torch.device) -> dict[str, Any]:
    from fastrl import __version__
    from fastrl.bench.peers import peer_versions

    env: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastrl": __version__,
        "git_commit": _git_commit(),
    }
    env.update(peer_versions())
    try:
        import fastrl.native as native

        env["fastrl_native_extension"] = bool(getattr(native, "HAS_NATIVE", False))
    except ImportError:
        env["fastrl_native_extension"] = None
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def case_record(case: Case | None, rows: list[Row], *, suite: str, name: str) -> dict[str, Any]:
    return {
        "suite": suite,
        "case": name,
        "shape": case.shape if case else {},
        "floor_ms": case.floor_ms if case else None,
        "floor_note": case.floor_note if case else "",
        "grad_mib": case.grad_bytes / MiB if case and case.grad_bytes else None,
        "timed": case.timed if case else "",
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, fmt)


CPU_NOTICE = (
    "**CPU run: a correctness run of the benchmark code, not a speed claim.** On the CPU fastrl runs its "
    "PyTorch path (its Triton kernels need a GPU), the peers built on Triton are skipped, and the "
    "baseline is the CPU BLAS; the times show that every method runs and computes the same loss, not how "
    "fast any of them is on a GPU (`fastrl bench --gpu`)."
)


def is_cpu_run(payload: dict[str, Any]) -> bool:
    return str(payload["environment"].get("device", "")).startswith("CPU")


def floor_withheld(rec: dict[str, Any]) -> bool:
    return "x floor withheld" in (rec.get("floor_note") or "")


def markdown(payload: dict[str, Any]) -> str:
    env, ceil = payload["environment"], payload["ceilings"]
    lines = [f"# fastrl bench: {env['device']}", ""]
    if is_cpu_run(payload):
        lines += [CPU_NOTICE, ""]
    lines += [
        f"torch {env['torch']}, triton {env.get('triton')}, dtype {payload['settings']['dtype']}, "
        f"{payload['settings']['repeats']} timed runs (median), {env['date_utc']} UTC.",
        f"Ceilings: {ceil['tflops']:.4g} TFLOP/s, {ceil['tbps']:.3g} TB/s ({ceil['source']}).",
        "Time: median of the device-timed runs of each case's step (each case says what one run is); "
        "extra MiB excludes the inputs and includes the gradients. A row whose runs spread more than "
        f"{NOISY_SPREAD:g}x is marked noisy.",
        "",
    ]
    withheld = [f"{r['suite']}: {r['case']}" for r in payload["cases"] if floor_withheld(r)]
    if withheld:
        lines += [
            f"**Ceilings too low**: in {len(withheld)} case(s) a method ran under its floor, so the ceilings "
            "above understate this machine (a ceiling measured at the start of the run while the machine "
            "was busy); x floor is withheld there: " + "; ".join(withheld) + ".",
            "",
        ]
        again = payload.get("ceilings_remeasured")
        if again:
            lines += [
                f"Ceilings measured again at the end: {again['tflops']:.4g} TFLOP/s, {again['tbps']:.3g} TB/s"
                ".",
                "",
            ]
    threshold = LOSS_NOTE_THRESHOLD.get(payload["settings"]["dtype"], LOSS_NOTE_THRESHOLD_HALF)
    for rec in payload["cases"]:
        lines.append(f"## {rec['suite']}: {rec['case']}")
        facts = []
        if rec["floor_ms"]:
            facts.append(f"floor {rec['floor_ms']:.3g} ms ({rec['floor_note']})")
        if rec["grad_mib"]:
            facts.append(f"gradients {rec['grad_mib']:,.1f} MiB")
        if rec.get("timed"):
            facts.append(f"one run: {rec['timed']}")
        if facts:
            lines += ["", "; ".join(facts) + "."]
        lines += [
            "",
            "| method | ms | extra MiB | x floor | x baseline | x fastrl | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rec["rows"]:
            note = r["note"]
            if r["loss_rel_diff"] is not None and r["loss_rel_diff"] > threshold:
                note = (
                    note + "; " if note else ""
                ) + f"loss differs from the reference by {r['loss_rel_diff']:.1e}"
            ms = _num(r["ms"], ".3g") if r["status"] == "ok" else r["status"].replace("|", "/")
            cells = [
                r["method"],
                ms,
                _num(r["extra_mib"], ",.1f"),
                _num(r["x_floor"], ".2f"),
                _num(r["x_baseline"], ".2f"),
                _num(r["x_fastrl"], ".2f"),
                note,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_COLORS = {"fastrl": "tab:green", "baseline": "tab:gray", "peer": "tab:orange"}


def _gap_label(status: str) -> str:
    """What stands in a skipped / failed / OOM row's place in the plot."""
    return status if len(status) <= 70 else status[:67] + "..."


def plot(path: Path, payload: dict[str, Any]) -> bool:
    """Horizontal bars of time and extra memory per case, one bar per method; a method that did not run
    (skipped, failed, OOM) keeps its place as a labelled gap. False (no file) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plot", file=sys.stderr)
        return False
    cases = [c for c in payload["cases"] if c["rows"]]
    if not cases:
        return False
    heights = [max(1.2, 0.35 * len(c["rows"]) + 0.8) for c in cases]
    fig, axes = plt.subplots(
        len(cases), 2, figsize=(13, sum(heights) + 0.6), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for (ax_t, ax_m), rec in zip(axes, cases):
        rows = rec["rows"]
        names = [r["method"] for r in rows]
        colors = [_COLORS.get(r["kind"], "tab:blue") for r in rows]
        ok = [r["status"] == "ok" for r in rows]
        times = [r["ms"] if good else 0.0 for r, good in zip(rows, ok)]
        ax_t.barh(names, times, color=colors)
        for i, (r, good) in enumerate(zip(rows, ok)):
            if not good:  # the gap, labelled with the reason
                color = "tab:red" if r["status"].startswith(("fails", "OOM")) else "dimgray"
                label = "  " + _gap_label(r["status"])
                ax_t.text(0, i, label, va="center", ha="left", fontsize=6.5, color=color)
        if rec["floor_ms"] and not floor_withheld(rec):
            ax_t.axvline(rec["floor_ms"], color="k", linestyle="--", linewidth=1, label="floor")
            ax_t.legend(loc="lower right", fontsize=7)
        ax_t.set_title(f"{rec['suite']}: {rec['case']} - ms", fontsize=9)
        ax_t.invert_yaxis()
        ax_t.tick_params(labelsize=7)
        ran = [r for r, good in zip(rows, ok) if good]
        if ran and all(r["extra_mib"] is None for r in ran):
            ax_m.axis("off")
            ax_m.text(0.5, 0.5, "memory measured in the worker (see the table)", ha="center", va="center",
                      fontsize=8)  # fmt: skip
            continue
        mem = [r["extra_mib"] if good and r["extra_mib"] is not None else 0.0 for r, good in zip(rows, ok)]
        ax_m.barh(names, mem, color=colors)
        if rec["grad_mib"]:
            ax_m.axvline(rec["grad_mib"], color="k", linestyle=":", linewidth=1, label="gradients")
            ax_m.legend(loc="lower right", fontsize=7)
        ax_m.set_title("extra MiB", fontsize=9)
        ax_m.invert_yaxis()
        ax_m.set_yticklabels([])
        ax_m.tick_params(labelsize=7)
    title = payload["environment"]["device"]
    if is_cpu_run(payload):
        title += " - CPU correctness run, not a speed claim"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
