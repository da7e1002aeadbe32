"""The vLLM engines' configuration, registry, server command line and unreachable-server error: none of it
needs vLLM installed (the engines themselves are tested in tests/engine/vllm/, in .venv-vllm)."""

from __future__ import annotations

import argparse
import socket
import time

import pytest

from fastrl.engine import EngineConfig, build_engine
from fastrl.engine.base import register_engine


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"sync_bucket_mb": 0}, "sync_bucket_mb"),
        ({"sync_bucket_mb": 1.5}, "sync_bucket_mb"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ({"dtype": "float64"}, "dtype"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"sync_timeout_s": float("inf")}, "sync_timeout_s"),
        ({"connect_timeout_s": -1}, "connect_timeout_s"),
        ({"kv_cache_space_gb": 0}, "kv_cache_space_gb"),
        ({"separate_process": "yes"}, "separate_process"),
        ({"sync_backend": "nccl"}, "sync_backend"),
        ({"kind": "vllm_server", "base_url": "127.0.0.1:8000"}, "base_url"),
        ({"kind": "vllm_server", "base_url": "http://h:1", "separate_process": True}, "separate_process"),
    ],
)
def test_bad_vllm_options(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**bad)


def test_registry():
    with pytest.raises(ValueError, match="kind"):
        register_engine("sglang", lambda *a: None)


def test_unreachable_base_url_is_a_clear_error_within_the_timeout():
    from fastrl.engine.vllm.client import ServerError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = EngineConfig(kind="vllm_server", base_url=f"http://127.0.0.1:{port}", connect_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="unreachable.*fastrl vllm-serve"):
        build_engine(cfg, None, None)
    assert time.monotonic() - t0 < 10


def _serve_args(tmp_path, **kw):
    from fastrl.engine.vllm.serve import build_parser

    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    argv = ["--model", str(tmp_path)]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


def test_vllm_serve_command(tmp_path):
    from fastrl.engine.vllm.serve import command, main

    argv, env = command(_serve_args(tmp_path, port=8123, kv_cache_space_gb=1), ["--max-num-seqs", "8"])
    joined = " ".join(argv)
    assert "vllm.entrypoints.openai.api_server" in joined
    assert "--worker-extension-cls fastrl.engine.vllm.worker.FastrlWorkerExtension" in joined
    assert "--logprobs-mode processed_logprobs" in joined and "--dtype float32" in joined
    assert argv[-2:] == ["--max-num-seqs", "8"] and "--port 8123" in joined
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="kv-cache-dtype"):
            command(_serve_args(tmp_path, kv_cache_dtype="bfloat16"), [])
        with pytest.raises(ValueError, match="block-size"):
            command(_serve_args(tmp_path, block_size=16), [])
    assert main(["--port", "1"]) == 2  # --model missing: argparse's message, status 2
    assert isinstance(_serve_args(tmp_path), argparse.Namespace)
