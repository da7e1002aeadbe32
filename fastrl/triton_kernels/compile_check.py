"""Compile every Triton kernel of fastrl for a GPU, on a machine without one, and report its resources.

    python -m fastrl.triton_kernels.compile_check --arch 90 --arch 80 [--quick]

Why: the CPU test suite runs the kernels under the Triton interpreter, which accepts programs the GPU
compiler rejects (and never allocates a register). This check runs the launchers of
``fastrl/triton_kernels`` down their compiled path, as on a GPU, with a stand-in Triton driver whose target
is ``GPUTarget("cuda", arch, 32)``: every ``kernel[grid](...)`` launch is compiled (Triton front end, LLVM,
ptxas from the Triton wheel) instead of run. The launchers pick their own block sizes and warps from the
shapes they are given, exactly as on a GPU; the check only chooses the inputs:

- shapes from tiny test sizes to model vocabularies; each distinct launch configuration the launcher's
  config function returns over that grid is compiled once (``_fixed_config`` for the row kernels, the
  ``FASTRL_AUTOTUNE=1`` candidates too in the full sweep);
- every value of every flag the launcher takes (``LAUNCHER_FLAGS`` names them; a launcher parameter the
  check does not know fails the check, so a new flag cannot go unchecked), every GRPO policy of
  ``fastrl.triton_kernels.grpo.POLICY_IDS``, every input dtype the ops hand the kernels.

Per specialisation it prints registers, spill stores/loads (bytes, from ``ptxas -v``) and the shared memory
Triton allocates; any compile error fails the run (exit code 1). ``--quick``, what the test suite runs,
compiles one shape per kernel with all flags off and all on (the fused kernels: all on, bf16 and fp32);
``scripts/compile_check.sh`` runs the full sweep with the Triton the GPU machines have and the newest.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

# Launcher parameters the check varies, per launcher: everything else must be a tensor argument or one of
# ``_FIXED`` (values that do not change the compiled program). Keep in step with the launchers' signatures.
LAUNCHER_FLAGS = {
    "logprobs_forward": {"with_entropy"},
    "logprobs_backward": {"grad_logp_N", "grad_entropy_N"},
    "fused_forward": {"bias_V", "with_entropy"},
    "fused_backward": {"bias_V", "dentropy_N", "grad_hidden", "grad_weight", "grad_bias"},
    "grpo_loss_fwd_bwd": {
        "policy", "delta", "beta", "kl_bias_correction", "ref_BT", "w_BT", "seq_log_ratio_B", "phi_BT",
        "entropy_BT", "entropy_grad_BT", "compute_grad",
    },
}
_FIXED = {"inv_temp", "ignore_index", "interpret", "eps_low", "eps_high", "tau_pos", "tau_neg", "seq_chain_B"}


class CompileCheckError(RuntimeError):
    """The check itself cannot run (wrong mode, a launcher it does not know how to drive)."""


@dataclass
class Spec:
    """One compiled specialisation (or its failure)."""

    kernel: str
    case: str
    constexprs: dict
    num_warps: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


@dataclass
class Report:
    arch: int
    triton_version: str
    specs: list[Spec] = field(default_factory=list)

    @property
    def failures(self) -> list[Spec]:
        return [s for s in self.specs if s.error is not None]


# ---------------------------------------------------------------------------------------------------------
# Stand-in driver and compile-instead-of-launch
# ---------------------------------------------------------------------------------------------------------


class _StandInDriver:
    """The parts of a Triton driver that compiling needs: a target, a device and a stream id. Anything that
    would touch a GPU (loading a binary, launching) is never reached because ``run`` stops at compile."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        # The device id keys each JITFunction's cache of compiled kernels (and of the target it compiles
        # for): one id per arch, so a second arch in the same process compiles afresh.
        self.device = arch

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        # The autotuner "times" each candidate: with launches replaced by compiles, calling it once compiles
        # that candidate, and every candidate looks equally fast.
        def bench(fn, quantiles=None, **_):
            fn()
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench

    def map_python_to_cpp_type(self, ty):
        raise CompileCheckError("the compile check never builds a launcher")


_RESOURCES = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class _Recorder:
    def __init__(self, report: Report):
        self.report = report
        self.case = ""
        self.seen: set[int] = set()


