"""Is a model or dataset name a local path or a Hugging Face Hub id, is a Hub id cached, is the Hub reachable.

Standard library only, so the CLI can check its inputs before importing torch or transformers. Why it is
needed: with no network, ``from_pretrained`` and ``load_dataset`` retry for about a minute before failing
on a name that is not cached, and take minutes even for a cached one (each file's HEAD request is retried);
a path that was meant to be local but is mistyped goes the same way, as a Hub id. So:

- a name that *looks* local (absolute, ``./``, ``../``, ``~``, a data-file suffix, or not a valid Hub id)
  and does not exist is reported as missing at once;
- a Hub id is looked up in the cache; when the Hub cannot be reached (one TCP connection with a 3 s
  timeout, or ``HF_HUB_OFFLINE=1``) an uncached id is an error at once, and a cached one is loaded in
  offline mode (``go_offline``), which reads the cache without any request.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

# Hugging Face's own rule for repo ids (huggingface_hub.utils.validate_repo_id): "name" or "namespace/name",
# letters, digits, "-", "_", "."; no "--" or ".." and at most 96 characters.
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".tsv", ".gz", ".zst")
MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def is_hub_id(name: str) -> bool:
    return (
        bool(_REPO_ID.match(name))
        and "--" not in name
        and ".." not in name
        and len(name) <= 96
        and not name.startswith((".", "-"))
        and not name.endswith(".")
    )


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True for a name a user meant as a path: absolute, ``./``/``../``/``~`` relative, ending in one of
    ``suffixes``, or one that cannot be a Hub id (e.g. ``data/train/x``)."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name) or "\\" in name:
        return True
    if suffixes and name.lower().endswith(suffixes):
        return True
    return not is_hub_id(name)


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dirs(kind: str) -> list[Path]:
    home = Path(os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()).expanduser()
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    dirs = [Path(hub).expanduser()]
    if kind == "dataset":
        dirs.append(Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser())
    return dirs


def in_cache(repo_id: str, kind: str) -> bool:
    """Whether the Hub cache holds a snapshot of ``repo_id`` (a model or a dataset), or ``datasets``' own
    cache holds a prepared copy of it."""
    hub, *rest = _cache_dirs(kind)
    snapshots = hub / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    # datasets' prepared cache: <HF_DATASETS_CACHE>/<namespace>___<name>/
    return any((d / repo_id.replace("/", "___")).is_dir() for d in rest)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (``HF_HUB_OFFLINE`` set, or the connection failed), or None."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the library goes through the proxy; a direct probe would say nothing
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read only their caches: the environment for modules
    not imported yet, the flags of those already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True


def check_hub_id(key: str, name: str, kind: str) -> None:
    """For a Hub id: nothing when the Hub is reachable; offline mode when it is not but ``name`` is cached;
    a ``ValueError`` naming ``key`` otherwise (instead of a minute of retries)."""
    why = hub_unreachable()
    if why is None:
        return
    if in_cache(name, kind):
        go_offline()
        return
    where = ", ".join(str(d) for d in _cache_dirs(kind))
    raise ValueError(
        f"{key} {name!r} is not a local path and not in the Hugging Face cache ({where}), and the Hub is "
        f"unavailable: {why}; give a local path or download it first"
    )


def missing_path(key: str, name: str) -> ValueError:
    return ValueError(f"{key} {name!r}: no such file or folder")
