"""What ``fastrl sft|dpo|grpo`` checks before a model loads, so that a user's mistake costs seconds, not a
model load (or a minute of Hub retries), and is reported as one line naming the culprit.

Two stages:

1. ``check_sources(raw)``, on the raw YAML + overrides, with the standard library only (before torch is
   imported): ``model.name_or_path`` / ``model.tokenizer_name_or_path`` (``fastrl.models.files``),
   ``data.dataset`` (``fastrl.data.sources``: a missing path, an empty or malformed JSONL/JSON/CSV/parquet
   file with its line number, an uncached Hub id while the Hub is down), ``train.resume_from_checkpoint``
   and ``train.output_dir``.
2. ``check_run(command, cfg)``, on the typed run config: required keys, ``train.device`` (CUDA present),
   ``train.tensorboard`` (installed), the engine kind, GRPO's batch schedule and reward functions
   (resolved, and their parameters matched against the dataset's columns), SFT's formatting function; then
   the dataset is loaded and its columns checked. It returns the dataset (and GRPO's reward functions) so
   the run does not load them again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    """A path-like value as the user gave it; None for unset, null or not text (the typed stage says)."""
    if not isinstance(value, str) or not value or value.strip().lower() in ("null", "none", "~"):
        return None
    return value


def check_sources(raw: dict) -> None:
    """Stage 1 (see the module docstring): ``ValueError`` naming the key."""
    from fastrl.data.sources import check_dataset_source
    from fastrl.models.files import check_model_source

    model, data, train = _section(raw, "model"), _section(raw, "data"), _section(raw, "train")
    name = _text(model.get("name_or_path"))
    if name is not None:
        check_model_source(name, _text(model.get("tokenizer_name_or_path")))
    dataset = _text(data.get("dataset"))
    if dataset is not None:
        check_dataset_source(dataset)
    resume = _text(train.get("resume_from_checkpoint"))
    if resume is not None and resume != "auto" and not Path(resume).expanduser().exists():
        raise ValueError(f"train.resume_from_checkpoint {resume!r}: no such checkpoint folder")
    out = _text(train.get("output_dir"))
    if out is not None and Path(out).expanduser().is_file():
        raise ValueError(f"train.output_dir {out!r} is a file; it must be a folder (or not exist yet)")


def check_device(name: str) -> None:
    """``train.device``: 'auto', 'cpu', or 'cuda' / 'cuda:N' with such a device present."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(
            f"train.device {name!r}: no CUDA device is available (torch {torch.__version__}, {build}); "
            "use --train.device cpu or auto"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"train.device {name!r}: this machine has {count} CUDA device(s)")


def check_run(command: str, cfg, *, search: tuple[str | Path, ...] = ()) -> dict:
    """Stage 2 (see the module docstring). Returns the keyword arguments to pass to the run function
    (``dataset``, and ``reward_funcs`` for GRPO). ``search``: folders to look for user modules in besides
    the working folder (the config file's)."""
    from fastrl.data.loading import load_data, require_columns

    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path is required: a local model folder or a Hugging Face model id")
    if not cfg.data.dataset:
        raise ValueError(
            "data.dataset is required: a local .jsonl/.json/.csv/.parquet file or folder, or a Hub id"
        )
    check_device(cfg.train.device)
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.tensorboard needs the tensorboard package (pip install tensorboard)")
    out: dict = {}
    funcs: list = []
    if command == "grpo":
        funcs = _check_grpo(cfg, search)
        out["reward_funcs"] = funcs
    if command == "sft" and cfg.sft.formatting_func:
        from fastrl.rewards import resolve_reward

        spec = cfg.sft.formatting_func
        if ":" not in spec:
            raise ValueError(f"sft.formatting_func must be 'module:function', got {spec!r}")
        resolve_reward(spec, search=search)  # puts its folder on sys.path for the trainer's own lookup

    dataset = load_data(cfg.data)
    columns = list(dataset.column_names)
    if command == "sft" and not cfg.sft.formatting_func:  # the rule of fastrl.trainers.sft.tokenize_sft
        if "prompt" in columns or "completion" in columns:
            require_columns(dataset, ["prompt", "completion"], task="SFT")
        else:
            require_columns(dataset, [("messages", "text", "prompt")], task="SFT")
    elif command == "dpo":  # the rule of fastrl.trainers.dpo.tokenize_dpo
        implicit = "prompt" not in columns and "chosen" in columns
        require_columns(
            dataset, ["chosen", "rejected"] if implicit else ["prompt", "chosen", "rejected"], task="DPO"
        )
    elif command == "grpo":
        from fastrl.rewards import check_reward_signature

        require_columns(dataset, [cfg.data.prompt_column], task="GRPO")
        rest = [c for c in columns if c != cfg.data.prompt_column]
        for fn in funcs:
            check_reward_signature(fn, rest)
    out["dataset"] = dataset
    return out


def _check_grpo(cfg, search) -> list:
    from fastrl.rewards import resolve_reward
    from fastrl.trainers.grpo import schedule

    if cfg.engine.kind == "vllm" and importlib.util.find_spec("vllm") is None:
        # vllm_server is an HTTP client and needs no vLLM here; the in-process/own-process engine does.
        from fastrl.engine.vllm.common import INSTALL_HINT

        raise ValueError(f"engine.kind 'vllm': vLLM is not installed: {INSTALL_HINT}")
    schedule(cfg)  # generation_batch_size / steps_per_generation / num_generations agree
    if not cfg.grpo.reward_funcs:
        raise ValueError("grpo.reward_funcs must name at least one reward function")
    funcs = [resolve_reward(spec, search=search) for spec in cfg.grpo.reward_funcs]
    weights = cfg.grpo.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"grpo.reward_weights has {len(weights)} entries for {len(funcs)} reward functions")
    return funcs
