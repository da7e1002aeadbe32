"""GGUF checkpoints (llama.cpp's format) as a model source: dequantised once, cached as safetensors.

``ModelConfig(name_or_path=FOLDER_OR_HUB_REPO, gguf_file="x.Q4_1.gguf")``: transformers reads the GGUF
through the ``gguf`` package and dequantises every tensor (about 16 s for a 135M model on 2 CPU cores).
The loaded model still carries the GGUF quantiser (``model.hf_quantizer``, ``config.quantization_config``),
which makes ``save_pretrained`` refuse and TRL / PEFT treat it as a quantised, untrainable model; but its
weights are plain float tensors by then, so both markers are dropped (and one line says so).

Cache: the dequantised model and its tokenizer are written once with ``save_pretrained`` (safetensors) to
``$FASTRL_CACHE`` (default ``~/.cache/fastrl``) ``/gguf/<sha256 of the file>[:16]``, atomically (a hidden
temp folder renamed into place, so a killed run never leaves a half-written cache that a later run would
trust), then loaded from there like any Hugging Face folder: later loads skip the dequantisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "FASTRL_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastrl") / "gguf"


def resolve_gguf_path(name_or_path: str, gguf_file: str, *, revision: str | None = None) -> Path:
    """The local path of ``gguf_file``: inside the folder ``name_or_path``, or downloaded from the Hub repo
    ``name_or_path`` (``huggingface_hub``'s cache). ``ValueError`` when a local file does not exist."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise ValueError(
                f"model.gguf_file: no file {gguf_file!r} in {str(folder)!r} "
                f"(GGUF files there: {found or 'none'})"
            )
        return path
    # A Hub id is "name" or "owner/name"; anything else that is not a folder is a missing local path.
    if folder.exists() or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"model.name_or_path: {name_or_path!r} is not a folder (nor a Hub repo id)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    except Exception as err:  # offline, unknown repo or file: one line naming what was asked for
        raise OSError(
            f"model.gguf_file: cannot fetch {gguf_file!r} from the Hub repo {name_or_path!r}: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; ``ValueError`` when it is not a GGUF file or names an
    architecture transformers cannot dequantise."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"model.gguf_file: {str(path)!r} is not a GGUF file (no GGUF magic bytes)")
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as err:
        raise ValueError(
            f"model.gguf_file needs the gguf package (pip install gguf, or 'fastrl[smollm2]'): {err}"
        ) from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # a truncated or corrupted file
        raise ValueError(f"model.gguf_file: cannot read {str(path)!r}: {type(err).__name__}: {err}") from None
    # transformers reads "llama" GGUFs of Mistral models as mistral, both supported; the rest map 1:1.
    known = {a.replace("_", "").replace("-", "") for a in GGUF_SUPPORTED_ARCHITECTURES}
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("_", "").replace("-", "") not in known:
        raise ValueError(
            f"model.gguf_file: {path.name!r} holds a {arch!r} model, which transformers cannot dequantise "
            f"(supported GGUF architectures: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return arch


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def drop_quantization_marker(model) -> None:
    """Make a dequantised GGUF model an ordinary one: no quantiser, no ``quantization_config``."""
    model.hf_quantizer = None
    for name in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if name in vars(model):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def dequantise_to_folder(gguf_path: Path, out: Path, *, trust_remote_code: bool = False) -> Path:
    """Dequantise ``gguf_path`` (fp32) with its tokenizer into the Hugging Face folder ``out``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (ValueError, NotImplementedError, KeyError) as err:  # e.g. a tensor type gguf cannot dequantise
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = f"model.gguf_file: transformers cannot dequantise {name!r} ({arch}): {line}"
        raise ValueError(msg) from None
    drop_quantization_marker(model)
    print(
        f"fastrl: {name} ({arch}) dequantised to float32; its GGUF quantisation marker is dropped, so it "
        f"trains and exports as an ordinary model (cached in {out})",
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, out)  # atomic; fails if another process filled the cache first
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_source(cfg):
    """``cfg`` (a ``ModelConfig`` with ``gguf_file``) turned into one that loads the dequantised cache
    folder: ``name_or_path`` the folder, ``gguf_file`` and ``revision`` None, ``torch_dtype`` 'auto' read as
    float32 (what the dequantisation gives). The tokenizer comes from the GGUF unless
    ``tokenizer_name_or_path`` names another."""
    path = resolve_gguf_path(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision)
    gguf_architecture(path)  # fail in a line, before hashing or loading anything
    out = cache_root() / file_digest(path)[:16]
    if not (out / "config.json").is_file():
        dequantise_to_folder(path, out, trust_remote_code=cfg.trust_remote_code)
    dtype = "float32" if cfg.torch_dtype == "auto" else cfg.torch_dtype
    return dataclasses.replace(cfg, name_or_path=str(out), gguf_file=None, revision=None, torch_dtype=dtype)
