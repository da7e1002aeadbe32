"""``fastrl bench`` / ``python -m fastrl.bench``: run suites, write results.json, results.md, results.png."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from fastrl.bench import report
from fastrl.bench.floors import ceilings, measure_ceilings
from fastrl.bench.harness import BenchContext, Row, Skip, describe_error, run_case
from fastrl.bench.registry import SUITES, suite_builder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SUITES = ("logprobs", "linear_logprobs", "grpo", "dpo", "native", "grpo_step")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrl bench",
        description="Benchmark fastrl's ops and losses against eager PyTorch, TRL-style code, torch.compile, "
        "Liger-Kernel and Cut Cross-Entropy (the peers that are installed), in one run.",
    )
    p.add_argument(
        "--suite", nargs="+", action="extend", choices=list(SUITES), help="suites to run (default: all)"
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="run on CUDA with benchmarks/ANCHORS.md's shapes (bf16, torch.compile on)",
    )
    p.add_argument("--out", default="bench_results", help="output folder for results.json/.md/.png")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method (default 10 on GPU, 3 on CPU)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="input dtype (default bf16 GPU, fp32 CPU)"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="run the torch.compile methods"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def context_from_args(args: argparse.Namespace) -> BenchContext:
    if args.gpu and not torch.cuda.is_available():
        raise ValueError("--gpu needs a CUDA device; none is visible")
    for name in ("repeats", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "repeats" else 0):
            raise ValueError(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {value}")
    gpu = args.gpu
    return BenchContext(
        device=torch.device("cuda") if gpu else torch.device("cpu"),
        dtype=DTYPES[args.dtype or ("bf16" if gpu else "fp32")],
        gpu_shapes=gpu and not args.quick,
        quick=args.quick,
        repeats=args.repeats if args.repeats is not None else (10 if gpu else 3),
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        compile=args.compile if args.compile is not None else gpu,
        fastrl_impl="auto" if gpu else "torch",
        seed=args.seed,
    )


def run(ctx: BenchContext, suites: list[str], *, progress: bool = True, on_update=None) -> dict:
    """Build every suite's cases, run them, return the JSON payload; ``on_update(payload)`` is called
    after each case with the results so far (a run cut short still leaves them on disk)."""
    torch.manual_seed(ctx.seed)
    ceil = ceilings(ctx.device, ctx.dtype)
    settings = {k: str(v) for k, v in dataclasses.asdict(ctx).items()}
    settings["dtype"] = str(ctx.dtype).removeprefix("torch.")
    records: list[dict] = []
    payload = {
        "environment": report.environment(ctx.device),
        "settings": settings,
        "ceilings": dataclasses.asdict(ceil),
        "cases": records,
    }
    planned: list[tuple[str, object]] = []  # (suite, list of cases | failure row)
    for name in suites:
        try:
            planned.append((name, suite_builder(name)(ctx, ceil)))
        except Skip as err:
            planned.append((name, _suite_row(name, f"skipped: {err}")))
        except Exception as err:  # a suite whose module is missing or broken is a row too
            planned.append((name, _suite_row(name, f"fails: {describe_error(err)}")))
    total = sum(len(c.methods) for _, cases in planned if isinstance(cases, list) for c in cases)
    bar = _progress(total, enabled=progress)
    for name, cases in planned:
        if isinstance(cases, Row):
            records.append(report.case_record(None, [cases], suite=name, name="-"))
            continue
        for case in cases:
            rows = run_case(case, ctx, progress=bar)
            records.append(report.case_record(case, rows, suite=case.suite, name=case.name))
            if on_update is not None:
                on_update(payload)
    if hasattr(bar, "close"):
        bar.close()
    if ceil.source.startswith("measured") and any(report.floor_withheld(r) for r in records):
        # A method beat a floor: the start-of-run ceilings were low. Measure again for the reader (the
        # withheld floors stay withheld: one more sample on a busy machine proves nothing either way).
        payload["ceilings_remeasured"] = dataclasses.asdict(measure_ceilings(ctx.device, ctx.dtype))
    return payload


def _suite_row(name: str, status: str) -> Row:
    return Row(suite=name, case="-", method="(suite)", kind="suite", status=status)


def _progress(total: int, *, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(
        total=total, desc="bench", unit="method", file=sys.stderr, disable=not enabled, dynamic_ncols=True
    )

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    step.close = bar.close  # type: ignore[attr-defined]
    return step


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        ctx = context_from_args(args)
    except ValueError as err:
        print(f"fastrl bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. --out names an existing file: a message, not a traceback
        print(f"fastrl bench: --out {args.out!r} cannot be a results folder: {err}", file=sys.stderr)
        return 2

    def write(payload: dict) -> str:
        report.write_json(out / "results.json", payload)
        table = report.markdown(payload)
        (out / "results.md").write_text(table + "\n", encoding="utf-8")
        return table

    suites = list(dict.fromkeys(args.suite or DEFAULT_SUITES))
    payload = run(ctx, suites, progress=not args.no_progress, on_update=write)
    table = write(payload)
    written = ["results.json", "results.md"]
    if not args.no_plot and report.plot(out / "results.png", payload):
        written.append("results.png")
    print(table)
    print(f"[bench] wrote {', '.join(str(out / w) for w in written)}")
    return 0
