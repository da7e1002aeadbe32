"""engine.kind=vllm with separate_process: vLLM's engine core in its own process, weights through one
shared-memory buffer with one RPC per bucket. Same checks as in-process, plus the engine process killed
in the middle of a sync (a clear error within the timeout, never a hang) - the last test of the module,
since it ends the shared engine."""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("vllm")

from fastrl.engine import EngineConfig, build_engine  # noqa: E402
from fastrl.engine.sync import SyncError  # noqa: E402

from . import checks  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(vllm_tiny_dir):
    model, tok = checks.load(vllm_tiny_dir)
    cfg = EngineConfig(kind="vllm", separate_process=True, kv_cache_space_gb=1, sync_timeout_s=60)
    eng = build_engine(cfg, model, tok)
    yield eng
    eng.close()


def test_runs_in_its_own_process(engine):
    pid = engine.engine_pid()
    assert pid is not None and pid != os.getpid()


@pytest.mark.parametrize("case", ["t1", "t07_topk_topp"])
def test_logprobs_match_the_trainer_after_a_step(engine, vllm_tiny_dir, case):
    checks.check_logprobs_after_step(engine, vllm_tiny_dir, case)


def test_small_buckets_through_shared_memory(engine, vllm_tiny_dir):
    checks.check_small_buckets(engine, vllm_tiny_dir)


def test_lora_sync_leaves_the_trainer_unchanged(engine, vllm_tiny_dir):
    checks.check_lora_sync(engine, vllm_tiny_dir)


def test_unknown_names_are_refused(engine, vllm_tiny_dir):
    checks.check_unknown_names_refused(engine, vllm_tiny_dir)


def test_grpo_reward_rises(vllm_tiny_dir, tmp_path):
    """run_grpo builds its separate-process engine from the config, as `fastrl grpo` does, and closes it."""
    from tests.engine.vllm.grpo_run import run_and_check

    cfg = EngineConfig(kind="vllm", separate_process=True, kv_cache_space_gb=1)
    run_and_check(cfg, vllm_tiny_dir, tmp_path)


def test_engine_killed_mid_sync(engine, vllm_tiny_dir):
    model, _ = checks.load(vllm_tiny_dir)
    engine.syncer.bucket_bytes = 8192  # several buckets: the kill lands between two of them
    engine.cfg.sync_timeout_s = 20
    send = engine._send_bucket

    def send_then_kill(bucket):
        if bucket.index == 2:
            os.kill(engine.engine_pid(), signal.SIGKILL)
        return send(bucket)

    engine.syncer.send_bucket = send_then_kill
    checks.check_fails_within(lambda: engine.sync_weights(model), SyncError, 40, "vLLM")
