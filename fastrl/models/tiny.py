"""Tiny random-init causal LMs and a character-level tokenizer, built locally (no downloads).

Tests, demos and benchmarks across fastrl use these instead of a hub checkpoint. The models are real
Hugging Face architectures (Qwen2 or Llama), so everything that loads a hub model (``from_pretrained``,
PEFT, ``generate``, vLLM) also loads them; ``head_dim`` is kept at 64 or more because vLLM's attention
backends do not support smaller heads.

The tokenizer maps every character to one token. Its special tokens follow the ChatML layout::

    <|pad|>  padding            <|bos|>  beginning of text (never added automatically)
    <|im_end|>  end of a turn, also the EOS token (generation stops there)
    <|im_start|>  start of a turn    <|unk|>  declared for the tokenizer API; never produced

and its chat template renders ``[{"role": r, "content": c}, ...]`` as
``<|im_start|>{r}\\n{c}<|im_end|>\\n`` per message, plus ``<|im_start|>assistant\\n`` when
``add_generation_prompt=True``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, BOS, EOS, IM_START, UNK = "<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, UNK)

# Letters, digits, punctuation, space and newline: enough for arithmetic prompts and short words.
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + " \t\n"

# The chat template needs the role names and the newline to be in the alphabet.
_TEMPLATE_CHARS = "systemuserassistant\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = ("qwen2", "llama")


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the ``ByteLevel`` alphabet): printable bytes map
    to themselves, the rest (space, newline, controls, high bytes) to code points from 256 upwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast``: ids 0-4 are the special tokens (see the module
    docstring), then one id per distinct UTF-8 byte of ``chars`` (plus the chat template's characters) in
    order of first appearance, so an ASCII character is exactly one token. Decoding concatenates.

    Built as a byte-level BPE without merges, the same pipeline ``Qwen2Tokenizer`` rebuilds from
    ``tokenizer.json``; so ``AutoTokenizer`` (which forces that class for ``model_type="qwen2"``), the
    generic backend (Llama) and vLLM all tokenize identically. Characters outside ``chars`` are dropped
    (the BPE has no unknown token, as in Qwen2).
    """
    if not isinstance(chars, str) or not chars:
        raise ValueError(f"chars must be a non-empty string, got {chars!r}")
    table = _byte_symbols()
    symbols = [table[b] for b in dict.fromkeys((chars + _TEMPLATE_CHARS).encode("utf-8"))]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 1,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A random-init causal LM of architecture ``arch`` whose vocabulary is exactly ``len(tokenizer)``.

    ``init_std`` is the normal init's standard deviation (``initializer_range``); a larger value gives more
    peaked next-token distributions. The init is a pure function of ``seed`` (the global RNG is left
    untouched). ``hidden_size / num_heads`` must be an integer >= 64 (vLLM's smallest head size).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % num_heads or hidden_size // num_heads < 64:
        raise ValueError(
            f"hidden_size / num_heads must be an integer >= 64 (head_dim), got {hidden_size}/{num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny(
    directory: str | os.PathLike,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    chars: str = DEFAULT_CHARS,
    **model_kwargs,
) -> Path:
    """Write a tiny model and its tokenizer to ``directory`` in Hugging Face format and return the path.

    Builds what is not given: ``tokenizer`` from ``chars``, ``model`` with ``build_tiny_model(tokenizer,
    **model_kwargs)``. The result loads with ``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` or
    ``fastrl.models.load_model_and_tokenizer``.
    """
    if model is not None and model_kwargs:
        raise ValueError(f"model_kwargs {sorted(model_kwargs)} only apply when model is None")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(chars) if tokenizer is None else tokenizer
    model = build_tiny_model(tokenizer, **model_kwargs) if model is None else model
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"model vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than the "
            f"tokenizer's ({len(tokenizer)})"
        )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
