"""Load a Hugging Face causal LM and its tokenizer from a hub name or a local directory."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = field(
        default="", metadata={"help": "Hub model id or local directory with config, weights and tokenizer."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Parameter dtype: auto (as saved in the config), float32, bfloat16 or float16."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel: sdpa, eager, or flash_attention_2 (needs the flash-attn package)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code shipped with the checkpoint to run."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub branch, tag or commit to load; None for the default branch."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Load the tokenizer from here instead of name_or_path."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A .gguf file in the folder or Hub repo name_or_path: dequantised (cached) and trained "
            "as an ordinary model (needs the gguf package)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each decoder layer's activations in the backward (non-reentrant)."},
    )

    def __post_init__(self) -> None:
        self.validate(need_path=False)

    def validate(self, *, need_path: bool = True) -> None:
        """Raise ``ValueError`` on an unknown option (and on an empty ``name_or_path`` if ``need_path``)."""
        if not isinstance(self.name_or_path, str) or (need_path and not self.name_or_path):
            raise ValueError(f"name_or_path must be a non-empty string, got {self.name_or_path!r}")
        for name in ("tokenizer_name_or_path", "revision", "gguf_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        for name in ("trust_remote_code", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # isinstance first: an unhashable value (a list from YAML) would make `in` raise TypeError.
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {tuple(DTYPES)}, got {self.torch_dtype!r}")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"gguf_file must name a .gguf file, got {self.gguf_file!r}")
        attn = self.attn_implementation
        if not isinstance(attn, str) or attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )


def _check_attention(cfg: ModelConfig, device: torch.device) -> None:
    if cfg.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn); "
            "use 'sdpa' otherwise"
        )
    if device.type != "cuda":
        raise ValueError(f"attn_implementation='flash_attention_2' needs a CUDA device, got {device}")
    if cfg.torch_dtype == "float32":
        raise ValueError("attn_implementation='flash_attention_2' needs torch_dtype bfloat16 or float16")


def check_sources(cfg: ModelConfig) -> None:
    """A missing local path, a folder without config/weights/tokenizer files, or an uncached Hub id while
    the Hub is unreachable: ``ValueError`` at once instead of a Hub lookup with a minute of retries."""
    from fastrl.models.files import check_model_source

    check_model_source(cfg.name_or_path, cfg.tokenizer_name_or_path)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token (the EOS token when it has none) and left padding for generation."""
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer_name_or_path or cfg.name_or_path,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {cfg.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(
    cfg: ModelConfig, *, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``cfg.name_or_path`` onto ``device`` in train mode.

    The model's ``generation_config.pad_token_id`` is set to the tokenizer's pad token. With
    ``gradient_checkpointing`` the decoder layers recompute activations in the backward and ``use_cache``
    is switched off in the config (generation passes ``use_cache=True`` explicitly).
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.gguf_file is not None:  # the dequantised safetensors folder stands in for the GGUF
        from fastrl.models.gguf import gguf_source

        cfg = gguf_source(cfg)
    check_sources(cfg)
    device = torch.device(device)
    _check_attention(cfg, device)
    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=DTYPES[cfg.torch_dtype],
        attn_implementation=cfg.attn_implementation,
    )
    model.to(device)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model, tokenizer
