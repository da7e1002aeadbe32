"""The trainers under torchrun: 2 CPU processes (gloo, FSDP2) against one process on the full batch.

One launch of tests/distributed/_trainer_fsdp_worker.py runs SFT (selective AC), DPO (sharded frozen
reference) and GRPO (dapo + KL, a checkpoint, the export); the tests compare rank 0's numbers with
single-process runs here and load what the GRPO run wrote.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrl.data import EpochSampler
from fastrl.data.sampler import ShardedSampler
from fastrl.losses.grpo_config import LOSS_TYPES
from tests.distributed._trainer_fsdp_worker import (
    PromptEngine,
    dpo_config,
    dpo_rows,
    grpo_config,
    grpo_rows,
    sft_config,
    sft_dcp_config,
    sft_rows,
    spread_reward,
)
from tests.trainers.invariance import assert_same_grads, assert_same_history, grpo_cfg, recorded_grads

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the 2-rank worker once per session (the xdist lock recipe of test_fsdp.py); returns
    (seed, model dir, rank 0's results, output dir)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "trainer-fsdp-run"
    with open(shared / "trainer-fsdp-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "result.pt").exists():
            from fastrl.models.tiny import save_tiny

            seed = int(os.environ.get("FASTRL_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / "seed").write_text(str(seed))
            save_tiny(out / "model", hidden_size=64, num_layers=2)
            # A sharded checkpoint written by one process, for the worker to resume on 2 ranks.
            from fastrl.trainers.sft import run_sft

            cfg = sft_dcp_config(str(out / "model"), out / "sft_dcp_ws1", seed=seed, per_device_batch_size=4)
            hist = run_sft(cfg, dataset=sft_rows())["history"]
            (out / "sft_dcp_ws1_history.json").write_text(json.dumps(hist))
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "tests.distributed._trainer_fsdp_worker", "--out", str(out),
                   "--model", str(out / "model"), "--seed", str(seed)]  # fmt: skip
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"seed={seed}\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}"
            (out / "stdout.txt").write_text(proc.stdout)
    seed = int((out / "seed").read_text())
    print(f"trainer fsdp seed={seed}")
    return seed, str(out / "model"), torch.load(out / "result.pt", weights_only=False), out


def _single_process(runner, cfg, rows, **kw):
    from fastrl.models import ModelConfig, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=cfg.model.name_or_path))
    if kw.get("engine") == "prompt":
        kw["engine"] = PromptEngine(tok.eos_token_id, cfg.grpo.num_generations)
    return runner(cfg, model=model, tokenizer=tok, dataset=rows, **kw), model


def _assert_same_run(got_history, got_weights, want_history, model) -> None:
    assert [r["step"] for r in got_history] == [r["step"] for r in want_history]
    for g, w in zip(got_history, want_history):
        # two half-batch gradients averaged by reduce-scatter vs one full-batch gradient: fp32 rounding
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]
    want = model.state_dict()
    assert got_weights.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got_weights[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sft_on_two_ranks_matches_one_process(run, tmp_path):
    from fastrl.trainers.sft import run_sft

    seed, model_dir, result, _ = run
    cfg = sft_config(model_dir, tmp_path, seed=seed, per_device_batch_size=4)
    want, model = _single_process(run_sft, cfg, sft_rows())
    _assert_same_run(result["sft_history"], result["sft_weights"], want["history"], model)


@pytest.mark.parametrize("variant", ["hsdp", "offload"])
def test_fsdp_options_train_as_the_plain_run(run, tmp_path, variant):
    """train.fsdp_replicate=2 (HSDP, 2-D mesh, with op-level AC) and train.fsdp_cpu_offload (unpinned here,
    warned) on 2 ranks against one process on the whole batch."""
    from fastrl.trainers.sft import run_sft

    seed, model_dir, result, _ = run
    cfg = sft_config(model_dir, tmp_path, seed=seed, per_device_batch_size=4)
    cfg.train.export_final = False
    want, _ = _single_process(run_sft, cfg, sft_rows())
    got = result[f"sft_{variant}_history"]
    assert [r["step"] for r in got] == [r["step"] for r in want["history"]]
    for g, w in zip(got, want["history"]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]
    if variant == "offload":
        assert result["offload_warnings"] and "unpinned" in result["offload_warnings"][0]


def test_fsdp_option_validation():
    from fastrl.distributed.fsdp import build_mesh, offload_policy
    from fastrl.trainers.common import fsdp_options
    from fastrl.trainers.core import TrainConfig

    with pytest.raises(ValueError, match="fsdp_replicate must be a positive divisor of the world size 4"):
        build_mesh("cpu", 4, 3)
    for bad in ({"fsdp_param_dtype": "fp8"}, {"fsdp_reduce_dtype": "auto"}, {"fsdp_replicate": 0}):
        with pytest.raises(ValueError, match=f"train.{next(iter(bad))}"):
            TrainConfig(**bad)
    assert fsdp_options(TrainConfig(), torch.device("cpu"))["param_dtype"] is None
    opts = fsdp_options(TrainConfig(), torch.device("cuda"))
    assert opts["param_dtype"] == torch.bfloat16 and opts["reduce_dtype"] == torch.float32
    assert fsdp_options(TrainConfig(bf16=False), torch.device("cuda"))["param_dtype"] is None
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert not isinstance(offload_policy(False), CPUOffloadPolicy)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pinned memory is unavailable"):
            assert offload_policy(True).pin_memory is False


def test_dpo_on_two_ranks_matches_one_process(run, tmp_path):
    from fastrl.trainers.dpo import run_dpo

    seed, model_dir, result, _ = run
    cfg = dpo_config(model_dir, tmp_path, seed=seed, per_device_batch_size=4)
    want, model = _single_process(run_dpo, cfg, dpo_rows())
    _assert_same_run(result["dpo_history"], result["dpo_weights"], want["history"], model)


def test_dpo_lora_on_two_ranks_matches_one_process(run, tmp_path):
    from fastrl.trainers.dpo import run_dpo

    seed, model_dir, result, _ = run
    cfg = dpo_config(model_dir, tmp_path, seed=seed, per_device_batch_size=4, lora=True)
    want, model = _single_process(run_dpo, cfg, dpo_rows())
    _assert_same_run(result["dpo_lora_history"], result["dpo_lora_weights"], want["history"], model)


def test_grpo_on_two_ranks_matches_one_process(run, tmp_path):
    """Same rollouts (a deterministic engine): global advantages and the dapo normaliser (global tokens /
    world size) make the 2-rank run the 1-process run on the whole generation batch."""
    from fastrl.trainers.grpo import run_grpo

    seed, model_dir, result, _ = run
    cfg = grpo_config(model_dir, tmp_path, seed=seed, per_device_batch_size=8)
    cfg.train.export_final, cfg.train.save_steps = False, 0
    want, model = _single_process(run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt")
    got = result["grpo_exact_history"]
    assert_same_history(got, want["history"], what="grpo dapo")  # every metric, token means included
    _assert_same_run(got, result["grpo_exact_weights"], want["history"], model)


@pytest.mark.parametrize("loss_type", [*sorted(LOSS_TYPES), "bnpo_mu2"])
def test_grpo_loss_types_on_two_ranks_match_one_process(run, tmp_path, loss_type):
    """World size 2 with 2 micro-steps of 2 completions per rank against one process with the step's 8
    completions in one micro-batch: the loss, the gradients and every logged metric (token means, the
    rollout's completion lengths, extremes, counts) within fp32's 1e-5. ``bnpo_mu2``: two passes over
    each round (old log-probs, the rollout pass's entropy, ratios away from 1 at the second step)."""
    from fastrl.trainers.grpo import run_grpo

    seed, model_dir, result, _ = run
    iters = 2 if loss_type.endswith("_mu2") else 1
    cfg = grpo_cfg(model_dir, tmp_path, seed, 8, 1, loss_type.removesuffix("_mu2"), iters=iters)
    want, grads = _single_process_grads(
        run_grpo, cfg, grpo_rows(), reward_funcs=[spread_reward], engine="prompt"
    )
    got, got_grads = result["grpo_mu2" if iters == 2 else f"grpo_{loss_type}"]
    assert [r["step"] for r in got] == [1, 2]
    if iters == 2:
        assert got[1]["ratio/mean"] != 1.0 and "entropy" in got[0]
    assert_same_history(got, want, what=loss_type)
    assert_same_grads(got_grads, grads, what=loss_type)


def test_sft_and_dpo_on_two_ranks_match_one_process_at_another_split(run, tmp_path):
    """SFT: 2 ranks x 2 micro-steps x 2 examples against one process with the step's 8 examples at once
    (each micro-batch normalised by its own tokens would differ); DPO: 2 ranks x 2 pairs against 4
    pairs at once. Every metric and each step's gradients."""
    from fastrl.trainers.dpo import run_dpo
    from fastrl.trainers.sft import run_sft

    seed, model_dir, result, _ = run
    cfg = sft_config(model_dir, tmp_path / "sft", seed=seed, per_device_batch_size=8)
    cfg.train.gradient_accumulation_steps, cfg.train.export_final = 1, False
    want, grads = _single_process_grads(run_sft, cfg, sft_rows())
    assert_same_history(result["sft_history"], want, what="sft")
    assert_same_grads(result["sft_grads"], grads, what="sft")
    cfg = dpo_config(model_dir, tmp_path / "dpo", seed=seed, per_device_batch_size=4)
    cfg.train.export_final = False
    want, grads = _single_process_grads(run_dpo, cfg, dpo_rows())
    assert_same_history(result["dpo_history"], want, what="dpo")
    assert_same_grads(result["dpo_grads"], grads, what="dpo")


def test_lora_meta_init_on_two_ranks_matches_one_process(run, tmp_path):
    """A LoRA SFT run by name at world size 2 builds on the meta device (base weights loaded shard by
    shard, adapters seeded after the load) and trains as one process that loaded the model whole."""
    from fastrl.models import LoraConfig
    from fastrl.trainers.sft import run_sft

    seed, model_dir, result, _ = run
    assert result["sft_lora_meta_applies"]
    cfg = sft_config(model_dir, tmp_path, seed=seed, per_device_batch_size=4)
    cfg.lora, cfg.train.export_final = LoraConfig(enabled=True, r=4, alpha=8), False
    with recorded_grads() as grads:
        want = run_sft(cfg, dataset=sft_rows())["history"]
    got, got_grads = result["sft_lora_meta"]
    assert len(grads[0]) == 2 * 2 * 7  # lora_A and lora_B of 7 linear layers in each of 2 layers
    assert_same_history(got, want, what="lora meta")
    assert_same_grads(got_grads, grads, what="lora meta")


def _single_process_grads(runner, cfg, rows, **kw):
    with recorded_grads() as grads:
        out, _ = _single_process(runner, cfg, rows, **kw)
    return out["history"], grads


def test_grpo_on_two_ranks_checkpoint_and_export_load(run):
    from transformers import AutoModelForCausalLM

    from fastrl.distributed.checkpoint import load_checkpoint
    from fastrl.models import ModelConfig, load_model_and_tokenizer

    _, model_dir, result, out = run
    history = result["grpo_history"]
    assert [r["step"] for r in history] == [1, 2] and result["grpo_generate_calls"] == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["reward"]])).all() for r in history)
    assert all(r["grad_norm"] > 0 for r in history)
    ckpt = out / "grpo" / "checkpoint-1"
    # Under FSDP the default format is sharded: each rank's own shards, no gathered model file (loaded
    # below by one process: 2 -> 1 ranks).
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"COMPLETE", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_rank0.pt",
            "rng_rank1.pt"} <= files and "model.safetensors" not in files  # fmt: skip
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 1 and len(state["trainer"]["ranks"]) == 2  # each rank's rollouts
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=model_dir))
    assert load_checkpoint(ckpt, model=model)["step"] == 1
    exported = AutoModelForCausalLM.from_pretrained(str(out / "grpo" / "final"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = exported(ids).logits
        assert torch.isfinite(logits).all()
        # two optimizer steps at lr 1e-2 moved the exported weights away from the checkpoint after one
        assert not torch.allclose(logits, model(ids).logits)
    # resumed from checkpoint-1 on 2 ranks: the same step 2 as the uninterrupted run
    (resumed,) = result["grpo_resumed_history"]
    for key in ("loss", "grad_norm", "reward", "completion_length"):
        assert resumed[key] == history[1][key], key  # bit-identical
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes the log


def test_sharded_checkpoints_resume_at_any_world_size(run, tmp_path):
    """DCP checkpoints: 2 -> 2 ranks bit-identical; 1 -> 2 and 2 -> 1 ranks (same global batch) the same
    data order with losses within fp32 reduction order; final weights close."""
    from fastrl.distributed.checkpoint import load_checkpoint
    from fastrl.trainers.sft import run_sft

    seed, model_dir, result, out = run
    full2 = result["sft_dcp_history"]
    assert [r["step"] for r in full2] == [1, 2, 3, 4]
    keys = ("loss", "grad_norm", "lr", "num_loss_tokens")
    resumed = result["sft_dcp_resumed_history"]
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in full2[2:]]

    full1 = json.loads((out / "sft_dcp_ws1_history.json").read_text())
    from_1 = result["sft_dcp_from_1_history"]
    for got, want in ((from_1, full1[2:]), (full1, full2)):
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            assert g["num_loss_tokens"] == w["num_loss_tokens"]  # the same data, step by step
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]

    cfg = sft_dcp_config(model_dir, tmp_path / "from_2", seed=seed, per_device_batch_size=4)
    cfg.train.resume_from_checkpoint = str(out / "sft_dcp" / "checkpoint-2")
    from_2 = run_sft(cfg, dataset=sft_rows())
    for g, w in zip(from_2["history"], full2[2:]):
        assert g["num_loss_tokens"] == w["num_loss_tokens"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]
    # Final weights: the 2-rank run's export against the 1-process continuation of its checkpoint.
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(str(out / "sft_dcp" / "final")).state_dict()
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "from_2" / "final")).state_dict()
    worst = max(float((two[k] - one[k]).norm() / one[k].norm().clamp(min=1e-12)) for k in one)
    print(f"2 ranks vs 1 process after resume: max relative weight difference {worst:.2e}")
    assert worst < 1e-3
    ckpt = out / "sft_dcp" / "checkpoint-2"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "dcp" / "__1_0.distcp").exists()
    assert load_checkpoint(ckpt, model=AutoModelForCausalLM.from_pretrained(model_dir))["step"] == 2


