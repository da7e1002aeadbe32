"""Training checkpoints: atomic save, exact resume, rotation; Hugging Face export (``export.py``).

A checkpoint is a directory (by convention ``<output_dir>/checkpoint-<step>``, see
:func:`checkpoint_path`) holding::

    model.safetensors           full weights (or adapter_model.safetensors + adapter_config.json when
                                adapter_only: only the PEFT adapter, in PEFT's own format)
    optimizer.pt, scheduler.pt  state dicts (optimizer keyed by parameter name), when given
    dcp/                        instead of model.safetensors and optimizer.pt in the sharded format:
                                each rank's shards of both (``__<rank>_0.distcp``) and DCP's
                                ``.metadata``; loads at any world size (``_sharded.py``)
    trainer_state.json          the trainer's ``state`` (step, data position, ...; JSON)
    rng_rank<r>.pt              python / numpy / torch CPU / CUDA generator states of each rank
    COMPLETE                    written last; JSON with the format facts load needs and the size and
                                CRC-32 of every other file, verified on load (a truncated or damaged
                                file is named in the error, never loaded)

Atomicity: everything is written into a hidden sibling ``.<name>.tmp``, the ``COMPLETE`` marker last,
then the directory is renamed into place (``os.replace`` of a directory is atomic on POSIX). An existing
checkpoint of the same name is first moved aside (``.<name>.old``) and deleted only after the new one is
in place. Files are fsynced before the marker is written. So an interrupted save leaves the previous
checkpoints intact, and :func:`latest_checkpoint` only ever returns directories that carry ``COMPLETE``.
The debris of a save killed outright (SIGKILL, power loss: a ``.checkpoint-<N>.tmp`` or ``.old``) is
removed by the next save into the folder or by :func:`clean_debris`, which the trainers call on resume;
a ``.old`` whose new copy never arrived is moved back into place.
(Overwriting a name in place, which the trainers never do, has one window between the two renames
where the old copy sits under the hidden ``.old`` name.)

Under FSDP2 every rank must call :func:`save_checkpoint` / :func:`load_checkpoint`. In the full format the
state dicts are gathered to rank 0, on the CPU (a 7B model with AdamW: ~84 GB there), and broadcast back
on load; in the sharded format every rank writes and reads only its own shards. Each rank writes its own
RNG file, and the directory must be on a file system all ranks share. The format a checkpoint was
written in is recorded in ``COMPLETE``: load reads either, whatever the current setting.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastrl.distributed import _state_dict as sd
from fastrl.distributed.env import barrier, dist_info, is_distributed
from fastrl.distributed.export import export_hf

__all__ = [
    "checkpoint_path",
    "clean_debris",
    "export_hf",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 2  # 2: COMPLETE lists every file's size and CRC-32
_NAME_RE = re.compile(r"^checkpoint-(\d+)$")
_DEBRIS_RE = re.compile(r"^\.(checkpoint-\d+)\.(tmp|old)$")
_CHUNK = 8 << 20


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``<output_dir>/checkpoint-<step>``: the name :func:`latest_checkpoint` and rotation recognise."""
    return Path(output_dir) / f"checkpoint-{int(step)}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


