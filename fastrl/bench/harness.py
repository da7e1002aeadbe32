"""The one benchmark harness: what a case is, how a method is timed and how its memory is counted.

Method (STYLE.md / benchmarks/ANCHORS.md):
- time: the median of ``repeats`` device-timed forward+backward runs after ``warmup`` runs (CUDA events on
  a GPU, ``time.perf_counter`` on the CPU); gradients are reset to None outside the timed region.
- extra memory: the peak allocated during one forward+backward minus what was allocated just before it;
  the inputs are excluded, the gradients the run leaves behind are included. On a GPU this is
  ``torch.cuda.max_memory_allocated``; on the CPU, :func:`cpu_peak_bytes` replays the allocator's events.
- a peer that is not installed is a row "skipped: ..."; one that needs CUDA on a machine without it is
  "skipped: needs CUDA" (never the driver's raw error); one that raises is "fails: <reason>"; running out
  of memory is "OOM" (the cache is emptied and the run goes on).
- honesty checks: a row whose timed runs spread more than ``NOISY_SPREAD`` (max / min) is flagged; a case
  where any method (the baseline included) ran faster than its floor has its floor withheld, since the
  ceiling measured at the start of the run was then too low (a busy machine), not the method too fast.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

MiB = 2**20
NOISY_SPREAD = 2.0  # max / min of a row's timed runs above which the row is flagged as noisy
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)

Step = Callable[[], "torch.Tensor | None"]


class Skip(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a method's setup (or a suite) when it cannot run here: the row reads "skipped: <msg>"."""


@dataclasses.dataclass(kw_only=True)
class BenchContext:
    """What every suite needs to build its cases."""

    device: torch.device
    dtype: torch.dtype
    gpu_shapes: bool = False  # benchmarks/ANCHORS.md's shapes instead of the small CPU ones
    quick: bool = False  # tiny shapes (tests)
    repeats: int = 3
    warmup: int = 1
    compile: bool = False  # run the torch.compile methods
    # fastrl's impl: "auto" on GPUs; "torch" on the CPU, where Triton runs only under the (test) interpreter.
    fastrl_impl: str = "auto"
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class Method:
    """One way of computing a case. ``setup(inputs)`` imports/builds what it needs (raise :class:`Skip` or
    ImportError when unavailable) and returns ``step()``, which runs one forward+backward and returns the
    loss (or None)."""

    name: str
    setup: Callable[
        [dict[str, Any]], Step
    ]  # a step may carry ``step.prepare()``, run untimed before each run
    kind: str = "method"  # "method" | "peer" | "fastrl" | "baseline"
    note: str = ""


@dataclasses.dataclass(kw_only=True)
class Case:
    """One shape of one suite and the methods measured on it. ``make_inputs()`` builds fresh inputs once
    for the whole case; tensors in it that require grad get their ``.grad`` reset before every run."""

    suite: str
    name: str
    shape: dict[str, int]
    make_inputs: Callable[[], dict[str, Any]]
    methods: list[Method]
    floor_ms: float | None = None
    floor_note: str = ""
    grad_bytes: int | None = None
    measure_memory: bool = True
    reference: str | None = None  # the method whose loss the others' losses are compared with
    # What one timed run is, for the report's header of this case.
    timed: str = "one forward+backward; extra MiB: peak allocated during it minus allocated before"


@dataclasses.dataclass(kw_only=True)
class Row:
    suite: str
    case: str
    method: str
    kind: str
    status: str  # "ok" | "skipped: ..." | "fails: ..." | "OOM"
    ms: float | None = None
    ms_all: list[float] = dataclasses.field(default_factory=list)
    extra_mib: float | None = None
    loss: float | None = None
    loss_rel_diff: float | None = None
    x_floor: float | None = None
    x_baseline: float | None = None
    x_fastrl: float | None = None
    note: str = ""
    wall_s: float | None = None  # the whole measurement of this method: setup, warmup, memory, timing
    spread: float | None = None  # max / min of ms_all


# ---------------------------------------------------------------------------------------------------------
# device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------------
# memory


def cpu_peak_bytes(step: Step) -> tuple[int, Any]:
    """Peak of (bytes allocated - bytes freed) by the CPU allocator during ``step()``, and its output.

    Read from the profiler's allocation events, which see every allocation, also those made inside custom
    ops (a ``TorchDispatchMode`` sees only the outputs of the ops it intercepts, and would miss, e.g., the
    chunk buffers inside fastrl's registered ops). Storages that existed before are not counted; unlike
    on a GPU, freeing one of them during the step does not lower the total (the profiler does not know
    their size), which the benchmarks never do: gradients are reset before the step, inputs stay alive.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    cpu = torch.autograd.DeviceType.CPU
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda ev: ev[0]):
        live += nbytes
        peak = max(peak, live)
    return peak, out


def extra_memory_mib(step: Step, device: torch.device) -> tuple[float, Any]:
    """Peak bytes allocated during one ``step()`` minus those allocated before it, in MiB; and its output."""
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB, out
    peak, out = cpu_peak_bytes(step)
    return peak / MiB, out


# ---------------------------------------------------------------------------------------------------------
# timing


def time_step(step: Step, device: torch.device, *, repeats: int, before: Callable[[], None]) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``step()``, device-timed; ``before()`` runs untimed."""
    times = []
    for _ in range(repeats):
        before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def reset_grads(inputs: dict[str, Any]) -> None:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None


