"""Suite ``grpo_step``: a fastrl GRPO step runs in its worker and gives a row with a time, tokens/s and a
peak; TRL is a clean "skipped" row when it is not importable; a worker that fails is a "fails" row."""

from __future__ import annotations

import sys

import pytest
import torch

from fastrl.bench import grpo_step
from fastrl.bench.floors import ceilings
from fastrl.bench.harness import BenchContext, run_case

CPU = torch.device("cpu")


def _ctx() -> BenchContext:
    return BenchContext(device=CPU, dtype=torch.float32, quick=True, repeats=2, warmup=1)


def _case(*, keep: str):
    ctx = _ctx()
    (case,) = grpo_step.build(ctx, ceilings(CPU, torch.float32))
    case.methods = [m for m in case.methods if m.name.startswith(keep)]
    assert case.methods, f"no method named {keep!r}*"
    return case, ctx


def test_fastrl_step_runs_in_its_worker_and_reports_tokens_and_memory():
    case, ctx = _case(keep="fastrl")
    (row,) = run_case(case, ctx)
    assert row.status == "ok", row.status
    assert row.kind == "fastrl"
    assert len(row.ms_all) == ctx.repeats and row.ms > 0
    got = grpo_step.RESULTS[(case.name, row.method)]
    s = grpo_step.sizes(ctx)
    n = s["prompts"] * s["generations"]
    # every completion has its P prompt tokens and 1..C completion tokens (EOS may stop one early)
    assert n * (s["prompt_len"] + 1) <= got["tokens_per_step"] <= n * (s["prompt_len"] + s["completion_len"])
    assert got["tokens_per_s"] > 0
    assert got["extra_mib"] > 0  # the worker's weights, optimizer and activations at least
    assert "tokens/s" in got["note"]
    parts = got["parts_s"]  # every part measured, the generation a real share of the step
    assert set(parts) == set(grpo_step.PART_KEYS) and all(v >= 0 for v in parts.values()), parts
    assert parts["generate"] > 0 and parts["optimizer"] > 0 and parts["logprob_passes"] == 0  # beta 0
    assert parts["train_forward_loss"] > 0 and parts["rollout_other"] > 0 and parts["backward_other"] > 0
    assert sum(parts.values()) <= 1.05 * max(row.ms_all) / 1e3, (parts, row.ms_all)


def test_trl_is_skipped_cleanly_when_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # find_spec and import both see "not installed"
    case, ctx = _case(keep="TRL")
    rows = run_case(case, ctx)
    assert rows and all(r.status.startswith("skipped: trl not importable") for r in rows)
    assert all(r.ms is None for r in rows)


def test_memory_reader_sees_a_new_allocation():
    """In a fresh process, as the bench measures: in a long-lived test worker, memory freed by earlier tests
    can be returned while this one allocates and leave RSS under the baseline."""
    import subprocess
    import sys

    code = (
        "import torch; from fastrl.bench import grpo_step\n"
        "mem = grpo_step._Memory(cuda=False)\n"
        "block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "print(mem.peak_mib())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) >= 60, out.stdout


def test_a_failing_worker_is_a_fails_row(tmp_path):
    case, ctx = _case(keep="fastrl")
    case.make_inputs = lambda: {"model_dir": str(tmp_path / "missing"), "prompts": ["ab"] * 4}
    (row,) = run_case(case, ctx)
    assert row.status.startswith("fails:"), row.status


@pytest.mark.gpu
def test_fastrl_step_on_the_gpu_reports_cuda_peak_memory():
    ctx = BenchContext(device=torch.device("cuda"), dtype=torch.bfloat16, quick=True, repeats=2, warmup=1)
    (case,) = grpo_step.build(ctx, ceilings(ctx.device, ctx.dtype))
    case.methods = [m for m in case.methods if m.kind == "fastrl"]
    (row,) = run_case(case, ctx)
    assert row.status == "ok", row.status
    got = grpo_step.RESULTS[(case.name, row.method)]
    assert got["tokens_per_s"] > 0 and got["extra_mib"] > 0


def test_real_model_case_uses_the_folder_and_chat_prompts(tmp_path, monkeypatch):
    """``--model``: the case loads the given folder and counts completion tokens only (prompt_len 0)."""
    from fastrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    tok = build_char_tokenizer()
    folder = str(save_tiny(tmp_path / "m", model=build_tiny_model(tok, seed=0), tokenizer=tok))
    s = dict(prompts=2, generations=2, prompt_len=0, completion_len=6, bf16=False, fixed_length=False)
    real = dict(
        model_dir=folder, prompts=grpo_step.chat_prompts(8, seed=0), sizes={**s, "max_prompt_len": 256}
    )
    monkeypatch.setattr(grpo_step, "REAL_MODEL", real)
    ctx = _ctx()
    (case,) = grpo_step.build(ctx, ceilings(CPU, torch.float32))
    assert [m.name for m in case.methods] == ["fastrl (hf engine)", "TRL GRPOTrainer"]
    case.methods = case.methods[:1]
    (row,) = run_case(case, ctx)
    assert row.status == "ok", row.status
    got = grpo_step.RESULTS[(case.name, row.method)]
    assert 4 <= got["tokens_per_step"] <= 4 * 6  # 2 x 2 completions of 1..6 tokens, no prompt tokens


def test_main_refuses_gguf_file_without_model():
    with pytest.raises(ValueError, match="--gguf-file needs --model"):
        grpo_step.main(["--gguf-file", "x.gguf", "--no-plot", "--no-progress"])
