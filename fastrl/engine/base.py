"""The one generation interface the trainers see, whatever engine runs behind it.

The trainer calls ``engine.generate(prompt_ids, params)`` and, after each optimizer step,
``engine.sync_weights(model)``; it never branches on the engine kind. ``build_engine`` is the only place
that does.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

from torch import nn

ENGINE_KINDS = ("hf", "vllm", "vllm_server")
# The one wording of "no vLLM yet", shared by `--engine.kind vllm`/`vllm_server` and `fastrl vllm-serve`.
VLLM_UNAVAILABLE = (
    "the vLLM engines and `fastrl vllm-serve` are not in this fastrl release yet (they will need the vllm "
    "extra, pip install 'fastrl[vllm]'); use engine.kind 'hf'"
)


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
    generated. ``logprobs[i][t]``: the log-probability of ``completion_ids[i][t]`` under the distribution
    it was sampled from, ``log softmax(filter(logits / temperature))[token]`` with top-k, then top-p
    applied and the kept tokens renormalised (``SamplingParams``); without top-k/top-p that is the full
    temperature-scaled softmax. Greedy (``temperature == 0``): ``log_softmax(logits)[token]`` at
    temperature 1, full vocabulary. ``truncated[i]``: no EOS/stop token within ``max_new_tokens``.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


class Engine(abc.ABC):
    """A generation engine. Implementations: ``fastrl.engine.hf.HFEngine`` (embedded)."""

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
        default=True, metadata={"help": "Free vLLM's memory between generations (vllm)."}
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
    compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend of the decode step (hf, with compile)."}
    )

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
        for name in ("share_prompt_prefill", "compact_finished"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(
                f"compile_backend must be a torch.compile backend name, got {self.compile_backend!r}"
            )
        if self.kind == "vllm_server" and not self.base_url:
            raise ValueError("kind='vllm_server' needs base_url (the server's http://host:port)")


def build_engine(cfg: EngineConfig, model: nn.Module, tokenizer) -> Engine:
    """The engine of kind ``cfg.kind`` serving ``model`` (whose weights it generates with)."""
    if not isinstance(cfg, EngineConfig):
        raise ValueError(f"cfg must be an EngineConfig, got {type(cfg).__name__}")
    if cfg.kind == "hf":
        from fastrl.engine.hf import HFEngine

        return HFEngine(model, tokenizer, cfg)
    raise ValueError(f"engine.kind {cfg.kind!r}: {VLLM_UNAVAILABLE}")