def test_meta_device_init_loads_only_each_ranks_shards(run):
    """Each rank materialises only its shards: ~model / world size, plus one slice in flight; the
    gathered weights are the file's exactly. (The trainers' runs above built their models this way.)"""
    from safetensors.torch import load_file

    _, model_dir, result, out = run
    # The trainers' runs that load by name (SFT with DCP checkpoints, GRPO) built their models on meta.
    assert "meta-device load: rank 0 holds 0.2 MiB of the model's 0.4 MiB" in (out / "stdout.txt").read_text()
    reports = result["meta_reports"]
    model_bytes = reports[0].model_bytes
    for rank, r in enumerate(reports):
        print(f"rank {rank}: holds {r.local_bytes} B after load (peak {r.peak_bytes} B with the largest "
              f"slice in flight) of the model's {model_bytes} B")  # fmt: skip
        assert r.model_bytes == model_bytes
        assert r.local_bytes <= model_bytes / 2 + 4 * 64 * 4  # dim-0 chunks: at most a row per tensor more
        assert r.peak_bytes < 0.6 * model_bytes
    assert sum(r.local_bytes for r in reports) == model_bytes
    want = load_file(f"{model_dir}/model.safetensors")
    got = result["meta_weights"]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("lengths", [None, "random"])
def test_sharded_sampler_splits_each_global_batch(seed, lengths):
    n, bs, world = 23, 3, 4
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 50, (n,), generator=g).tolist() if lengths else None
    ranks = [ShardedSampler(n, bs, seed=seed, rank=r, world_size=world, lengths=lens) for r in range(world)]
    whole = EpochSampler(n, bs * world, seed=seed)
    for _ in range(7):  # crosses epoch boundaries
        shares = [s.next_batch() for s in ranks]
        assert all(len(s) == bs for s in shares)
        assert sorted(sum(shares, [])) == sorted(whole.next_batch())
    assert ranks[0].state_dict() == whole.state_dict()
    single = ShardedSampler(n, bs, seed=seed)
    assert _batches(single, 9) == _batches(EpochSampler(n, bs, seed=seed), 9)  # world size 1: unchanged
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(n, bs, seed=seed, rank=4, world_size=4)


