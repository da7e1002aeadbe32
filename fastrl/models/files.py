"""Checks of ``model.name_or_path`` / ``model.tokenizer_name_or_path`` that need neither torch nor
transformers (the CLI runs them before importing either; ``load_model_and_tokenizer`` runs them too).

A local folder must look like a Hugging Face model folder: ``config.json`` (or a PEFT adapter's
``adapter_config.json``), weights, and tokenizer files where the tokenizer is read from. A folder holding a
``.gguf`` file is left to transformers' GGUF loader. A missing local path, or a Hub id that is not cached
while the Hub is unreachable, is refused at once (``fastrl._hub``).
"""

from __future__ import annotations

from pathlib import Path

from fastrl._hub import MODEL_SUFFIXES, check_hub_id, looks_local, missing_path

# Any one of these lets AutoTokenizer build a tokenizer (fast tokenizer.json, or a slow tokenizer's vocab).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def check_model_source(
    name_or_path: str, tokenizer_name_or_path: str | None = None, *, prefix: str = "model."
) -> None:
    """Raise ``ValueError`` naming the key (``model.name_or_path``...) when the model or its tokenizer
    cannot be found; see the module docstring."""
    model = _check_one(f"{prefix}name_or_path", name_or_path)
    if model is not None and not any(model.glob("*.gguf")):
        if not (model / "config.json").is_file() and not (model / "adapter_config.json").is_file():
            raise ValueError(
                f"{prefix}name_or_path {name_or_path!r} is a folder without config.json: not a Hugging Face "
                "model folder (save one with save_pretrained)"
            )
        if not (model / "adapter_config.json").is_file() and not any(
            any(model.glob(p)) for p in WEIGHT_PATTERNS
        ):
            raise ValueError(
                f"{prefix}name_or_path {name_or_path!r} has no weights (model.safetensors or "
                "pytorch_model.bin)"
            )
    if tokenizer_name_or_path is not None:
        tok, key, name = (
            _check_one(f"{prefix}tokenizer_name_or_path", tokenizer_name_or_path),
            "tokenizer_name_or_path",
            tokenizer_name_or_path,
        )
    else:
        tok, key, name = model, "name_or_path", name_or_path
    if (
        tok is not None
        and not any(tok.glob("*.gguf"))
        and not any((tok / f).is_file() for f in TOKENIZER_FILES)
    ):
        hint = (
            ""
            if tokenizer_name_or_path is not None
            else f"; set {prefix}tokenizer_name_or_path to a folder or Hub id that has them"
        )
        raise ValueError(
            f"{prefix}{key} {name!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            f"tokenizer.model or vocab.json){hint}"
        )


def _check_one(key: str, name: str) -> Path | None:
    """The local folder ``name`` names, None for a Hub id (checked against the cache)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{key} must be a local folder or a Hub model id, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise ValueError(
            f"{key} {name!r} is a file; give the model's folder (config.json, weights, tokenizer)"
        )
    if looks_local(name, MODEL_SUFFIXES):
        raise missing_path(key, name)
    check_hub_id(key, name, "model")
    return None
