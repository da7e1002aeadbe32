"""``fastrl``: the command line.

    fastrl sft  --config run.yaml [--section.key value ...]   supervised fine-tuning
    fastrl dpo  --config run.yaml [--section.key value ...]   direct preference optimisation
    fastrl grpo --config run.yaml [--section.key value ...]   GRPO
    fastrl bench [--suite S ...] [--gpu] [--out DIR]         the benchmark suite
    fastrl demo [...]                                        SFT -> GRPO -> DPO of a tiny local model
    fastrl demo --model smollm2 [...]                        GRPO on SmolLM2-135M-Instruct (CPU)
    fastrl vllm-serve                                        (needs the vllm extra)

A training command maps its YAML file and overrides onto the trainer's run-config dataclass
(``fastrl.config.load_config``); ``fastrl <cmd> --help`` lists every key with its help text. The trainers
are imported only when their command runs. Under torchrun every rank parses the same arguments; only
rank 0 prints. Exit status: 0 done, 2 bad arguments or config, 1 the run stopped on a user error (a
``ValueError`` or ``OSError``: one line on stderr, no traceback; ``FASTRL_TRACEBACK=1`` shows it).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from fastrl.config import config_help, load_config, save_config, to_dict

# command -> (module, run-config class, run function); all imported lazily.
TRAINERS: dict[str, tuple[str, str, str]] = {
    "sft": ("fastrl.trainers.sft", "SFTRunConfig", "run_sft"),
    "dpo": ("fastrl.trainers.dpo", "DPORunConfig", "run_dpo"),
    "grpo": ("fastrl.trainers.grpo", "GRPORunConfig", "run_grpo"),
}
OTHER = {
    "bench": "run the benchmark suite (fastrl bench --help)",
    "demo": "SFT, then GRPO, then DPO of a tiny locally built model (CPU, no downloads); --model smollm2: "
    "GRPO on SmolLM2-135M-Instruct (the smollm2 extra)",
    "vllm-serve": "serve the policy with vLLM for the vllm_server engine (needs the vllm extra)",
}


def usage() -> str:
    lines = ["usage: fastrl <command> [options]", "", "commands:"]
    for name, (module, cls, _) in TRAINERS.items():
        lines.append(f"  {name:<11} train with {module}.{cls} (--config run.yaml, --section.key value ...)")
    lines += [f"  {name:<11} {text}" for name, text in OTHER.items()]
    lines += ["", "fastrl <command> --help lists the command's options."]
    return "\n".join(lines)


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(text: str, *, err: bool = False) -> None:
    if _rank0() or err:
        print(text, file=sys.stderr if err else sys.stdout)


def trainer_help(command: str, cfg_cls: type) -> str:
    return "\n".join(
        [
            f"usage: fastrl {command} [--config run.yaml] [--section.key value ...] [--print-config]",
            "",
            "  --config PATH     a YAML file with the sections below (keys left out keep their defaults)",
            "  --print-config    print the resolved config as YAML and exit",
            "  --save-config P   also write the resolved config to P",
            "",
            "Options (override any YAML value):",
            config_help(cfg_cls),
        ]
    )


def _split_trainer_args(command: str, argv: list[str]) -> tuple[str | None, list[str], dict[str, object]]:
    """(config path, overrides, flags) from a training command's arguments."""
    config_path, overrides, flags = None, [], {"help": False, "print": False, "save": None}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            flags["help"] = True
        elif tok == "--print-config":
            flags["print"] = True
        elif tok in ("--config", "-c", "--save-config") or tok.startswith(("--config=", "--save-config=")):
            name, _, value = tok.partition("=")
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a path")
                i += 1
                value = argv[i]
            if name == "--save-config":
                flags["save"] = value
            else:
                config_path = value
        else:
            overrides.append(tok)
        i += 1
    return config_path, overrides, flags


def run_trainer(command: str, argv: list[str]) -> int:
    module_name, cls_name, fn_name = TRAINERS[command]
    module = importlib.import_module(module_name)
    cfg_cls, run = getattr(module, cls_name), getattr(module, fn_name)
    try:
        config_path, overrides, flags = _split_trainer_args(command, argv)
        if flags["help"]:
            _say(trainer_help(command, cfg_cls))
            return 0
        cfg = load_config(cfg_cls, config_path, overrides)
    except ValueError as err:
        _say(f"fastrl {command}: {err}", err=True)
        return 2
    if flags["save"] and _rank0():
        try:
            save_config(cfg, flags["save"])
        except OSError as err:
            _say(f"fastrl {command}: --save-config {flags['save']!r}: {err.strerror or err}", err=True)
            return 2
    if flags["print"]:
        import yaml

        _say(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return 0
    metrics = _guarded(command, run, cfg)
    if isinstance(metrics, _Failed):
        return 1
    if metrics is not None:
        _say(json.dumps({k: _plain(v) for k, v in dict(metrics).items()}, indent=2, default=str))
    return 0


class _Failed:
    """What ``_guarded`` returns when the command stopped on a user error (already reported)."""


# The errors a user's input causes: fastrl raises ValueError for a bad option, value or dataset (STYLE.md;
# internal invariants are asserts), and a model, tokenizer or data path that cannot be opened is an OSError.
USER_ERRORS = (ValueError, OSError)


def _guarded(command: str, fn, *args):
    """``fn(*args)``; a user error becomes one line on stderr, ``fastrl <command>: error: ...``, and a
    ``_Failed`` result instead of a traceback. ``FASTRL_TRACEBACK=1`` re-raises it (for debugging)."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        if os.environ.get("FASTRL_TRACEBACK", "") not in ("", "0"):
            raise
        _say(f"fastrl {command}: error: {type(err).__name__}: {err}", err=True)
        return _Failed()


def _plain(value):
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (RuntimeError, ValueError):
            return str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastrl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _say(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in TRAINERS:
        return run_trainer(command, rest)
    if command == "bench":
        from fastrl.bench import main as bench_main

        status = _guarded(command, bench_main, rest)
        return 1 if isinstance(status, _Failed) else status
    if command == "demo":
        from fastrl.demo import main as demo_main

        status = _guarded(command, demo_main, rest)  # a summary dict (or an exit status)
        if isinstance(status, _Failed):
            return 1
        return status if isinstance(status, int) else 0
    if command == "vllm-serve":
        _say(
            "fastrl vllm-serve: not available yet: needs the vllm extra (pip install 'fastrl[vllm]') and the "
            "vllm_server engine; use engine.kind=hf or vllm (colocated) meanwhile",
            err=True,
        )
        return 2
    _say(f"fastrl: unknown command {command!r}\n\n{usage()}", err=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
