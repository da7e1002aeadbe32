"""The one generation interface the trainers see, whatever engine runs behind it.

The trainer calls ``engine.generate(prompt_ids, params)`` and, after each optimizer step,
``engine.sync_weights(model)``; it never branches on the engine kind. ``build_engine`` is the only place
that does, through a small registry: each kind registers its builder (``register_engine``) in the module
that implements it, and ``build_engine`` imports that module on first use (``_PROVIDERS``), so this file
imports no engine and fastrl without the vllm extra never imports vLLM.
"""

from __future__ import annotations

import abc
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

ENGINE_KINDS = ("hf", "vllm", "vllm_server")

# kind -> the module whose import registers its builder (kept as strings: importing them here is the circle
# this registry exists to avoid).
_PROVIDERS = {"hf": "fastrl.engine.hf", "vllm": "fastrl.engine.vllm", "vllm_server": "fastrl.engine.vllm"}
_BUILDERS: dict[str, Callable] = {}

# kv_cache_dtype values vLLM accepts; "auto" follows the model's dtype.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def register_engine(kind: str, builder: Callable | None = None):
    """Register ``builder(model, tokenizer, cfg) -> Engine`` for ``kind`` (usable as a decorator)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")

    def _register(fn: Callable) -> Callable:
        _BUILDERS[kind] = fn
        return fn

    return _register if builder is None else _register(builder)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, never a count here


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample each completion.

    The next token is drawn from ``softmax(filter(logits / temperature))`` where ``filter`` keeps the
    ``top_k`` largest logits (0: all) and then the smallest set of tokens whose renormalised probability
    reaches ``top_p`` (1.0: all). ``temperature == 0`` is greedy decoding (argmax, top_k/top_p ignored).
    """

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1.0 turns it off."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 turns it off."})
    seed: int | None = field(
        default=None, metadata={"help": "Seed of the sampling generator; None draws from torch's global RNG."}
    )
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={"help": "Token ids that end a completion besides EOS (kept in the completion)."},
    )

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        # `not x >= 0` also refuses NaN; an infinite temperature would sample uniformly, hiding a typo.
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationOutput:
    """One entry per prompt, in prompt order.

    ``completion_ids[i]``: the generated tokens, no padding, ending with the EOS/stop token when one was
    generated. ``truncated[i]``: no EOS/stop token within ``max_new_tokens``.

    ``logprobs[i][t]`` is the log-probability of ``completion_ids[i][t]`` under the distribution it was
    sampled from, the one every engine (hf, vllm, vllm_server) reports. With ``z = logits / temperature``
    and ``K`` the tokens that top-k and then top-p keep (see ``SamplingParams``)::

        logprobs[i][t] = z[tok] - logsumexp(z[K])        (tok is always in K: it was sampled from K)

    so with ``top_k = 0, top_p = 1`` it is ``log_softmax(logits / temperature)[tok]``. Greedy decoding
    (``temperature == 0``) samples from no distribution; it reports ``log_softmax(logits)[tok]``, the
    temperature-1 distribution without filtering. This is the quantity GRPO's importance-sampling
    correction (``engine_logp``) needs: the behaviour policy's probability of the action it took.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


class Engine(abc.ABC):
    """A generation engine. Implementations: ``fastrl.engine.hf.HFEngine`` (embedded),
    ``fastrl.engine.vllm.VLLMEngine`` (vLLM in this process or its own) and
    ``fastrl.engine.vllm.VLLMServerEngine`` (a ``fastrl vllm-serve`` server over HTTP)."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        """Complete every prompt (a list of token ids) once; see ``GenerationOutput``."""

    @abc.abstractmethod
    def sync_weights(self, model: nn.Module) -> None:
        """Make the next ``generate`` use ``model``'s current weights."""

    def sleep(self) -> None:  # noqa: B027 - optional hook, a no-op for engines that hold no extra memory
        """Release the engine's own memory (KV cache, weight copy) while the trainer runs."""

    def wake_up(self) -> None:  # noqa: B027
        """Undo ``sleep`` before the next ``generate``."""

    def close(self) -> None:  # noqa: B027
        """Free everything the engine holds."""


