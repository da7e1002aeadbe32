"""engine.kind=vllm, colocated in the trainer's process: log-prob contract after a training step and a
sync, verified checksums, LoRA, unknown names, small buckets, GRPO end to end."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from fastrl.engine import EngineConfig, build_engine  # noqa: E402
from fastrl.engine.sync import ChecksumMismatchError  # noqa: E402

from . import checks  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(vllm_tiny_dir):
    model, tok = checks.load(vllm_tiny_dir)
    eng = build_engine(EngineConfig(kind="vllm", kv_cache_space_gb=1), model, tok)
    yield eng
    eng.close()


def test_is_the_vllm_engine(engine):
    from fastrl.engine.vllm import VLLMEngine

    assert isinstance(engine, VLLMEngine) and not engine.cfg.separate_process
    assert engine.engine_pid() is None


@pytest.mark.parametrize("case", list(checks.PARAMS))
def test_logprobs_match_the_trainer_after_a_step(engine, vllm_tiny_dir, case):
    checks.check_logprobs_after_step(engine, vllm_tiny_dir, case)


def test_verified_sync(engine, vllm_tiny_dir):
    checks.check_verified_sync_covers_every_tensor(engine, vllm_tiny_dir)


def test_corrupted_bucket_is_caught(engine, vllm_tiny_dir, monkeypatch):
    from fastrl.engine.vllm.worker import FastrlWorkerExtension

    original = FastrlWorkerExtension._fastrl_load

    def corrupt(self, pairs, verify):
        pairs[0][1].view(-1)[0] += 1.0  # one value changed on the engine side
        return original(self, pairs, verify)

    monkeypatch.setattr(FastrlWorkerExtension, "_fastrl_load", corrupt)
    model, _ = checks.load(vllm_tiny_dir)
    engine.cfg.verify_sync = True
    with pytest.raises(ChecksumMismatchError, match="model.embed_tokens.weight"):
        engine.sync_weights(model)


def test_small_buckets(engine, vllm_tiny_dir):
    checks.check_small_buckets(engine, vllm_tiny_dir)


def test_lora_sync_leaves_the_trainer_unchanged(engine, vllm_tiny_dir):
    checks.check_lora_sync(engine, vllm_tiny_dir)


def test_unknown_names_are_refused(engine, vllm_tiny_dir):
    checks.check_unknown_names_refused(engine, vllm_tiny_dir)


def test_bad_engine_options(engine, vllm_tiny_dir):
    model, tok = checks.load(vllm_tiny_dir)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        build_engine(EngineConfig(kind="vllm", kv_cache_dtype="bfloat16"), model, tok)
    with pytest.raises(ValueError, match="block_size"):
        build_engine(EngineConfig(kind="vllm", block_size=16), model, tok)


def test_grpo_reward_rises(engine, vllm_tiny_dir, tmp_path):
    from tests.engine.vllm.grpo_run import run_and_check

    run_and_check(engine, vllm_tiny_dir, tmp_path)


@pytest.mark.gpu
def test_sleep_mode_on_cuda(vllm_tiny_dir):
    """CUDA only: the engine sleeps after generate (level 1), a sync wakes the weights, loads, wakes the
    KV cache; log-probs still match the trainer."""
    model, tok = checks.load(vllm_tiny_dir)
    model.cuda()
    eng = build_engine(
        EngineConfig(kind="vllm", enable_sleep_mode=True, gpu_memory_utilization=0.2), model, tok
    )
    try:
        assert eng.sleep_mode
        eng.generate(checks.prompts(tok, 2), checks.SamplingParams(max_new_tokens=4, seed=1))
        assert eng._asleep
        model.cpu()
        checks.check_logprobs_after_step(eng, vllm_tiny_dir, "t07_topk_topp")
    finally:
        eng.close()