@contextlib.contextmanager
def _compile_only(arch: int, report: Report) -> Iterator[_Recorder]:
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:
        raise CompileCheckError("unset TRITON_INTERPRET: the check compiles, it does not interpret")
    recorder = _Recorder(report)
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        bound = dict(zip(names, args)) | kwargs
        constexprs = {p.name: bound.get(p.name) for p in self.params if p.is_constexpr}
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in bound.values() if torch.is_tensor(v)})
        spec = Spec(self.fn.__name__, recorder.case, {"dtypes": ",".join(dtypes), **constexprs})
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - every compile error is reported, then the case stops
            spec.error = f"{type(e).__name__}: {e}"
            report.specs.append(spec)
            raise _CaseError from e
        if id(kernel) in recorder.seen:  # the JIT's cache: a specialisation already compiled
            return kernel
        recorder.seen.add(id(kernel))
        spec.seconds = time.perf_counter() - start
        spec.num_warps = kernel.metadata.num_warps
        spec.shared = kernel.metadata.shared
        text = log.getvalue()
        if m := _RESOURCES.search(text):
            spec.regs = int(m.group(1))
        if m := _SPILLS.search(text):
            spec.spill_stores, spec.spill_loads = int(m.group(1)), int(m.group(2))
        report.specs.append(spec)
        return kernel

    # The private slot, not ``driver.active``: reading that on a machine without a GPU raises.
    old_driver = driver._active
    old_log = triton.knobs.nvidia.dump_ptxas_log
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fastrl-compile-check-") as cache:
        # A fresh cache: every specialisation goes through the compiler (and ptxas prints its resources).
        os.environ["TRITON_CACHE_DIR"] = cache
        driver.set_active(_StandInDriver(arch))
        triton.knobs.nvidia.dump_ptxas_log = True
        JITFunction.run = run
        try:
            yield recorder
        finally:
            JITFunction.run = original_run
            triton.knobs.nvidia.dump_ptxas_log = old_log
            driver._active = old_driver
            if old_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache


class _CaseError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# Cases: the launchers' inputs
# ---------------------------------------------------------------------------------------------------------

# (N, V) from test sizes to model vocabularies; each distinct configuration the launcher derives is compiled.
_ROW_SHAPES = [(n, v) for n in (1, 4096) for v in (100, 1000, 32000, 151936)]
_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # ops refuse fp64 for impl='triton'
_GRPO_DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # logp: fp32 from the ops, user tensors too
_GRPO_T = (7, 4096)  # smallest and largest BLOCK_T

Case = tuple[str, Callable[[], object]]


def _check_signature(fn: Callable) -> None:
    known = LAUNCHER_FLAGS[fn.__name__] | _FIXED
    params = inspect.signature(fn).parameters.values()
    unknown = [
        p.name
        for p in params
        if p.name not in known and (p.kind is p.KEYWORD_ONLY or p.default is not inspect.Parameter.empty)
    ]
    if unknown:
        raise CompileCheckError(
            f"{fn.__module__}.{fn.__name__} takes {unknown}, which the compile check does not vary: add them "
            "to LAUNCHER_FLAGS (and the case builder) in fastrl/triton_kernels/compile_check.py"
        )


def _flags(n: int) -> Iterator[tuple[bool, ...]]:
    return itertools.product((False, True), repeat=n)


def _row_shapes(quick: bool) -> list[tuple[int, int]]:
    from fastrl.triton_kernels import logprobs as k

    if quick:
        return [(1, 151936)]
    configs: dict[tuple, tuple[int, int]] = {}
    for n, v in sorted(_ROW_SHAPES, key=lambda s: s[0] * s[1]):  # the smallest shape of each config
        configs.setdefault(tuple(sorted(k._fixed_config(n, v, False).items())), (n, v))
    return sorted(configs.values(), key=lambda s: s[1])  # the model-vocabulary configuration last


