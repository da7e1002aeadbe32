"""fastrl.bench: the harness (timing, memory, failure rows, ratios), the peer guards, the bench's own
reference math, and a quick end-to-end run writing JSON, markdown and PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from fastrl.bench import harness, peers, registry
from fastrl.bench.harness import BenchContext, Case, Method, Row, Skip
from tests.helpers import assert_close_to_truth

CPU = torch.device("cpu")


def _ctx(**kw) -> BenchContext:
    kw = {"device": CPU, "dtype": torch.float32, "quick": True, "repeats": 2, "warmup": 1} | kw
    return BenchContext(**kw)


def _method(name, fn, kind="method"):
    return Method(name=name, setup=lambda inputs: fn, kind=kind)


def _case(methods, **kw):
    return Case(suite="t", name="c", shape={}, make_inputs=lambda: {}, methods=methods, **kw)


# ---------------------------------------------------------------------------------------------------------
# memory


@torch.library.custom_op("fastrl_test_bench::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    scratch = torch.ones(2**20)  # 4 MiB used and freed inside the op: invisible to a dispatch mode
    return x * scratch.sum()


def test_cpu_memory_is_the_peak_of_new_allocations_including_inside_ops():
    held = torch.ones(2**18)  # 1 MiB allocated before: an input, never counted

    def step():
        kept = torch.ones(2**18)  # 1 MiB, alive at the end
        tmp = torch.ones(2**19)  # 2 MiB, freed inside the step
        view = tmp[:10]  # a view allocates nothing
        del tmp, view
        out = _scaled(held)  # 1 MiB output; 4 MiB scratch inside the op
        return kept, out

    mib, (kept, out) = harness.extra_memory_mib(step, CPU)
    # peak while the op runs: kept (1) + scratch (4) + its output (1); tmp (2) was freed before
    assert mib == pytest.approx(1 + 4 + 1, abs=1e-3)
    assert kept.numel() == out.numel() == 2**18


def test_extra_memory_includes_the_gradients(seed):
    x = torch.randn(512, 256, requires_grad=True)  # 0.5 MiB input
    mib, _ = harness.extra_memory_mib(lambda: (x.exp() * 2).sum().backward(), CPU)
    grad_mib = x.numel() * 4 / 2**20
    assert x.grad is not None
    assert grad_mib <= mib <= 4 * grad_mib  # grad + exp output + product, nothing of the input


# ---------------------------------------------------------------------------------------------------------
# rows: failures never crash the run


def test_failures_become_rows_and_ok_rows_get_times():
    oom = harness.OOM_ERRORS[0]

    def raises(exc):
        def step():
            raise exc

        return step

    def bad_setup(inputs):
        raise ImportError("no module", name="some_peer")

    def skip_setup(inputs):
        raise Skip("needs a GPU")

    case = _case(
        [
            _method("ok", lambda: torch.ones(3).sum(), kind="fastrl"),
            _method("boom", raises(RuntimeError("kernel exploded\nsecond line"))),
            _method("oom", raises(oom("CUDA out of memory"))),
            Method(name="missing", setup=bad_setup),
            Method(name="skip", setup=skip_setup),
        ]
    )
    rows = {r.method: r for r in harness.run_case(case, _ctx())}
    assert rows["ok"].status == "ok" and rows["ok"].ms > 0 and len(rows["ok"].ms_all) == 2
    assert rows["ok"].loss == 3.0 and rows["ok"].extra_mib is not None
    assert rows["boom"].status == "fails: RuntimeError: kernel exploded" and rows["boom"].ms is None
    assert rows["oom"].status == "OOM"
    assert rows["missing"].status == "skipped: some_peer not importable"
    assert rows["skip"].status == "skipped: needs a GPU"


def test_inputs_failure_marks_every_method():
    def make():
        raise RuntimeError("no inputs")

    case = Case(suite="t", name="c", shape={}, make_inputs=make, methods=[_method("a", lambda: None)])
    (row,) = harness.run_case(case, _ctx())
    assert row.status.startswith("fails: building inputs: RuntimeError: no inputs")


def test_grads_are_reset_and_prepare_runs_before_every_run():
    x = torch.ones(4, requires_grad=True)
    counts = {"prepare": 0, "step": 0}

    def setup(inputs):
        def step():
            assert x.grad is None  # reset before each run, untimed
            counts["step"] += 1
            (x * 2).sum().backward()

        def prepare():
            counts["prepare"] += 1

        step.prepare = prepare
        return step

    case = Case(
        suite="t", name="c", shape={}, make_inputs=lambda: {"x": x}, methods=[Method(name="m", setup=setup)]
    )
    (row,) = harness.run_case(case, _ctx(warmup=2, repeats=3))
    assert row.status == "ok"
    assert counts["step"] == counts["prepare"] == 2 + 1 + 3  # warmup, memory run, timed runs
    assert x.grad is None


def test_ratios_to_floor_baseline_fastrl_and_reference_loss():
    case = _case([], floor_ms=2.0, reference="eager")
    rows = [
        Row(suite="t", case="c", method="base", kind="baseline", status="ok", ms=4.0),
        Row(suite="t", case="c", method="eager", kind="method", status="ok", ms=8.0, loss=2.0),
        Row(suite="t", case="c", method="fast", kind="fastrl", status="ok", ms=5.0, loss=2.2),
        Row(suite="t", case="c", method="gone", kind="peer", status="skipped: x"),
    ]
    harness.add_ratios(case, rows)
    eager, fast, gone = rows[1], rows[2], rows[3]
    assert (eager.x_floor, eager.x_baseline, eager.x_fastrl) == (4.0, 2.0, 1.6)
    assert fast.x_fastrl == 1.0 and fast.loss_rel_diff == pytest.approx(0.1)
    assert gone.x_floor is None and gone.x_fastrl is None


# ---------------------------------------------------------------------------------------------------------
# the bench's own reference math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowloop_logp_matches_float64_truth(seed, dtype):
    logits = (torch.randn(3, 17, 301) * 3).to(dtype)
    labels = torch.randint(0, 301, (3, 17))
    truth = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    eager = peers.eager_fp32_logp(logits, labels)
    assert_close_to_truth("eager fp32", eager, truth, truth, dtype=dtype, factor=1.0)
    # The row loop works in the input dtype, as TRL's does: torch's log-sum-exp at that dtype (its own
    # error), then the difference rounded again. Its bound is that computation done batched in torch.
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(-1, labels[..., None]).squeeze(-1)
    two_roundings = (picked.double() - lse.double()).to(dtype)
    rowloop = peers.rowloop_logp(logits, labels)
    assert_close_to_truth("row loop", rowloop, two_roundings, truth, dtype=dtype)


def test_grpo_and_dpo_losses_match_their_formulas(seed):
    B, T = 3, 7
    logp, old, ref = (torch.randn(B, T, dtype=torch.float64) * 0.3 - 1 for _ in range(3))
    adv = torch.randn(B, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).double()
    loss = peers.grpo_loss(logp, old, ref, adv, mask, beta=0.1, eps=0.2)
    total = 0.0
    for b in range(B):
        for t in range(T):
            r = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b])
            clipped = min(max(r, 0.8), 1.2)
            d = float(ref[b, t] - logp[b, t])
            term = -min(r * a, clipped * a) + 0.1 * (math.exp(d) - d - 1)
            total += term * float(mask[b, t])
    assert float(loss) == pytest.approx(total / max(float(mask.sum()), 1.0), rel=1e-12)

    c, r, rc, rr = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    expected = -torch.nn.functional.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()
    assert float(peers.dpo_loss(c, r, rc, rr, beta=0.1)) == pytest.approx(float(expected), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# peers: guarded imports, failures as rows, call shapes


def _run_suite(name, **ctx_kw):
    from fastrl.bench.floors import Ceilings

    ceil = Ceilings(tflops=1.0, tbps=1.0, source="test")
    rows = []
    for case in registry.suite_builder(name)(_ctx(**ctx_kw), ceil):
        rows += harness.run_case(case, _ctx(**ctx_kw))
    return {r.method: r for r in rows}


def test_missing_peers_are_skipped(monkeypatch):
    for mod in (
        "liger_kernel",
        "liger_kernel.transformers",
        "liger_kernel.chunked_loss",
        "cut_cross_entropy",
    ):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    rows = _run_suite("linear_logprobs")
    assert rows["Cut Cross-Entropy, exact"].status.startswith("skipped: cut_cross_entropy not installed")
    assert rows["eager fp32"].status == "ok"
    rows = _run_suite("grpo")
    assert rows["Liger LigerFusedLinearGRPOLoss"].status.startswith("skipped:")
    assert rows["torch.compile of the eager path"].status.startswith("skipped: torch.compile off")


def test_a_broken_peer_is_a_fails_row_and_a_working_one_is_measured(monkeypatch):
    """Fake Liger (raises) and Cut Cross-Entropy (exact, in torch) modules stand in for the real ones."""

    class BrokenCE:
        def __init__(self, reduction):
            assert reduction == "none"

        def __call__(self, logits, labels):
            raise RuntimeError("peer broke")

    calls = []

    def linear_cross_entropy(e, c, targets, reduction="mean", filter_eps="auto"):
        calls.append(filter_eps)
        assert reduction == "none" and e.dim() == 2 and targets.dim() == 1
        return torch.nn.functional.cross_entropy((e @ c.t()).float(), targets, reduction="none")

    liger = types.ModuleType("liger_kernel")
    liger_t = types.ModuleType("liger_kernel.transformers")
    liger_t.LigerCrossEntropyLoss = BrokenCE
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger_t)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)

    rows = _run_suite("logprobs")
    assert rows["Liger cross entropy, reduction='none'"].status == "fails: RuntimeError: peer broke"
    assert rows["eager fp32 log_softmax + gather"].status == "ok"

    rows = _run_suite("grpo")
    for name in ("Cut Cross-Entropy, gradient filtering on", "Cut Cross-Entropy, exact"):
        assert rows[name].status == "ok", rows[name].status
        assert rows[name].loss_rel_diff < 1e-5  # the same loss as eager fp32 through the peer's call shape
    assert "auto" in calls and None in calls  # filtering on (default) and exact (filter_eps=None)


def test_registry_rejects_unknown_suites():
    with pytest.raises(ValueError, match="unknown suite 'nope'.*logprobs"):
        registry.suite_builder("nope")
    assert callable(registry.suite_builder("grpo_step"))  # measured in tests/test_bench_grpo_step.py


# ---------------------------------------------------------------------------------------------------------
# end to end


def test_quick_run_writes_json_markdown_and_png(tmp_path, monkeypatch, capsys):
    from fastrl.bench import main

    monkeypatch.setitem(registry.SUITES, "broken", "fastrl.bench.no_such_module")
    out = tmp_path / "bench"
    argv = ["--quick", "--out", str(out), "--repeats", "1", "--warmup", "0", "--no-progress"]
    argv += ["--suite", "logprobs", "dpo", "native", "broken"]
    monkeypatch.setattr("fastrl.bench.runner.SUITES", registry.SUITES)
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    env = payload["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU")
    assert "triton" in env and "liger-kernel" in env
    assert payload["ceilings"]["tflops"] > 0 and "measured" in payload["ceilings"]["source"]
    by_suite = {}
    for rec in payload["cases"]:
        by_suite.setdefault(rec["suite"], []).append(rec)
    assert set(by_suite) == {"logprobs", "dpo", "native", "broken"}
    dpo = by_suite["dpo"][0]
    rows = {r["method"]: r for r in dpo["rows"]}
    base = rows["four CPU BLAS products (policy, reference, grad_hidden, grad_weight)"]
    assert base["status"] == "ok" and base["x_baseline"] == 1.0 and base["extra_mib"] > 0
    assert rows["eager fp32"]["status"] == "ok" and rows["eager fp32"]["x_floor"] > 0
    assert dpo["floor_ms"] > 0 and dpo["grad_mib"] > 0 and dpo["shape"]["N"] == 16
    assert by_suite["broken"][0]["rows"][0]["status"].startswith("fails: ModuleNotFoundError")
    # Every method that ran computed the same loss as eager fp32 (fp32 inputs): the same work is compared.
    for rec in by_suite["dpo"] + by_suite["logprobs"]:
        for r in rec["rows"]:
            if r["status"] == "ok" and r["loss"] is not None:
                assert r["loss_rel_diff"] < 1e-4, (rec["suite"], r["method"], r["loss_rel_diff"])
    if importlib.util.find_spec("liger_kernel") is None:
        assert rows["Liger LigerFusedLinearDPOLoss"]["status"].startswith("skipped:")

    md = (out / "results.md").read_text()
    assert "| method | ms | extra MiB | x floor | x baseline | x fastrl | note |" in md
    # A CPU run says what it is, and calls nothing cuBLAS.
    assert "CPU run: a correctness run of the benchmark code, not a speed claim" in md
    assert "cuBLAS" not in md
    assert "## dpo: N=16 H=32 V=256" in md and md in capsys.readouterr().out
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_bench_arguments_exit_2(capsys):
    from fastrl.bench import main

    assert main(["--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--gpu"]) == 2
        assert "--gpu needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["--warmup", "-1"]) == 2
    assert "--warmup must be >= 0" in capsys.readouterr().err


def test_out_that_is_a_file_exits_2_without_running(tmp_path, capsys):
    # Review fix: mkdir on an existing file used to end the run in a FileExistsError traceback.
    from fastrl.bench import main

    not_a_dir = tmp_path / "results"
    not_a_dir.write_text("x")
    assert main(["--out", str(not_a_dir), "--quick", "--suite", "dpo", "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert not_a_dir.read_text() == "x"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_anchor_ceilings_only_for_16_bit_matmuls(monkeypatch, dtype):
    # Review fix: an H200 fp32 run used the bf16 matmul ceiling (790 TFLOP/s), so its floors were ~16x
    # too low; fp32 now measures its own ceiling.
    from fastrl.bench import floors

    measured = floors.Ceilings(tflops=50.0, tbps=3.0, source="measured in this run")
    monkeypatch.setattr(floors, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(floors, "measure_ceilings", lambda device, dtype: measured)
    got = floors.ceilings(torch.device("cuda"), dtype)
    if dtype == torch.float32:
        assert got is measured
    else:
        assert (got.tflops, got.tbps) == (790.0, 4.3) and "ANCHORS.md" in got.source
    assert floors.ceilings(torch.device("cpu"), torch.bfloat16) is measured  # a CPU never uses the anchors


@pytest.mark.gpu
def test_gpu_timing_and_memory_use_cuda_counters():
    dev = torch.device("cuda")
    x = torch.randn(1024, 1024, device=dev, requires_grad=True)
    mib, _ = harness.extra_memory_mib(lambda: (x * 2).sum().backward(), dev)
    assert 4.0 <= mib <= 16.0  # grad (4 MiB) + product (4 MiB), not the input
    times = harness.time_step(lambda: x @ x, dev, repeats=3, before=lambda: None)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_markdown_flags_a_loss_that_differs_from_the_reference():
    from fastrl.bench import report

    def row(method, diff):
        return {
            "method": method, "kind": "method", "status": "ok", "ms": 1.0, "extra_mib": 2.0, "note": "",
            "loss_rel_diff": diff, "x_floor": None, "x_baseline": None, "x_fastrl": None,
        }  # fmt: skip

    payload = {
        "environment": {"device": "dev", "torch": "t", "triton": "x", "date_utc": "now"},
        "settings": {"dtype": "float32", "repeats": "3"},
        "ceilings": {"tflops": 1.0, "tbps": 1.0, "source": "test"},
        "cases": [
            {"suite": "s", "case": "c", "floor_ms": None, "grad_mib": None, "floor_note": "", "shape": {},
             "rows": [row("same", 1e-7), row("off", 0.5), {**row("gone", None), "status": "fails: A | B"}]},
        ],
    }  # fmt: skip
    md = report.markdown(payload)
    assert "| same | 1 | 2.0 |" in md and "loss differs" not in md.split("| same")[1].split("\n")[0]
    assert "| off | 1 | 2.0 |  |  |  | loss differs from the reference by 5.0e-01 |" in md
    assert "| gone | fails: A / B |" in md  # a pipe in a reason cannot break the table


# ---------------------------------------------------------------------------------------------------------
# honest reports (issue 9, item 7)


def _payload(cases, device="CPU (x86_64, 2 threads)"):
    return {
        "environment": {"device": device, "torch": "t", "triton": "x", "date_utc": "now"},
        "settings": {"dtype": "float32", "repeats": "3"},
        "ceilings": {"tflops": 1.0, "tbps": 1.0, "source": "test"},
        "cases": cases,
    }


def test_a_floor_beaten_by_any_method_is_withheld_never_below_one():
    """A ceiling measured low on a busy machine makes the floor too high: the baseline then 'beats' it."""
    from fastrl.bench import report

    case = _case([], floor_ms=10.0)
    rows = [
        Row(suite="t", case="c", method="base", kind="baseline", status="ok", ms=4.0),
        Row(suite="t", case="c", method="fast", kind="fastrl", status="ok", ms=12.0),
    ]
    harness.add_ratios(case, rows)
    assert all(r.x_floor is None for r in rows)
    assert rows[1].x_baseline == 3.0  # the other ratios stand
    assert "x floor withheld: base ran in 4 ms, under the floor" in case.floor_note
    md = report.markdown(_payload([report.case_record(case, rows, suite="t", name="c")]))
    assert "**Ceilings too low**" in md and "t: c" in md
    assert "| base | 4 |  |  | 1.00 | 0.33 |" in md  # no x floor printed at all

    ok_case = _case([], floor_ms=2.0)
    rows = [Row(suite="t", case="c", method="base", kind="baseline", status="ok", ms=4.0)]
    harness.add_ratios(ok_case, rows)
    assert rows[0].x_floor == 2.0 and "withheld" not in ok_case.floor_note


def test_a_row_whose_runs_spread_more_than_2x_is_flagged():
    durations = iter([0.0, 0.0, 0.001, 0.02, 0.001])  # warmup, memory run, three timed runs

    def slow_sometimes():
        import time

        time.sleep(next(durations))

    steady = _method("steady", lambda: None)
    case = _case([_method("jumpy", slow_sometimes), steady])
    rows = {r.method: r for r in harness.run_case(case, _ctx(repeats=3, warmup=1))}
    assert rows["jumpy"].spread > harness.NOISY_SPREAD
    assert "noisy: timed runs spread" in rows["jumpy"].note
    assert "noisy" not in rows["steady"].note or rows["steady"].spread > harness.NOISY_SPREAD


def _cpu_only_triton_kernel():
    """A compiled-mode (not interpreted) Triton kernel launched on CPU tensors, as a GPU-only peer does."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is on: the kernel would run interpreted")

    @triton.jit
    def _twice(x_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(x_ptr + i, tl.load(x_ptr + i) * 2)

    def step():
        x = torch.ones(16)
        _twice[(1,)](x, N=16)
        return x.sum()

    return step


def test_peers_that_need_cuda_read_skipped_needs_cuda():
    def driver_error():
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    case = _case(
        [
            _method("fake GPU-only peer", driver_error, kind="peer"),
            _method("real Triton kernel", _cpu_only_triton_kernel(), kind="peer"),
            _method("a real bug", lambda: 1 / 0, kind="peer"),
        ]
    )
    rows = {r.method: r for r in harness.run_case(case, _ctx())}
    assert rows["fake GPU-only peer"].status == "skipped: needs CUDA"
    assert rows["real Triton kernel"].status == "skipped: needs CUDA", rows["real Triton kernel"].status
    assert rows["a real bug"].status.startswith("fails: ZeroDivisionError")


def test_the_png_keeps_skipped_and_failed_methods_as_labelled_gaps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from fastrl.bench import report

    drawn = {"bars": [], "texts": [], "titles": []}
    real_barh, real_text = Axes.barh, Axes.text

    def barh(self, names, widths, **kw):
        drawn["bars"].append((list(names), list(widths)))
        return real_barh(self, names, widths, **kw)

    def text(self, x, y, s, **kw):
        drawn["texts"].append(s)
        return real_text(self, x, y, s, **kw)

    monkeypatch.setattr(Axes, "barh", barh)
    monkeypatch.setattr(Axes, "text", text)
    base = {"kind": "method", "extra_mib": 1.0, "note": "", "loss_rel_diff": None}
    rows = [
        {**base, "method": "ran", "status": "ok", "ms": 2.0},
        {**base, "method": "gpu peer", "status": "skipped: needs CUDA", "ms": None, "extra_mib": None},
        {**base, "method": "broken", "status": "fails: RuntimeError: boom", "ms": None, "extra_mib": None},
    ]
    rec = {"suite": "s", "case": "c", "floor_ms": 1.0, "floor_note": "", "grad_mib": None, "rows": rows}
    only_gaps = {**rec, "case": "nothing ran", "rows": rows[1:]}
    assert report.plot(tmp_path / "r.png", _payload([rec, only_gaps]))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    time_bars = drawn["bars"][0]
    assert time_bars[0] == ["ran", "gpu peer", "broken"] and time_bars[1] == [2.0, 0.0, 0.0]
    labels = " ".join(drawn["texts"])
    assert "skipped: needs CUDA" in labels and "fails: RuntimeError: boom" in labels
    assert labels.count("skipped: needs CUDA") == 2  # the case where nothing ran is in the plot too


def test_grpo_step_header_describes_a_whole_step():
    from fastrl.bench import report
    from fastrl.bench.floors import Ceilings

    (case,) = registry.suite_builder("grpo_step")(_ctx(), Ceilings(tflops=1.0, tbps=1.0, source="t"))
    assert "whole GRPO step" in case.timed
    rows = [Row(suite="grpo_step", case=case.name, method="fastrl", kind="fastrl", status="ok", ms=5.0)]
    md = report.markdown(_payload([report.case_record(case, rows, suite="grpo_step", name=case.name)]))
    section = md.split("## grpo_step")[1]
    assert "one run: one whole GRPO step (generation, rewards, loss, backward, AdamW)" in section
    assert "forward+backward" not in section


def test_anchor_numbers_cited_by_help_and_readme_are_in_the_repository(capsys):
    import re
    from pathlib import Path

    from fastrl.bench import floors, runner

    root = Path(__file__).resolve().parents[1]
    anchors = (root / "benchmarks" / "ANCHORS.md").read_text()
    for tflops, tbps in floors.KNOWN.values():
        assert f"{tflops:g} TFLOP/s" in anchors and f"{tbps:g} TB/s" in anchors
    for shape in ("N=16384", "V=151936", "H=1536", "N=8192"):
        assert shape in anchors, shape
    help_text = runner.parser().format_help()
    readme = (root / "README.md").read_text()
    for text in (help_text, readme):
        assert "benchmarks/ANCHORS.md" in text
        assert not re.search(r"(?<![/\w])ANCHORS\.md", text), "a reference without its folder"


def test_a_beaten_floor_makes_the_run_measure_its_ceilings_again(monkeypatch):
    from fastrl.bench import floors, report, runner

    start = floors.Ceilings(tflops=1e-9, tbps=1e-9, source="measured in this run: test")
    again = floors.Ceilings(tflops=2.0, tbps=3.0, source="measured in this run: again")
    monkeypatch.setattr(runner, "ceilings", lambda device, dtype: start)
    monkeypatch.setattr(runner, "measure_ceilings", lambda device, dtype: again)

    def build(ctx, ceil):
        return [_case([_method("base", lambda: None, kind="baseline")], floor_ms=1e6)]

    monkeypatch.setattr(runner, "suite_builder", lambda name: build)
    payload = runner.run(_ctx(), ["t"], progress=False)
    assert payload["ceilings_remeasured"]["tflops"] == 2.0
    assert payload["cases"][0]["rows"][0]["x_floor"] is None
    md = report.markdown(payload)
    assert "Ceilings measured again at the end: 2 TFLOP/s, 3 TB/s." in md