def _batches(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_train_config_switches():
    from fastrl.trainers.core import TrainConfig, setup_distributed

    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        TrainConfig(activation_checkpointing="some")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        with pytest.raises(ValueError, match="train.fsdp"):
            setup_distributed(TrainConfig(fsdp=True, device="cpu"))
        assert setup_distributed(TrainConfig(device="cpu")) == (torch.device("cpu"), False)


def test_activation_checkpointing_switch_keeps_the_run(run, tmp_path):
    """One process: train.activation_checkpointing wraps the layers and changes no number."""
    from fastrl.distributed.activation_checkpoint import count_checkpointed
    from fastrl.models import ModelConfig, load_model_and_tokenizer
    from fastrl.trainers.sft import run_sft

    seed, model_dir, _, _ = run
    runs = {}
    for mode in ("none", "full"):
        cfg = sft_config(model_dir, tmp_path / mode, seed=seed, per_device_batch_size=4)
        cfg.train.max_steps, cfg.train.export_final, cfg.train.activation_checkpointing = 2, False, mode
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=model_dir))
        runs[mode] = run_sft(cfg, model=model, tokenizer=tok, dataset=sft_rows())["history"]
        assert count_checkpointed(model) == (2 if mode == "full" else 0)
    for a, b in zip(runs["none"], runs["full"]):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
