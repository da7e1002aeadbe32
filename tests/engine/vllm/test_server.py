"""engine.kind=vllm_server: `fastrl vllm-serve` on 127.0.0.1 (a free port), generation over HTTP, weights
through shared memory (same host) and through a torch.distributed gloo group (the remote path, run here
on one host). Faults: an unreachable base_url and a server killed mid-sync fail clearly, within a
timeout. The server is started once for the module and killed at the end, whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from fastrl.engine import EngineConfig, build_engine  # noqa: E402
from fastrl.engine.vllm.client import ServerError  # noqa: E402

from . import checks  # noqa: E402

pytestmark = pytest.mark.vllm
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(vllm_tiny_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "fastrl.cli", "vllm-serve", "--model", vllm_tiny_dir, "--port", str(port),
           "--kv-cache-space-gb", "1"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    tail = log.read_text()[-3000:]
                    raise RuntimeError(f"vllm-serve not healthy in {START_TIMEOUT_S} s:\n{tail}") from None
                time.sleep(1)
        yield url, proc, vllm_tiny_dir
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


@pytest.fixture(scope="module")
def engine(server, vllm_tiny_dir):
    model, tok = checks.load(vllm_tiny_dir)
    eng = build_engine(EngineConfig(kind="vllm_server", base_url=server[0], sync_timeout_s=60), model, tok)
    yield eng
    eng.close()


def test_unreachable_base_url_fails_fast(vllm_tiny_dir):
    model, tok = checks.load(vllm_tiny_dir)
    cfg = EngineConfig(kind="vllm_server", base_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=3)
    checks.check_fails_within(lambda: build_engine(cfg, model, tok), ServerError, 10, "unreachable")


def test_same_host_uses_shared_memory(engine):
    assert engine.backend == "shm"


@pytest.mark.parametrize("case", ["t1", "t07_topk_topp"])
def test_logprobs_match_the_trainer_after_a_step(engine, vllm_tiny_dir, case):
    checks.check_logprobs_after_step(engine, vllm_tiny_dir, case)


def test_small_buckets(engine, vllm_tiny_dir):
    checks.check_small_buckets(engine, vllm_tiny_dir)


def test_lora_sync_leaves_the_trainer_unchanged(engine, vllm_tiny_dir):
    checks.check_lora_sync(engine, vllm_tiny_dir)


def test_unknown_names_are_refused(engine, vllm_tiny_dir):
    checks.check_unknown_names_refused(engine, vllm_tiny_dir)


def test_torch_distributed_path(server, vllm_tiny_dir):
    """sync_backend=dist: buckets broadcast over a two-rank gloo group instead of shared memory."""
    model, tok = checks.load(vllm_tiny_dir)
    cfg = EngineConfig(kind="vllm_server", base_url=server[0], sync_backend="dist", verify_sync=True)
    eng = build_engine(cfg, model, tok)
    try:
        eng.syncer.bucket_bytes = 8192
        checks.check_logprobs_after_step(eng, vllm_tiny_dir, "t07_topk_topp")
        assert eng.last_sync.n_buckets > 5
    finally:
        eng.close()


def test_fsdp2_two_ranks_sync_into_the_server(server, tmp_path):
    """FSDP2 on 2 gloo ranks: full tensors gathered one at a time, sent by rank 0 into the server."""
    out = tmp_path / "err.txt"
    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.engine.vllm.fsdp_worker", server[0], server[2], str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    err = float(out.read_text())
    print(f"fsdp2 -> server: max |engine - trainer| log-prob = {err:.3g}")
    assert err < checks.TOL, err


def test_grpo_reward_rises(server, vllm_tiny_dir, tmp_path):
    from fastrl.engine import EngineConfig
    from tests.engine.vllm.grpo_run import run_and_check

    run_and_check(EngineConfig(kind="vllm_server", base_url=server[0]), vllm_tiny_dir, tmp_path)


def test_server_killed_mid_sync(engine, server, vllm_tiny_dir):
    model, _ = checks.load(vllm_tiny_dir)
    engine.syncer.bucket_bytes = 8192
    engine.cfg.sync_timeout_s = 20
    send = engine._send_bucket
    proc = server[1]

    def send_then_kill(bucket):
        if bucket.index == 2:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        return send(bucket)

    engine.syncer.send_bucket = send_then_kill
    # The first failure (a bucket RPC) is the one raised, not the /resume after it.
    checks.check_fails_within(lambda: engine.sync_weights(model), ServerError, 40, "/collective_rpc")