FORMATS = ("full", "sharded")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    state: dict,
    adapter_only: bool = False,
    format: str = "full",
) -> Path:
    """Write a complete checkpoint to ``path`` atomically (see the module docstring); returns ``path``.

    ``state`` must be JSON-serialisable. ``adapter_only`` (PEFT models only) stores just the adapter
    weights (always in the full format: an adapter is small). ``format``: ``"full"`` (weights gathered to
    rank 0 into ``model.safetensors``, optimizer into ``optimizer.pt``) or ``"sharded"`` (every rank
    writes its own shards with ``torch.distributed.checkpoint`` into ``dcp/``; see ``_sharded.py``).
    Collective under a process group.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    try:
        state_json = json.dumps(state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state must be JSON-serialisable: {e}") from e
    if adapter_only and not sd.is_peft(model):
        raise ValueError("adapter_only=True needs a PEFT-wrapped model (peft.PeftModel)")
    sharded = format == "sharded" and not adapter_only
    rank, main = dist_info().rank, dist_info().is_main
    tmp = path.parent / f".{path.name}.tmp"

    def fresh_tmp() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(path.parent)  # of saves killed outright, any step
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save
        tmp.mkdir()

    if sharded:
        if main:
            fresh_tmp()
        barrier()  # the folder exists before any rank writes into it
        try:
            from fastrl.distributed._sharded import save_sharded

            save_sharded(tmp, model, optimizer)  # collective: each rank writes its shards
            if main:
                if scheduler is not None:
                    torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
                (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        # Collectives first, on every rank; only rank 0 gets the tensors.
        full = sd.full_model_state_dict(model)
        optim_state = sd.full_optimizer_state_dict(model, optimizer) if optimizer is not None else None
        if main:
            try:
                fresh_tmp()
                if adapter_only:
                    adapter, _ = sd.adapter_state_dict(model, full)
                    save_file(
                        sd.untie_for_safetensors(adapter), tmp / ADAPTER_FILE, metadata={"format": "pt"}
                    )
                    model.peft_config[sd.active_adapter(model)].save_pretrained(str(tmp))
                else:
                    save_file(sd.untie_for_safetensors(full), tmp / MODEL_FILE, metadata={"format": "pt"})
                if optim_state is not None:
                    torch.save(optim_state, tmp / OPTIMIZER_FILE)
                if scheduler is not None:
                    torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
                (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                del full, optim_state
    barrier()
    torch.save(_rng_state(), tmp / _rng_file(rank))
    barrier()
    files = _file_table(tmp)  # collective: each rank checksums its share of the files
    if main:
        meta = {
            "format_version": FORMAT_VERSION,
            "format": "sharded" if sharded else "full",
            "adapter_only": adapter_only,
            "world_size": dist_info().world_size,
            "has_optimizer": optimizer is not None,
            "has_scheduler": scheduler is not None,
            "files": files,
        }
        _fsync_tree(tmp)  # the data must be on disk before the marker can claim it is
        (tmp / COMPLETE).write_text(json.dumps(meta), encoding="utf-8")
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    barrier()
    return path


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _shared_list(items: list) -> list:
    """Rank 0's ``items`` on every rank (a no-op without a process group)."""
    if not is_distributed():
        return items
    box = [items]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    out = [None] * dist_info().world_size
    torch.distributed.all_gather_object(out, value)
    return out


def _file_table(directory: Path) -> dict[str, list[int]]:
    """``{relative path: [size in bytes, CRC-32]}`` of every file under ``directory`` (but ``COMPLETE``).
    Collective under a process group: rank ``r`` reads files ``r, r + world, ...`` of rank 0's listing,
    so a sharded checkpoint is checksummed in parallel, not by rank 0 reading every shard."""
    names = _shared_list(
        sorted(
            f.relative_to(directory).as_posix()
            for f in directory.rglob("*")
            if f.is_file() and f.name != COMPLETE
        )
        if dist_info().is_main
        else []
    )
    info = dist_info()
    mine = {
        n: [(directory / n).stat().st_size, _crc32(directory / n)]
        for n in names[info.rank :: info.world_size]
    }
    table: dict[str, list[int]] = {}
    for part in _gathered(mine):
        table.update(part)
    return {n: table[n] for n in names}


def _check_files(path: Path, meta: dict, rank: int, world: int) -> None:
    """Sizes of every listed file, CRC-32s of this rank's share (files ``rank, rank + world, ...``)."""
    for i, (rel, (size, crc)) in enumerate(sorted(meta.get("files", {}).items())):
        f = path / rel
        if not f.is_file():
            raise ValueError(f"checkpoint {path} is damaged: {f} is missing")
        got = f.stat().st_size
        if got != size:
            raise ValueError(
                f"checkpoint {path} is damaged: {f} has {got} bytes, {COMPLETE} recorded {size} "
                "(truncated or overwritten); resume from an earlier checkpoint"
            )
        if i % world == rank and _crc32(f) != crc:
            raise ValueError(
                f"checkpoint {path} is damaged: {f} fails its CRC-32 check (contents changed after "
                "the save); resume from an earlier checkpoint"
            )