# What a GPU-only library (a Triton kernel, a CUDA extension) says when it meets a machine or a tensor
# without CUDA; the row then reads "skipped: needs CUDA".
_NO_CUDA_MESSAGES = (
    "0 active drivers",
    "found no nvidia driver",
    "torch not compiled with cuda",
    "cpu tensor?",
    "cuda driver",
    "no cuda gpus are available",
    "libcuda",
    "cuda is not available",
)


def needs_cuda_error(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(m in text for m in _NO_CUDA_MESSAGES)


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:200]


def run_method(case: Case, method: Method, inputs: dict[str, Any], ctx: BenchContext) -> Row:
    """Set up, warm up, measure memory once and time ``ctx.repeats`` runs; every failure becomes a row."""
    row = Row(suite=case.suite, case=case.name, method=method.name, kind=method.kind, status="ok")
    row.note = method.note
    device = ctx.device
    step: Step | None = None
    t0 = time.perf_counter()
    try:
        step = method.setup(inputs)
        prepare = getattr(step, "prepare", None)

        def before() -> None:
            reset_grads(inputs)
            if prepare is not None:
                prepare()

        for _ in range(ctx.warmup):
            before()
            step()
        before()
        out = None
        if case.measure_memory:
            row.extra_mib, out = extra_memory_mib(step, device)
        row.ms_all = time_step(step, device, repeats=ctx.repeats, before=before)
        row.ms = statistics.median(row.ms_all)
        if min(row.ms_all) > 0:
            row.spread = max(row.ms_all) / min(row.ms_all)
        measured = getattr(step, "report", None)  # a step measured in another process (grpo_step)
        if measured is not None:
            got = measured()
            row.extra_mib = got.get("extra_mib", row.extra_mib)
            extra_note = got.get("note", "")
            if extra_note and extra_note not in row.note:
                row.note = "; ".join(x for x in (row.note, extra_note) if x)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            row.loss = float(out.detach().float())
    except Skip as err:
        row.status = f"skipped: {err}"
    except ImportError as err:
        name = getattr(err, "name", None) or str(err)
        row.status = f"skipped: {name} not importable"
    except OOM_ERRORS:
        row.status = "OOM"
    except Exception as err:  # a peer's failure is a row, never a crash of the whole run
        if device.type != "cuda" and needs_cuda_error(err):
            row.status = "skipped: needs CUDA"
        else:
            row.status = f"fails: {describe_error(err)}"
    finally:
        step = None  # drop the closures (modules, compiled graphs, buffers) before emptying the cache
        reset_grads(inputs)
        if not row.status.startswith("skipped"):  # gc is slow on a busy CPU; a skip allocated nothing
            empty_cache(device)
    row.wall_s = time.perf_counter() - t0
    if row.status != "ok":
        row.ms = row.extra_mib = row.loss = None
        row.ms_all = []
    return row


def run_case(case: Case, ctx: BenchContext, *, progress: Callable[[str], None] | None = None) -> list[Row]:
    """All methods of ``case`` on one set of inputs, then the ratios to the floor, baseline and fastrl."""
    rows: list[Row] = []
    try:
        inputs = case.make_inputs()
    except OOM_ERRORS:
        inputs, status = None, "OOM"
    except Exception as err:
        inputs, status = None, f"fails: building inputs: {describe_error(err)}"
    for method in case.methods:
        if inputs is None:
            rows.append(
                Row(suite=case.suite, case=case.name, method=method.name, kind=method.kind, status=status)
            )
        else:
            rows.append(run_method(case, method, inputs, ctx))
        if progress is not None:
            progress(f"{case.suite}/{method.name}")
    inputs = None
    empty_cache(ctx.device)
    add_ratios(case, rows)
    return rows


def add_ratios(case: Case, rows: list[Row]) -> None:
    """x floor, x baseline, x fastrl and the loss difference to the reference, plus the honesty notes.

    No method can beat the floor (the matrix products or the memory traffic at the card's ceilings): when
    one does, the ceiling measured at the start of the run was too low, and ``x floor`` is withheld for the
    whole case (``case.floor_note`` says why) rather than printed below 1.
    """
    ok = [r for r in rows if r.status == "ok"]
    fastrl = next((r.ms for r in ok if r.kind == "fastrl"), None)
    baseline = next((r.ms for r in ok if r.kind == "baseline"), None)
    reference = next((r.loss for r in ok if r.method == case.reference), None)
    floor_ok = bool(case.floor_ms) and all(r.ms is None or r.ms >= case.floor_ms for r in ok)
    if case.floor_ms and not floor_ok:
        fastest = min((r for r in ok if r.ms is not None), key=lambda r: r.ms)
        case.floor_note += (
            f"; x floor withheld: {fastest.method} ran in {fastest.ms:.3g} ms, under the floor, so the "
            "ceilings it was taken at are too low for this machine (measured while it was busy?)"
        )
    for r in ok:
        if floor_ok:
            r.x_floor = r.ms / case.floor_ms
        if baseline:
            r.x_baseline = r.ms / baseline
        if fastrl:
            r.x_fastrl = r.ms / fastrl
        if reference is not None and r.loss is not None:
            r.loss_rel_diff = abs(r.loss - reference) / max(abs(reference), 1e-12)
        if r.spread is not None and r.spread > NOISY_SPREAD:
            noisy = f"noisy: timed runs spread {r.spread:.1f}x ({min(r.ms_all):.3g}-{max(r.ms_all):.3g} ms)"
            r.note = "; ".join(x for x in (r.note, noisy) if x)