@dataclass(kw_only=True)
class EngineConfig:
    """Which engine generates the rollouts, and its options."""

    kind: str = field(
        default="hf",
        metadata={"help": "hf (embedded, shares the training weights), vllm (colocated) or vllm_server."},
    )
    max_batch_size: int = field(default=64, metadata={"help": "Most prompts decoded together (hf)."})
    use_static_cache: bool = field(
        default=False, metadata={"help": "Preallocated KV cache of fixed shape (hf); needed by compile."}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the decode step (hf, with use_static_cache; CUDA graphs on GPUs)."},
    )
    compile_mode: str = field(
        default="reduce-overhead", metadata={"help": "torch.compile mode of the decode step."}
    )
    cache_length_multiple: int = field(
        default=256,
        metadata={"help": "Static cache lengths are rounded up to this, so few shapes get compiled (hf)."},
    )
    gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory a colocated vLLM may take (vllm)."}
    )
    kv_cache_dtype: str = field(default="auto", metadata={"help": "KV cache dtype (vllm)."})
    enable_sleep_mode: bool = field(
        default=True,
        metadata={
            "help": "Free vLLM's memory between generations (vllm; CUDA only, elsewhere off with a warning)."
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size (vllm)."})
    base_url: str | None = field(
        default=None, metadata={"help": "URL of a running `fastrl vllm-serve` (vllm_server)."}
    )
    # -- hf engine decode options (fastrl/engine/hf.py) --
    share_prompt_prefill: bool = field(
        default=True,
        metadata={
            "help": "Prefill each run of identical consecutive prompts once and copy its KV cache (hf)."
        },
    )
    check_every: int = field(
        default=8,
        metadata={"help": "Decode steps between host checks for finished rows (one device sync each) (hf)."},
    )
    compact_finished: bool = field(
        default=True, metadata={"help": "At each check, finished rows leave the decode batch (hf)."}
    )
    lean_decode: bool = field(
        default=True,
        metadata={
            "help": "Eager decode steps of Llama/Qwen2/Qwen3/Mistral models through fastrl's lean step and "
            "KV cache instead of the model's forward (hf; fastrl/engine/_lean.py)."
        },
    )
    compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend of the decode step (hf, with compile)."}
    )
    # --- vLLM engines (vllm, vllm_server): one block, so other engines' fields merge around it ---
    separate_process: bool = field(
        default=False,
        metadata={"help": "Run vLLM in its own process; weights cross through one shared buffer (vllm)."},
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion vLLM serves; None: the model's own."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": f"Generation weight dtype, one of {MODEL_DTYPES}; auto: the model's. vllm: vLLM's dtype; "
            "hf: another dtype generates from a copy of the weights in it (refreshed after each sync)."
        },
    )
    seed: int = field(default=0, metadata={"help": "vLLM's seed (sampling is also seeded per request)."})
    block_size: int | None = field(
        default=None,
        metadata={"help": "KV cache block size; None: vLLM's default (a multiple of 32 on CPU)."},
    )
    kv_cache_space_gb: float | None = field(
        default=None,
        metadata={"help": "KV cache size on the CPU in GiB (VLLM_CPU_KVCACHE_SPACE); None: vLLM's default."},
    )
    enforce_eager: bool = field(
        default=True, metadata={"help": "No CUDA graphs / torch.compile in vLLM (fast start-up)."}
    )
    sync_bucket_mb: int = field(
        default=512,
        metadata={"help": "Size of the flat weight-sync bucket in MiB; a larger tensor goes alone."},
    )
    verify_sync: bool = field(
        default=False, metadata={"help": "After each sync, the engine checks every tensor's checksum."}
    )
    sync_timeout_s: float = field(
        default=300.0, metadata={"help": "Most seconds one weight sync (or engine start) may take."}
    )
    request_timeout_s: float = field(
        default=600.0, metadata={"help": "Most seconds one generate call may take (vllm_server)."}
    )
    connect_timeout_s: float = field(
        default=10.0, metadata={"help": "Most seconds to reach base_url before giving up (vllm_server)."}
    )
    sync_backend: str = field(
        default="auto",
        metadata={
            "help": "vllm_server weight path: shm (same host), dist (torch.distributed group) or auto (shm "
            "when base_url's host is this machine)."
        },
    )
    # --- end of the vLLM block ---

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in ENGINE_KINDS:
            raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        for name in ("max_batch_size", "cache_length_multiple", "tensor_parallel_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("use_static_cache", "compile", "enable_sleep_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.compile and not self.use_static_cache:
            raise ValueError(
                "compile=True needs use_static_cache=True (a growing cache recompiles every step)"
            )
        if not isinstance(self.compile_mode, str) or not self.compile_mode:
            raise ValueError(f"compile_mode must be a torch.compile mode name, got {self.compile_mode!r}")
        if not _is_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not _is_int(self.check_every) or self.check_every <= 0:
            raise ValueError(f"check_every must be a positive int, got {self.check_every!r}")
        for name in ("share_prompt_prefill", "compact_finished", "lean_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(
                f"compile_backend must be a torch.compile backend name, got {self.compile_backend!r}"
            )
        if self.kind == "vllm_server" and not self.base_url:
            raise ValueError("kind='vllm_server' needs base_url (the server's http://host:port)")
        self._check_vllm_fields()

    def _check_vllm_fields(self) -> None:
        for name in ("separate_process", "verify_sync", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("max_model_len", "block_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not _is_int(self.sync_bucket_mb) or self.sync_bucket_mb <= 0:
            raise ValueError(f"sync_bucket_mb must be a positive int (MiB), got {self.sync_bucket_mb!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("sync_timeout_s", "request_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.kv_cache_space_gb is not None and (
            not _is_number(self.kv_cache_space_gb) or not 0 < self.kv_cache_space_gb < math.inf
        ):
            raise ValueError(
                f"kv_cache_space_gb must be a positive number of GiB or None, got {self.kv_cache_space_gb!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.sync_backend not in ("auto", "shm", "dist"):
            raise ValueError(f"sync_backend must be auto, shm or dist, got {self.sync_backend!r}")
        if self.base_url is not None and (
            not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://"))
        ):
            raise ValueError(f"base_url must be an http(s)://host:port URL, got {self.base_url!r}")
        if self.separate_process and self.kind != "vllm":
            raise ValueError(f"separate_process applies to kind='vllm' only, got kind={self.kind!r}")


def build_engine(cfg: EngineConfig, model: nn.Module, tokenizer) -> Engine:
    """The engine of kind ``cfg.kind`` serving ``model`` (whose weights it generates with)."""
    if not isinstance(cfg, EngineConfig):
        raise ValueError(f"cfg must be an EngineConfig, got {type(cfg).__name__}")
    if cfg.kind not in _BUILDERS:
        importlib.import_module(_PROVIDERS[cfg.kind])  # registers the kind
    return _BUILDERS[cfg.kind](model, tokenizer, cfg)
