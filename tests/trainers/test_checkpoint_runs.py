"""Runs and their checkpoints (issue 9.2): a fresh run never mixes with another run's checkpoints, a resume
is refused for a checkpoint past max_steps or of another trainer, model or config; count metrics under
gradient accumulation are the step's totals (issue 9.6)."""

from __future__ import annotations

import json

import pytest
import torch

from fastrl.data import DataConfig
from fastrl.distributed.checkpoint import COMPLETE, checkpoint_path, list_checkpoints, read_state
from fastrl.models import ModelConfig
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.dpo import DPORunConfig, run_dpo
from fastrl.trainers.sft import SFTRunConfig, run_sft

from .conftest import addition_rows


def _cfg(model_dir, out, **train):
    base = dict(output_dir=str(out), max_steps=2, per_device_batch_size=4, progress_bar=False,
                export_final=False, save_steps=1)  # fmt: skip
    return SFTRunConfig(
        model=ModelConfig(name_or_path=model_dir),
        data=DataConfig(max_length=32),
        optim=OptimConfig(lr=3e-3),
        train=TrainConfig(**{**base, **train}),
    )


def test_fresh_run_refuses_a_folder_with_checkpoints_unless_overwrite(tiny_dir, tmp_path, seed):
    run_sft(_cfg(tiny_dir, tmp_path, max_steps=4, seed=seed), dataset=addition_rows())
    old = list_checkpoints(tmp_path)
    assert [p.name for p in old] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    with pytest.raises(ValueError, match="already holds checkpoints of another run.*overwrite_output_dir"):
        run_sft(_cfg(tiny_dir, tmp_path, seed=seed + 1), dataset=addition_rows())
    assert list_checkpoints(tmp_path) == old  # untouched
    out = run_sft(_cfg(tiny_dir, tmp_path, seed=seed + 1, overwrite_output_dir=True), dataset=addition_rows())
    # Only the new run's checkpoints and metrics remain: a later `auto` resume cannot pick the old ones.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert read_state(checkpoint_path(tmp_path, 1))["run"]["config"]["train.seed"] == seed + 1
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["loss"] == out["loss"]


def test_resume_past_max_steps_is_refused_and_longer_runs_continue(tiny_dir, tmp_path, seed):
    run_sft(_cfg(tiny_dir, tmp_path, max_steps=4, seed=seed), dataset=addition_rows())
    with pytest.raises(ValueError, match="checkpoint-3 is at step 3, past train.max_steps=2"):
        run_sft(_cfg(tiny_dir, tmp_path, seed=seed, resume_from_checkpoint="auto"), dataset=addition_rows())
    # max_steps, logging and saving may change on resume.
    cfg = _cfg(tiny_dir, tmp_path, max_steps=5, seed=seed, resume_from_checkpoint="auto", logging_steps=2)
    out = run_sft(cfg, dataset=addition_rows())
    assert [r["step"] for r in out["history"]] == [4, 5]


def test_checkpoint_of_another_trainer_model_or_config_is_refused(tiny_dir, tmp_path, seed):
    from fastrl.models.tiny import save_tiny

    run_sft(_cfg(tiny_dir, tmp_path, max_steps=2, seed=seed), dataset=addition_rows())
    ckpt = str(checkpoint_path(tmp_path, 1))
    run = read_state(ckpt)["run"]
    assert run["trainer"] == "sft" and run["model"]["class"] == "Qwen2ForCausalLM"
    assert run["config"]["model.name_or_path"] == tiny_dir and len(run["fingerprint"]) == 64

    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(10)]
    dpo = DPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        data=DataConfig(max_length=32),
        train=TrainConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_batch_size=4,
                          progress_bar=False, export_final=False, resume_from_checkpoint=ckpt),
    )  # fmt: skip
    with pytest.raises(ValueError, match="written by `fastrl sft`, not `fastrl dpo`"):
        run_dpo(dpo, dataset=pairs)

    other = str(save_tiny(tmp_path / "deep", hidden_size=64, num_layers=3))
    cfg = _cfg(other, tmp_path / "x", seed=seed, resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match="holds another model: Qwen2ForCausalLM with"):
        run_sft(cfg, dataset=addition_rows())

    cfg = _cfg(tiny_dir, tmp_path, seed=seed, resume_from_checkpoint=ckpt)
    cfg.optim.lr, cfg.data.max_length = 1e-3, 24
    with pytest.raises(ValueError, match=r"data.max_length: 32 -> 24; optim.lr: 0.003 -> 0.001\)"):
        run_sft(cfg, dataset=addition_rows())
    cfg = _cfg(tiny_dir, tmp_path, seed=seed, resume_from_checkpoint=ckpt, per_device_batch_size=2)
    with pytest.raises(ValueError, match="train.global_micro_batch: 4 -> 2"):
        run_sft(cfg, dataset=addition_rows())
    # A damaged file under a valid marker is named, not loaded.
    (checkpoint_path(tmp_path, 1) / "model.safetensors").write_bytes(b"\0" * 10)
    assert (checkpoint_path(tmp_path, 1) / COMPLETE).exists()
    with pytest.raises(ValueError, match="model.safetensors has 10 bytes"):
        run_sft(_cfg(tiny_dir, tmp_path, seed=seed, resume_from_checkpoint=ckpt), dataset=addition_rows())


def test_num_loss_tokens_is_the_step_total_under_accumulation(tiny_dir, tmp_path, seed):
    # The same 8 examples per step, in one micro-batch or two of 4 (the sampler draws consecutively).
    one = run_sft(_cfg(tiny_dir, tmp_path / "a", seed=seed, per_device_batch_size=8, save_steps=0),
                  dataset=addition_rows())  # fmt: skip
    two = run_sft(_cfg(tiny_dir, tmp_path / "b", seed=seed, gradient_accumulation_steps=2, save_steps=0),
                  dataset=addition_rows())  # fmt: skip
    for a, b in zip(one["history"], two["history"]):
        assert a["num_loss_tokens"] == b["num_loss_tokens"] > 8
    assert torch.isfinite(torch.tensor(two["loss"]))