def _read_meta(path: Path) -> dict:
    if not is_complete(path):
        raise ValueError(f"path must be a complete checkpoint (with a {COMPLETE} marker), got {path}")
    try:
        return json.loads((path / COMPLETE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: its {COMPLETE} marker is not valid JSON ({e})") from e


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The ``COMPLETE`` metadata of ``path``, after checking every file it lists against its recorded
    size and CRC-32; ``ValueError`` naming the first file that is missing, truncated or damaged.
    Collective under a process group (each rank checksums a share of the files; every rank raises the
    same error). Checkpoints of format 1 (no file table) pass unchecked."""
    path = Path(path)
    info = dist_info()
    meta, error = None, None
    try:
        meta = _read_meta(path)
        _check_files(path, meta, info.rank, info.world_size)
    except ValueError as e:
        error = str(e)
    errors = [e for e in _gathered(error) if e is not None]
    if errors:
        raise ValueError(errors[0])
    return meta


def read_state(path: str | os.PathLike) -> dict:
    """The trainer state saved in checkpoint ``path`` (``trainer_state.json``), without loading any
    tensor: what a trainer checks before it resumes (step, who wrote it)."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"path must be a complete checkpoint (with a {COMPLETE} marker), got {path}")
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def clean_debris(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what saves killed outright left in ``output_dir`` (rank 0 only; returns what it removed):
    every ``.checkpoint-<N>.tmp``, and every ``.checkpoint-<N>.old`` whose ``checkpoint-<N>`` is in
    place. A complete ``.old`` without its ``checkpoint-<N>`` (killed between the two renames of an
    overwrite) is the only copy and is moved back instead."""
    output_dir = Path(output_dir)
    if not dist_info().is_main or not output_dir.is_dir():
        return []
    removed = []
    for child in sorted(output_dir.iterdir()):
        m = _DEBRIS_RE.match(child.name)
        if not m or not child.is_dir():
            continue
        target = output_dir / m.group(1)
        if m.group(2) == "old" and not target.exists() and is_complete(child):
            os.replace(child, target)
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    return removed


def _fsync_tree(directory: Path) -> None:
    """Flush every file in ``directory`` and the directory entry itself to stable storage."""
    for f in directory.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed only afterwards."""
    old = dst.parent / f".{dst.name}.old"
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from ``path``; returns the trainer state.

    ``ValueError`` if ``path`` is not a complete checkpoint or lacks a requested part. Collective under
    a process group; ``model`` must be wrapped (FSDP, AC, PEFT) as it is for training.
    """
    path = Path(path)
    meta = verify_checkpoint(path)  # collective: the ranks share the checksumming
    if optimizer is not None and not meta["has_optimizer"]:
        raise ValueError(f"optimizer given but checkpoint {path} holds no optimizer state")
    if scheduler is not None and not meta["has_scheduler"]:
        raise ValueError(f"scheduler given but checkpoint {path} holds no scheduler state")
    main = dist_info().is_main

    if meta.get("format", "full") == "sharded":
        from fastrl.distributed._sharded import load_sharded

        load_sharded(path, model, optimizer)  # model and optimizer, resharded to this run's layout
        optimizer = None  # done
    elif meta["adapter_only"]:
        if not sd.is_peft(model):
            raise ValueError(f"checkpoint {path} holds only adapter weights; model must be PEFT-wrapped")
        # Start from the model's own full weights and overwrite the adapter entries, so the load is a
        # strict full load that works the same under FSDP.
        full = sd.full_model_state_dict(model)
        if main:
            _, to_fqn = sd.adapter_state_dict(model, full)
            saved = load_file(path / ADAPTER_FILE)
            if set(saved) != set(to_fqn):
                raise ValueError(
                    f"adapter keys in {path} do not match the model's adapter: "
                    f"{sorted(set(saved) ^ set(to_fqn))[:5]}"
                )
            for key, t in saved.items():
                full[to_fqn[key]] = t
    else:
        full = load_file(path / MODEL_FILE) if main else {}
    if meta.get("format", "full") == "full":
        sd.load_full_model_state_dict(model, full)
        del full

    if optimizer is not None:
        optim_state = torch.load(path / OPTIMIZER_FILE, weights_only=True) if main else {}
        sd.load_full_optimizer_state_dict(model, optimizer, optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=False))
    rank = dist_info().rank
    rng_file = path / _rng_file(rank)
    if not rng_file.is_file():  # resumed on more ranks than saved: take rank 0's states
        rng_file = path / _rng_file(0)
    # Our own file, holding numpy's state tuple: not loadable with weights_only.
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def _steps(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _NAME_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-<step>`` directories in ``output_dir``, oldest (lowest step) first."""
    return [p for _, p in _steps(Path(output_dir)) if is_complete(p)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-<step>`` directory with the highest step, or ``None``."""
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (rank 0 only); returns the deleted paths.

    Incomplete directories older than the newest complete one are debris of interrupted saves and go
    too; newer incomplete ones may be a save in progress and stay. ``keep=0`` deletes every checkpoint.
    """
    if not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an integer >= 0, got {keep!r}")
    if not dist_info().is_main:
        return []
    steps = _steps(Path(output_dir))
    complete = [(s, p) for s, p in steps if is_complete(p)]
    keep_set = {p for _, p in complete[max(0, len(complete) - keep) :]} if keep else set()
    newest = complete[-1][0] if complete else -1
    deleted = []
    for step, p in steps:
        if p in keep_set or (not is_complete(p) and step > newest):
            continue
        shutil.rmtree(p)
        deleted.append(p)
    return deleted
