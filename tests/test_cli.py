"""fastrl.cli: training commands map YAML + overrides onto the run config and call the trainer; the other
commands dispatch; errors exit with status 2 and a message naming the problem."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import yaml

from fastrl import cli


@dataclass(kw_only=True)
class DummyOptim:
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})


@dataclass(kw_only=True)
class DummyRunConfig:
    steps: int = field(default=2, metadata={"help": "Optimizer steps."})
    optim: DummyOptim = field(default_factory=DummyOptim, metadata={"help": "Optimizer."})


@pytest.fixture
def trainer(monkeypatch):
    """A fake trainer module behind the ``sft`` command; records the config it was run with."""
    module = types.ModuleType("dummy_trainer")
    calls = []

    def run_dummy(cfg):
        calls.append(cfg)
        return {
            "step": cfg.steps,
            "loss": 0.5,
            "history": [{"step": i, "loss": 1.0} for i in range(cfg.steps)],
        }

    module.DummyRunConfig, module.run_dummy, module.calls = DummyRunConfig, run_dummy, calls
    monkeypatch.setitem(sys.modules, "dummy_trainer", module)
    monkeypatch.setitem(cli.TRAINERS, "sft", ("dummy_trainer", "DummyRunConfig", "run_dummy"))
    monkeypatch.delenv("RANK", raising=False)
    return module


def test_trainer_gets_yaml_plus_overrides_and_a_short_summary_is_printed(trainer, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"steps": 5, "optim": {"lr": 0.1}}))
    assert cli.main(["sft", "--config", str(path), "--optim.lr", "3e-4"]) == 0
    assert trainer.calls == [DummyRunConfig(steps=5, optim=DummyOptim(lr=3e-4))]
    # Issue 9 item 6: the summary, not a JSON dump of the whole metrics history.
    assert capsys.readouterr().out == "fastrl sft: done, 5 steps; final loss 0.5\n"


def test_run_summary_names_the_export_and_the_metrics_file():
    from fastrl.trainers.core import TrainConfig

    cfg = types.SimpleNamespace(train=TrainConfig(output_dir="runs/x", export_final=True))
    text = cli.run_summary("grpo", cfg, {"step": 1, "loss": 0.25, "reward": 1.5, "history": [{}] * 100})
    assert text.splitlines() == [
        "fastrl grpo: done, 1 step; final loss 0.25, reward 1.5",
        "  model runs/x/final, metrics runs/x/metrics.jsonl",
    ]


def test_version(capsys):
    from fastrl import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"fastrl {__version__}\n"


def test_config_equals_form_and_save_config(trainer, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 9\n")
    saved = tmp_path / "resolved.yaml"
    assert cli.main(["sft", f"--config={path}", "--save-config", str(saved)]) == 0
    assert trainer.calls[-1].steps == 9
    assert yaml.safe_load(saved.read_text()) == {"steps": 9, "optim": {"lr": 1e-5}}


def test_help_lists_every_key_with_its_help(trainer, capsys):
    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--steps int (default: 2)  Optimizer steps." in out
    assert "--optim.lr float (default: 1e-05)  Peak learning rate." in out
    assert "--config PATH" in out
    assert trainer.calls == []


def test_print_config_does_not_train(trainer, capsys):
    assert cli.main(["sft", "--print-config", "--steps", "4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"steps": 4, "optim": {"lr": 1e-5}}
    assert trainer.calls == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft", "--optim.lrr", "1"], "did you mean 'optim.lr'"),
        (["sft", "--steps", "many"], "'steps' expects int"),
        (["sft", "--config"], "--config needs a path"),
        (["sft", "--config", "/nonexistent/run.yaml"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(trainer, capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert trainer.calls == []


def test_user_errors_in_the_run_exit_1_with_one_line_not_a_traceback(trainer, monkeypatch, capsys, tmp_path):
    # Review fix: a ValueError raised by the trainer (e.g. a missing dataset column), an OSError (a model
    # path that does not exist) or an unwritable --save-config used to end in a traceback.
    def failing(error):
        def run(cfg):
            raise error

        return run

    monkeypatch.setattr(trainer, "run_dummy", failing(ValueError("dataset has no column 'prompt'")))
    assert cli.main(["sft", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "fastrl sft: error: dataset has no column 'prompt'"
    monkeypatch.setattr(trainer, "run_dummy", failing(FileNotFoundError(2, "No such file", "/no/model")))
    assert cli.main(["sft"]) == 1
    assert "fastrl sft: error: FileNotFoundError" in capsys.readouterr().err
    monkeypatch.setenv("FASTRL_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["sft"])
    monkeypatch.delenv("FASTRL_TRACEBACK")
    monkeypatch.setenv("FASTRL_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["sft"])
    monkeypatch.delenv("FASTRL_DEBUG")
    with pytest.raises(FileNotFoundError):
        cli.main(["sft", "--debug"])
    monkeypatch.delenv("FASTRL_DEBUG")  # --debug set it for the process
    monkeypatch.setattr(trainer, "run_dummy", failing(RuntimeError("internal bug")))
    with pytest.raises(RuntimeError, match="internal bug"):  # not a user error: the traceback stays
        cli.main(["sft"])
    monkeypatch.setattr(trainer, "run_dummy", lambda cfg: None)
    assert cli.main(["sft", "--save-config", str(tmp_path / "missing_dir" / "run.yaml")]) == 2
    assert "--save-config" in capsys.readouterr().err


def test_bench_and_demo_user_errors_exit_non_zero(monkeypatch, capsys):
    import fastrl.bench

    def bad_bench(argv):
        raise OSError("disk full")

    monkeypatch.setattr(fastrl.bench, "main", bad_bench)
    assert cli.main(["bench", "--quick"]) == 1
    assert "fastrl bench: error: OSError: disk full" in capsys.readouterr().err
    demo = types.ModuleType("fastrl.demo")

    def bad_demo(argv):
        raise ValueError("--steps must be positive")

    demo.main = bad_demo
    monkeypatch.setitem(sys.modules, "fastrl.demo", demo)
    assert cli.main(["demo", "--steps", "0"]) == 1
    assert "fastrl demo: error: --steps must be positive" in capsys.readouterr().err


def test_only_rank_zero_prints_under_torchrun(trainer, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["sft", "--steps", "3"]) == 0
    assert trainer.calls[-1].steps == 3  # every rank trains
    assert capsys.readouterr().out == ""


def test_bench_and_demo_dispatch(monkeypatch):
    seen = {}
    import fastrl.bench

    monkeypatch.setattr(fastrl.bench, "main", lambda argv: seen.setdefault("bench", argv) and 0)
    demo = types.ModuleType("fastrl.demo")
    demo.main = lambda argv: {"summary": seen.setdefault("demo", argv)}  # the demo returns its summary
    monkeypatch.setitem(sys.modules, "fastrl.demo", demo)
    assert cli.main(["bench", "--quick", "--suite", "dpo"]) == 0
    assert cli.main(["demo", "--steps", "1"]) == 0
    assert seen == {"bench": ["--quick", "--suite", "dpo"], "demo": ["--steps", "1"]}


def test_usage_unknown_command_and_vllm_placeholder(capsys):
    assert cli.main([]) == 2
    assert "usage: fastrl <command>" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert cli.main(["vllm-serve"]) == 2
    assert "required: --model" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        # Issue 9 item 10: `fastrl vllm-serve` and `--engine.kind vllm` name the same missing extra.
        from fastrl.engine.vllm.common import INSTALL_HINT

        assert cli.main(["vllm-serve", "--model", "x"]) == 2
        assert capsys.readouterr().err == f"fastrl vllm-serve: vLLM is not installed: {INSTALL_HINT}\n"


def test_real_run_configs_map_when_the_trainers_exist(capsys):
    """The real trainers' configs go through the same mapping (skipped until they are importable)."""
    for command, (module, cls_name, _) in cli.TRAINERS.items():
        mod = pytest.importorskip(module)
        cls = getattr(mod, cls_name)
        assert cli.main([command, "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert isinstance(printed, dict) and printed, f"{command}: empty config"
        assert cli.main([command, "--help"]) == 0
        assert "--" in capsys.readouterr().out
        from fastrl.config import load_config

        assert load_config(cls, None, []) == cls(), f"{command}: defaults change through the mapping"


def test_ctrl_c_before_training_is_one_line_and_130(monkeypatch, capsys):
    # Ctrl-C while the model or data loads, before the loop's own handler exists: no traceback.
    import fastrl.cli as cli

    def interrupted(command, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_trainer", interrupted)
    monkeypatch.delenv("FASTRL_DEBUG", raising=False)
    assert cli.main(["sft", "--config", "x.yaml"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastrl sft: interrupted before training started"]