def _logprobs_cases(quick: bool) -> Iterator[Case]:
    from fastrl.triton_kernels import logprobs as k

    _check_signature(k.logprobs_forward)
    _check_signature(k.logprobs_backward)
    shapes = _row_shapes(quick)
    # Every dtype at the model-vocabulary configuration (the largest V); the smaller configurations, which
    # only test-sized vocabularies reach, at the two dtypes the GPU tests use.
    combos = [(s, dt) for s in shapes for dt in _ROW_DTYPES if s == shapes[-1] or dt in _ROW_DTYPES[:2]]
    if quick:
        combos = [(shapes[-1], torch.bfloat16)]
    for (n, v), dtype in combos:
        x = torch.zeros(1, n, v, dtype=dtype)
        y = torch.zeros(n, dtype=torch.int64)
        acc = torch.zeros(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        common = dict(inv_temp=1.0, ignore_index=-100, interpret=False)
        for (ent,) in _flags(1):
            launch = partial(k.logprobs_forward, x, y, with_entropy=ent, **common)
            yield f"logprobs_forward N={n} V={v} entropy={ent}", launch
        for g_logp, g_ent in _flags(2):
            grads = (acc if g_logp else None, acc if g_ent else None)
            launch = partial(k.logprobs_backward, x, x, y, acc, acc, *grads, **common)
            yield f"logprobs_backward N={n} V={v} grad_logp={g_logp} grad_entropy={g_ent}", launch
    if not quick:  # FASTRL_AUTOTUNE=1: the candidates the autotuner would time, at a model vocabulary
        for kind in ("fwd", "bwd"):
            yield f"logprobs autotune candidates ({kind})", lambda kind=kind: _autotune_candidates(k, kind)


def _autotune_candidates(k, kind: str) -> None:
    n, v = 64, 151936
    x = torch.zeros(1, n, v, dtype=torch.bfloat16)
    y = torch.zeros(n, dtype=torch.int64)
    acc = torch.zeros(n)
    k._autotuned.cache_clear()  # a fresh autotuner, which times (here: compiles) every candidate
    old = os.environ.get("FASTRL_AUTOTUNE")
    os.environ["FASTRL_AUTOTUNE"] = "1"
    try:
        if kind == "fwd":
            k.logprobs_forward(x, y, inv_temp=1.0, ignore_index=-100, with_entropy=True, interpret=False)
        else:
            k.logprobs_backward(x, x, y, acc, acc, acc, acc, inv_temp=1.0, ignore_index=-100, interpret=False)
    finally:
        if old is None:
            os.environ.pop("FASTRL_AUTOTUNE")
        else:
            os.environ["FASTRL_AUTOTUNE"] = old


def _linear_cases(quick: bool) -> Iterator[Case]:
    from fastrl.triton_kernels import linear_logprobs as k

    _check_signature(k.fused_forward)
    _check_signature(k.fused_backward)
    n, h, v = 64, 256, 1000  # H a multiple of 16 as in every model; the blocks depend on the dtype alone
    dtypes = (torch.bfloat16, torch.float32) if quick else _LINEAR_DTYPES
    for dtype in dtypes:
        # Every flag combination at bf16 (the GPU dtype) and fp32; fp16 shares bf16's blocks: ends only.
        ends_only = quick or dtype == torch.float16
        hid, w = torch.zeros(n, h, dtype=dtype), torch.zeros(v, h, dtype=dtype)
        b, y = torch.zeros(v, dtype=dtype), torch.zeros(n, dtype=torch.int64)
        lse, acc = torch.zeros(2, n), torch.zeros(n)
        common = dict(inv_temp=1.0, ignore_index=-100, interpret=False)
        for bias, ent in _flags(2):
            if ends_only and bias != ent or quick and not bias:  # quick: all on only
                continue
            launch = partial(k.fused_forward, hid, w, b if bias else None, y, with_entropy=ent, **common)
            yield f"fused_forward bias={bias} entropy={ent}", launch
        for bias, ent, gh, gw, gb in _flags(5):
            if not (gh or gw or gb) or (gb and not bias):  # no launch / a bias gradient without a bias
                continue
            all_on, w_alone = bias == ent == gh == gw == gb, gw and not (bias or ent or gh or gb)
            if ends_only and not (all_on or w_alone) or quick and not all_on:
                continue  # ends: all on, and the weight gradient alone (the kernel that spills at fp32)
            launch = partial(
                k.fused_backward, hid, w, b if bias else None, y, lse, acc, acc, acc if ent else None,
                grad_hidden=gh, grad_weight=gw, grad_bias=gb, **common,
            )  # fmt: skip
            yield f"fused_backward bias={bias} entropy={ent} grad_h={gh} grad_w={gw} grad_b={gb}", launch


def _grpo_cases(quick: bool) -> Iterator[Case]:
    from fastrl.triton_kernels import grpo as k

    _check_signature(k.grpo_loss_fwd_bwd)
    b = 2
    # Every flag combination at fp32 (what the ops pass) and the largest BLOCK_T; the other dtypes and the
    # smallest BLOCK_T with all flags off and all on (they change the loads and the tile, not the branches).
    combos = [(dt, t) for dt in _GRPO_DTYPES for t in _GRPO_T]
    if quick:
        combos = [(torch.float32, 4096)]
    for dtype, t in combos:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        logp = torch.zeros(b, t, dtype=dtype)
        mask = torch.ones(b, t, dtype=torch.bool)
        row = torch.ones(b, dtype=acc)
        adv = torch.zeros(b, 1, dtype=dtype).expand(b, t)  # the ops pass [B] advantages as a stride-0 view
        every = dtype == torch.float32 and t == max(_GRPO_T) and not quick
        # Every combination of the five branch flags (KL bias correction and the entropy bonus off); those
        # two, which add independent branches, alone and together with the five all off and all on.
        # Elsewhere: everything off, everything on.
        if every:
            combos5 = [(f, (False, False)) for f in _flags(5)]
            combos5 += [((on,) * 5, extra) for on in (False, True) for extra in _flags(2) if any(extra)]
        else:
            combos5 = [((False,) * 5, (False, False)), ((True,) * 5, (True, True))]
        for policy, ((delta, kl, w, seq, grad), (kbc, ent)) in itertools.product(k.POLICY_IDS, combos5):
            launch = partial(
                k.grpo_loss_fwd_bwd, logp, logp, adv, mask, row, policy=policy, eps_low=0.2, eps_high=0.28,
                delta=2.0 if delta else None, beta=0.04 if kl or kbc else 0.0, tau_pos=1.0, tau_neg=1.05,
                kl_bias_correction=kbc, ref_BT=logp if kl or kbc else None, w_BT=adv if w else None,
                seq_log_ratio_B=row if seq else None, seq_chain_B=row if seq else None,
                phi_BT=adv if policy == "vespo" else None, entropy_BT=logp if ent else None,
                entropy_grad_BT=logp if ent else None, compute_grad=grad, interpret=False,
            )  # fmt: skip
            yield (
                f"grpo {str(dtype)[6:]} T={t} policy={policy} delta={delta} kl={kl} kl_bc={kbc} w={w} "
                f"seq={seq} ent={ent} grad={grad}"
            ), launch


CASE_BUILDERS = (_logprobs_cases, _linear_cases, _grpo_cases)


# ---------------------------------------------------------------------------------------------------------
# Running and printing
# ---------------------------------------------------------------------------------------------------------


def _cases(quick: bool) -> list[Case]:
    return [case for builder in CASE_BUILDERS for case in builder(quick)]


def _run_cases(recorder: _Recorder, cases: list[Case], indices) -> None:
    for i in indices:
        recorder.case, launch = cases[i]
        try:
            launch()
        except _CaseError:
            continue


# A pool worker keeps one compile-only session for its life; each task is one case, by index.
_WORKER: dict = {}


def _worker_init(arch: int, quick: bool) -> None:
    import triton

    report = Report(arch=arch, triton_version=triton.__version__)
    session = _compile_only(arch, report)
    _WORKER.update(report=report, recorder=session.__enter__(), session=session, cases=_cases(quick))


def _worker_case(i: int) -> list[Spec]:
    report = _WORKER["report"]
    start = len(report.specs)
    _run_cases(_WORKER["recorder"], _WORKER["cases"], [i])
    return report.specs[start:]


def run_check(arch: int, *, quick: bool = False, jobs: int = 1) -> Report:
    """Compile every case for ``GPUTarget("cuda", arch, 32)``, in ``jobs`` processes; failures are recorded,
    not raised. Specialisations come out in case order."""
    import triton

    report = Report(arch=arch, triton_version=triton.__version__)
    if jobs <= 1:
        with _compile_only(arch, report) as recorder:
            cases = _cases(quick)
            _run_cases(recorder, cases, range(len(cases)))
        return report
    import multiprocessing

    n = len(_cases(quick))
    pool_ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no CUDA or Triton state to fork
    with pool_ctx.Pool(jobs, initializer=_worker_init, initargs=(arch, quick)) as pool:
        seen = set()
        for specs in pool.imap(_worker_case, range(n)):
            for spec in specs:  # two workers may compile one specialisation: keep the first
                key = (spec.kernel, tuple(spec.constexprs.items()))
                if key not in seen or spec.error is not None:
                    seen.add(key)
                    report.specs.append(spec)
    return report


def format_report(report: Report) -> str:
    arch = f"sm_{report.arch}{'a' if report.arch >= 90 else ''}"
    lines = [f"Triton {report.triton_version}, target {arch}: {len(report.specs)} specialisations"]
    head = f"{'kernel':<24} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'smem':>7} {'s':>5}"
    lines.append(head + "  specialisation")
    for s in report.specs:
        if s.error is not None:
            lines.append(f"{s.kernel:<24} FAILED ({s.case}): {s.error.splitlines()[0][:300]}")
            continue
        spill = f"{s.spill_stores}/{s.spill_loads}" if s.spill_stores is not None else "?"
        flag = "  SPILLS" if s.spills else ""
        const = " ".join(f"{k}={v}" for k, v in s.constexprs.items())
        row = f"{s.kernel:<24} {s.num_warps:>5} {s.regs!s:>5} {spill:>12} {s.shared:>7} {s.seconds:>5.1f}"
        lines.append(f"{row}  {const}{flag}")
    spilling = [s for s in report.specs if s.spills]
    lines.append(
        f"{arch}: {len(report.specs) - len(report.failures)} compiled, {len(report.failures)} failed, "
        f"{len(spilling)} spill registers"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastrl.triton_kernels.compile_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (90, 80); repeat")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel (the test suite's subset)")
    parser.add_argument(
        "--jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: cores, max 8)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    failed = 0
    for arch in args.arch or [90]:
        start = time.perf_counter()
        report = run_check(arch, quick=args.quick, jobs=args.jobs)
        print(format_report(report))
        print(f"({time.perf_counter() - start:.1f} s)\n", flush=True)
        failed += len(report.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
