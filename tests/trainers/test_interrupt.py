"""Interrupted runs (issue 9.3): SIGINT / SIGTERM stop at the next step boundary with a checkpoint there
and one line, exit status 130 / 143; a second signal stops at once without saving; the resumed run
continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastrl.data import DataConfig
from fastrl.distributed.checkpoint import checkpoint_path, is_complete, list_checkpoints
from fastrl.models import ModelConfig
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.interrupt import TrainingInterrupted
from fastrl.trainers.sft import SFTRunConfig, SFTStep, run_sft

from .conftest import addition_rows, assert_same_history

ROOT = Path(__file__).resolve().parents[2]


def _cfg(model_dir, out, **train):
    base = dict(output_dir=str(out), max_steps=5, per_device_batch_size=4, progress_bar=False,
                export_final=False)  # fmt: skip
    return SFTRunConfig(
        model=ModelConfig(name_or_path=model_dir),
        data=DataConfig(max_length=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        train=TrainConfig(**{**base, **train}),
    )


def _signal_on_call(monkeypatch, call: int, *signals: int) -> None:
    """Make ``SFTStep.micro_step`` send this process ``signals`` at the start of its ``call``-th call, as
    a user's Ctrl-C or a scheduler's SIGTERM would arrive in the middle of a step."""
    original, count = SFTStep.micro_step, {"n": 0}

    def micro_step(self, index):
        count["n"] += 1
        if count["n"] == call:
            for s in signals:
                os.kill(os.getpid(), s)
        return original(self, index)

    monkeypatch.setattr(SFTStep, "micro_step", micro_step)


def test_sigterm_mid_step_saves_at_the_boundary_and_resumes_exactly(
    tiny_dir, tmp_path, monkeypatch, seed, capsys
):
    cfg = _cfg(tiny_dir, tmp_path / "b", seed=seed, gradient_accumulation_steps=2)
    full = run_sft(
        _cfg(tiny_dir, tmp_path / "a", seed=seed, gradient_accumulation_steps=2), dataset=addition_rows()
    )
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _signal_on_call(m, 3, signal.SIGTERM)  # first micro-step of step 2: step 2 still completes
        with pytest.raises(TrainingInterrupted) as info:
            run_sft(cfg, dataset=addition_rows())
    assert info.value.code == 143 and info.value.step == 2
    assert signal.getsignal(signal.SIGTERM) is before, "handlers restored"
    assert list_checkpoints(tmp_path / "b") == [checkpoint_path(tmp_path / "b", 2)]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastrl sft: stopped by SIGTERM at step 2 of 5; saved ")
    assert "--train.resume_from_checkpoint auto" in err[-1] and "Traceback" not in "".join(err)
    cfg.train.resume_from_checkpoint = "auto"
    resumed = run_sft(cfg, dataset=addition_rows())
    assert_same_history(
        resumed["history"], full["history"][2:], ("loss", "grad_norm", "lr", "num_loss_tokens")
    )


def test_second_signal_stops_at_once_without_saving(tiny_dir, tmp_path, monkeypatch, seed, capsys):
    cfg = _cfg(tiny_dir, tmp_path, seed=seed, save_steps=2)
    with monkeypatch.context() as m:
        _signal_on_call(m, 3, signal.SIGINT, signal.SIGINT)
        with pytest.raises(TrainingInterrupted) as info:
            run_sft(cfg, dataset=addition_rows())
    assert info.value.code == 130 and info.value.checkpoint is None and info.value.step == 2
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 2)]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGINT during step 3 of 5 (not saved)" in last and "checkpoint-2" in last


def _wait_for_step(proc, metrics: Path, after: int, timeout: float = 120) -> None:
    """Until ``metrics`` records a step past ``after``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] > after:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no step within the timeout")


def test_cli_run_stopped_by_ctrl_c(tiny_dir, tmp_path):
    """As a user sees it: `fastrl sft` in a subprocess, Ctrl-C (SIGINT) once it trains: exit status 130,
    one last line naming the step and the checkpoint, no traceback. (SIGTERM -> 143, the second signal
    and the exact resume are tested in this process above: each launch costs seconds.)"""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows()))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrl.cli", "sft", "--model.name_or_path", tiny_dir,
           "--data.dataset", str(data), "--data.max_length", "32", "--train.output_dir", str(out),
           "--train.max_steps", "100000", "--train.per_device_batch_size", "4",
           "--train.progress_bar", "false", "--train.export_final", "false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=pipe, stderr=pipe, text=True)
    try:
        _wait_for_step(proc, out / "metrics.jsonl", after=0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastrl sft: stopped by SIGINT at step "), err
    step = int(last.split(" at step ")[1].split()[0])
    assert step >= 1 and f"saved {checkpoint_path(out, step)}" in last
    assert is_complete(checkpoint_path(out, step)) and list_checkpoints(out) == [checkpoint_path(out, step)]
