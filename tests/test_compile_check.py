"""The GPU compile check (fastrl/triton_kernels/compile_check.py) on the venv's Triton, no GPU needed.

The quick subset (one shape per kernel, flags all off and all on) runs here; scripts/compile_check.sh runs
the full sweep with the GPU machines' Triton and the newest.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from fastrl.triton_kernels import compile_check  # noqa: E402

_ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
needs_ptxas = pytest.mark.skipif(not os.path.exists(_ptxas), reason="the triton wheel's ptxas is missing")


@needs_ptxas
def test_quick_check_compiles_every_kernel_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "fastrl.triton_kernels.compile_check", "--arch", "90", "--quick"]
    cmd += ["--jobs", "1"]  # CI runs tests in parallel already
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_fused_forward_kernel",
                   "_fused_backward_kernel", "_grpo_loss_kernel"):  # fmt: skip
        assert kernel in text, kernel
    assert "target sm_90a" in text and " 0 failed" in text
    # Every row carries ptxas' register count and spill sizes, not a placeholder.
    rows = [line for line in text.splitlines() if line.startswith("_")]
    assert rows and all(" ? " not in line and " None " not in line for line in rows), rows


def _broken_kernel_module(tmp_path):
    # A kernel the interpreter runs but the compiler rejects: tl.arange needs a power-of-two range.
    (tmp_path / "broken_kernels.py").write_text(
        "import triton, triton.language as tl\n"
        "@triton.jit\n"
        "def _bad(x_ptr, N: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, N), 1.0)\n"
        "def launch(x, *, n):\n"
        "    _bad[(1,)](x, N=n)\n"
    )


@needs_ptxas
def test_a_compile_error_fails_the_check(tmp_path, monkeypatch):
    import torch

    _broken_kernel_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import broken_kernels

    def cases(quick):
        yield "bad n=3", lambda: broken_kernels.launch(torch.zeros(4), n=3)
        yield "good n=4", lambda: broken_kernels.launch(torch.zeros(4), n=4)

    monkeypatch.setattr(compile_check, "CASE_BUILDERS", (cases,))
    report = compile_check.run_check(90, quick=True)
    assert [s.case for s in report.failures] == ["bad n=3"]
    assert [s.case for s in report.specs if s.error is None] == ["good n=4"]
    assert "FAILED (bad n=3)" in compile_check.format_report(report)


def test_an_unknown_launcher_parameter_fails_loudly():
    def fused_forward(hidden, weight, bias_V, labels, *, inv_temp, ignore_index, with_entropy, interpret,
                      new_flag=False):  # fmt: skip
        pass

    with pytest.raises(compile_check.CompileCheckError, match="new_flag"):
        compile_check._check_signature(fused_forward)


def test_grpo_cases_follow_the_policy_registry(monkeypatch):
    from fastrl.triton_kernels import grpo

    monkeypatch.setitem(grpo.POLICY_IDS, "new_policy", max(grpo.POLICY_IDS.values()) + 1)
    labels = [label for label, _ in compile_check._grpo_cases(quick=True)]
    assert any("policy=new_policy" in label for label in labels)
