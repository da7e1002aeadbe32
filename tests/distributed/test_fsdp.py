"""FSDP2 on 2 CPU processes (gloo, launched by torchrun) against one process on the full batch.

One torchrun launch runs tests/distributed/_fsdp_worker.py, which covers apply_fsdp (+ selective AC),
the env helpers under a real launcher, and FSDP checkpoint save / load / export; this file checks the
numbers rank 0 wrote against single-process references.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed._fsdp_worker import make_optimizer
from tests.distributed._models import batch, lm_loss, tiny_lora, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _launch(out: Path, seed: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed._fsdp_worker", "--out", str(out), "--seed", str(seed)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, f"seed={seed}\n{proc.stdout[-2000:]}\n{ranks[-8000:]}"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Launch the 2-rank worker once per test session; returns (seed, rank 0's results, output dir).

    Under pytest-xdist every worker process would run a module fixture again; the first one to take the
    lock launches, the others read its results (the recipe from the pytest-xdist docs).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "fsdp-run"
    with open(shared / "fsdp-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "result.pt").exists():
            seed = int(os.environ.get("FASTRL_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / "seed").write_text(str(seed))
            _launch(out, seed)
    seed = int((out / "seed").read_text())
    print(f"fsdp seed={seed}")
    return seed, torch.load(out / "result.pt", weights_only=False), out


def reference_step(seed: int, *, lora: bool = False):
    """One optimizer step of one process on the whole batch: what the two ranks together must reproduce."""
    model = tiny_model(seed=seed)
    if lora:
        model = tiny_lora(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    loss = lm_loss(model, batch(seed, b=4))
    loss.backward()
    opt.step()
    return model, loss.item()


def assert_same_weights(got: dict, want: dict, exact: bool) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            # Two half-batch gradients averaged by reduce-scatter vs one full-batch gradient: equal up to
            # fp32 summation order (weights ~0.02, lr 0.1: fp32 ulps of the weights and the step).
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_env_under_torchrun(fsdp_run):
    _, result, _ = fsdp_run
    assert result["ranks"] == [(0, 0, True), (1, 1, False)]
    assert result["mean_of_floats"] == 0.5
    assert result["dict_mean"] == {"one": 1.0, "rank": 0.5}


def test_bf16_compute_keeps_fp32_master_weights(fsdp_run):
    seed, result, _ = fsdp_run
    assert result["bf16_param_dtypes"] == result["bf16_grad_dtypes"] == ["torch.float32"]
    _, loss = reference_step(seed)
    assert result["bf16_loss"] == pytest.approx(loss, rel=2e-2)  # bf16 forward: ~3 significant digits


def test_apply_fsdp_bad_arguments():
    from fastrl.distributed.fsdp import apply_fsdp

    with pytest.raises(ValueError, match="param_dtype"):
        apply_fsdp(tiny_model(), param_dtype=torch.int8)
    with pytest.raises(ValueError, match="reduce_dtype"):
        apply_fsdp(tiny_model(), reduce_dtype="fp32")


def test_one_step_matches_single_process(fsdp_run):
    seed, result, _ = fsdp_run
    model, loss = reference_step(seed)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert_same_weights(result["weights"], model.state_dict(), exact=False)


def test_fsdp_checkpoint_round_trip(fsdp_run):
    _, result, out = fsdp_run
    assert_same_weights(result["restored"], result["weights"], exact=True)
    assert result["next_loss_restored"] == result["next_loss"]
    assert_same_weights(result["after_next_restored"], result["after_next"], exact=True)
    assert sorted(p.name for p in (out / "ckpt" / "checkpoint-1").iterdir()) == [
        "COMPLETE", "model.safetensors", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json",
    ]  # fmt: skip


def test_fsdp_adapter_checkpoint_and_export(fsdp_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    seed, result, out = fsdp_run
    assert_same_weights(result["lora_restored"], result["lora"], exact=True)
    saved = load_file(out / "lora" / "checkpoint-1" / "adapter_model.safetensors")
    assert len(saved) == 8 and all("lora_" in k for k in saved)
    # The LoRA step under FSDP matches the single-process LoRA step.
    model, _ = reference_step(seed, lora=True)
    assert_same_weights(result["lora"], model.state_dict(), exact=False)
    exported = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    with torch.no_grad():
        logits = exported(batch(seed + 2, b=2)).logits
    torch.testing.assert_close(logits, result["lora_logits"], rtol=1e-5, atol=1e-5)
