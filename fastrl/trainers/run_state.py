"""Which run a checkpoint belongs to: the identity a trainer records in every checkpoint, the checks
before a resume, and the guard against a fresh run writing into another run's folder.

Every checkpoint's ``trainer_state.json`` carries ``run``::

    {"trainer": "sft" | "dpo" | "grpo",
     "model": {"class": "Qwen2ForCausalLM", "num_parameters": N, "shapes_sha256": "..."},
     "config": {"model.name_or_path": ..., "dpo.beta": ..., ...},   # the fields that must match
     "fingerprint": sha256 of "config"}

A resume is refused (``ValueError`` naming the difference) when the trainer, the model's architecture or
parameter shapes, or any fingerprinted config field differs. Fingerprinted: every field of every config
section except those in :data:`MAY_CHANGE` (how long the run is, how it logs and saves, the device and
the FSDP / activation-checkpointing layout, the generation engine) and ``train``, of which only
``train.seed``, ``train.gradient_accumulation_steps`` and the global micro-batch
(``per_device_batch_size x world size``) count: the data order depends on exactly those, so the world
size may change on resume as long as the global batch stays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

# Fields (``section.field``; ``*.field``: in any section) that may differ between a checkpoint and the
# run resuming it. They change speed or bookkeeping, not the optimisation problem.
MAY_CHANGE = (
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.trust_remote_code",
    "*.chunk_size",
    "grpo.log_entropy",
    "data.eval_dataset",  # what is evaluated, not what is trained (data.eval_fraction is: it must match)
    "data.eval_split",
    "engine.*",
    "optim.fused",  # the same AdamW, another kernel
)
_RUN_FILES = ("metrics.jsonl",)


def _may_change(key: str) -> bool:
    section, name = key.split(".", 1)
    return any(p in (key, f"*.{name}", f"{section}.*") for p in MAY_CHANGE)


def config_fields(cfg, world_size: int) -> dict:
    """The fingerprinted ``section.field -> value`` of a run config (see the module docstring)."""
    out = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name == "train" or not dataclasses.is_dataclass(section):
            continue
        for key, value in dataclasses.asdict(section).items():
            if not _may_change(f"{f.name}.{key}"):
                out[f"{f.name}.{key}"] = value
    train = cfg.train
    out["train.seed"] = train.seed
    out["train.gradient_accumulation_steps"] = train.gradient_accumulation_steps
    out["train.global_micro_batch"] = train.per_device_batch_size * world_size
    return json.loads(json.dumps(out, default=str))  # what JSON gives back on load: lists, not tuples


def _param_name(name: str) -> str:
    # Wrappers that insert a level into the names (activation checkpointing, torch.compile) may differ
    # between the run that saved and the run that resumes.
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def model_identity(model) -> dict:
    """Architecture class, parameter count and a hash of the (global) parameter names and shapes."""
    from fastrl.distributed._layers import unwrap_peft

    h = hashlib.sha256()
    n = 0
    for name, p in model.named_parameters():
        shape = tuple(p.shape)  # a DTensor's shape is the global one: sharding does not change it
        h.update(f"{_param_name(name)}:{shape};".encode())
        n += p.numel()
    return {"class": type(unwrap_peft(model)).__name__, "num_parameters": n, "shapes_sha256": h.hexdigest()}


def run_identity(kind: str, cfg, model, world_size: int) -> dict:
    fields = config_fields(cfg, world_size)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {"trainer": kind, "model": model_identity(model), "config": fields, "fingerprint": digest}


def check_resume(saved: dict | None, current: dict | None, path, *, step: int, max_steps: int) -> None:
    """Refuse (``ValueError``) to resume checkpoint ``path`` at ``step`` into the run ``current``
    describes: another trainer, another model, a config that must match and does not, or a step past
    ``max_steps``. ``saved`` is the checkpoint's ``run`` record (``None``: written before runs recorded
    it; resumed with a warning); ``current`` ``None``: only the step is checked."""
    if step > max_steps:
        raise ValueError(
            f"checkpoint {path} is at step {step}, past train.max_steps={max_steps}: it belongs to a longer "
            f"run. To continue it, set train.max_steps above {step}; to start over in this folder, set "
            "train.overwrite_output_dir (deletes its checkpoints)"
        )
    if current is None:
        return
    if saved is None:
        warnings.warn(
            f"checkpoint {path} does not record which trainer, model and config wrote it; resuming unchecked",
            stacklevel=3,
        )
        return
    kind = current["trainer"]
    if saved["trainer"] != kind:
        raise ValueError(
            f"checkpoint {path} was written by `fastrl {saved['trainer']}`, not `fastrl {kind}`: a "
            f"checkpoint resumes only the trainer that wrote it. To start {kind} from that model, export it "
            "(its run's final/ folder) and pass it as model.name_or_path in a fresh train.output_dir"
        )
    a, b = saved["model"], current["model"]
    if a != b:
        raise ValueError(
            f"checkpoint {path} holds another model: {a['class']} with {a['num_parameters']} parameters "
            f"(shapes {a['shapes_sha256'][:12]}), this run has {b['class']} with {b['num_parameters']} "
            f"(shapes {b['shapes_sha256'][:12]})"
        )
    if saved["fingerprint"] != current["fingerprint"]:
        old, new = saved["config"], current["config"]
        diffs = [
            f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>")
        ]
        what = "; ".join(diffs) or "fingerprint differs"
        raise ValueError(
            f"checkpoint {path} was written with another config ({what}). "
            "These must match on resume; train.max_steps, logging, saving, the device, FSDP and activation "
            "checkpointing, and the engine may change. Start a fresh run for the new config"
        )


def preflight(train_cfg) -> None:
    """The checks that need no model, run before it loads: a fresh run into a folder with another run's
    checkpoints (without ``train.overwrite_output_dir``), a resume from a checkpoint past ``max_steps``."""
    from fastrl.distributed.checkpoint import latest_checkpoint, list_checkpoints, read_state

    out, resume = Path(train_cfg.output_dir), train_cfg.resume_from_checkpoint
    if not resume:
        existing = list_checkpoints(out)
        if existing and not train_cfg.overwrite_output_dir:
            prepare_output_dir(out, train_cfg, existing=existing, is_main=False)  # raises
        return
    ckpt = latest_checkpoint(out) if resume == "auto" else Path(resume)
    if ckpt is not None and train_cfg.max_steps is not None:  # None: from num_train_epochs, checked later
        check_resume(None, None, ckpt, step=int(read_state(ckpt)["step"]), max_steps=train_cfg.max_steps)


def prepare_output_dir(out: Path, train_cfg, *, existing: list[Path], is_main: bool) -> None:
    """The fresh-run guard: ``existing`` (the complete checkpoints in ``out``) must be empty unless
    ``train.overwrite_output_dir``, which deletes them (and the old run's metrics) first (rank 0)."""
    if not existing:
        return
    names = ", ".join(p.name for p in existing[-3:]) + (" ..." if len(existing) > 3 else "")
    if not train_cfg.overwrite_output_dir:
        raise ValueError(
            f"train.output_dir {str(out)!r} already holds checkpoints of another run ({names}). Resume it "
            "with train.resume_from_checkpoint=auto, start over with train.overwrite_output_dir=true "
            "(deletes them), or choose another train.output_dir"
        )
    if not is_main:
        return
    for p in out.iterdir():
        if p.is_dir() and (p.name.startswith("checkpoint-") or p.name.startswith(".checkpoint-")):
            shutil.rmtree(p)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    print(f"train.overwrite_output_dir: deleted the earlier run's checkpoints in {out} ({names})")
