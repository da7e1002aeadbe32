"""fastrl.config: YAML + overrides onto nested keyword-only dataclasses, errors, help text, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from fastrl.config import config_help, load_config, save_config, to_dict


@dataclass(kw_only=True)
class Optim:
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "LR schedule."})


@dataclass(kw_only=True)
class Lora:
    r: int = field(default=16, metadata={"help": "Adapter rank."})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": "Modules to adapt."})


@dataclass(kw_only=True)
class Engine:
    kind: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "Engine kind."})


def _engine():
    return Engine(kind="vllm")


@dataclass(kw_only=True)
class Run:
    name: str = field(default="run", metadata={"help": "Run name."})
    steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    bf16: bool = field(default=True, metadata={"help": "Use bf16."})
    max_samples: Optional[int] = field(default=None, metadata={"help": "Cap on examples."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Free tags."})
    extra: dict = field(default_factory=dict, metadata={"help": "Anything."})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "Reward weights."})
    optim: Optim = field(default_factory=Optim, metadata={"help": "Optimizer."})
    lora: Optional[Lora] = field(default=None, metadata={"help": "LoRA, off when null."})
    # A lazily imported section: annotated loosely, typed by its default.
    engine: object = field(default_factory=_engine, metadata={"help": "Generation engine."})


@dataclass(kw_only=True)
class Checked:
    n: int = field(default=1, metadata={"help": "Count."})

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(kw_only=True)
class Outer:
    inner: Checked = field(default_factory=Checked, metadata={"help": "A checked section."})
    deep: Optional[Outer] = field(default=None, metadata={"help": "Nested again."})


@dataclass(kw_only=True)
class Required:
    path: str = field(metadata={"help": "Required path."})
    n: int = field(default=1, metadata={"help": "Count."})


def _yaml(tmp_path, data) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_without_file_or_overrides():
    assert load_config(Run, None, []) == Run()


def test_nested_yaml_then_overrides_later_win(tmp_path):
    path = _yaml(tmp_path, {"steps": 5, "optim": {"lr": "3e-4", "schedule": "constant"}, "tags": ["a"]})
    cfg = load_config(
        Run,
        path,
        ["--steps", "7", "--optim.lr=1e-3", "--max_samples", "null", "--tags", "x,y", "--bf16", "false"],
    )
    assert cfg.steps == 7 and cfg.bf16 is False and cfg.max_samples is None
    assert cfg.optim == Optim(lr=1e-3, schedule="constant")  # schedule from the file, lr from the override
    assert isinstance(cfg.optim.lr, float)
    assert cfg.tags == ["x", "y"]


def test_scalar_types_and_collections():
    cfg = load_config(
        Run,
        None,
        [
            "--name", "123",  # a str field keeps the text, even when it looks like a number
            "--max_samples", "5",
            "--optim.betas", "[0.8, 0.95]",
            "--extra", "{a: 1, b: [2, 3]}",
            "--weights", "{acc: 1, fmt: 0.5}",
            "--optim.lr", "-1e-3",  # a negative number is a value, not a flag
        ],
    )  # fmt: skip
    assert cfg.name == "123" and cfg.max_samples == 5
    assert cfg.optim.betas == (0.8, 0.95) and cfg.optim.lr == -1e-3
    assert cfg.extra == {"a": 1, "b": [2, 3]}
    assert cfg.weights == {"acc": 1.0, "fmt": 0.5} and isinstance(cfg.weights["acc"], float)


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("False", False), ("yes", True), ("off", False), ("1", True), ("0", False)],
)
def test_bool_override_words(text, value):
    # Review fix: "1" and "0" (documented as bool words) were parsed by YAML to ints and then refused.
    assert load_config(Run, None, ["--bf16", text]).bf16 is value


def test_bare_flag_sets_bool_true_and_needs_value_otherwise():
    assert load_config(Run, None, ["--bf16", "false", "--bf16"]).bf16 is True
    with pytest.raises(ValueError, match="'steps' needs a value of type int"):
        load_config(Run, None, ["--steps"])


def test_optional_section_and_union_of_str_and_list(tmp_path):
    cfg = load_config(Run, None, ["--lora.r", "8"])
    assert cfg.lora == Lora(r=8)
    cfg = load_config(Run, _yaml(tmp_path, {"lora": {"target_modules": ["q_proj", "v_proj"]}}), [])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(Run, None, ["--lora.target_modules", "all-linear"]).lora.target_modules == "all-linear"
    assert load_config(Run, _yaml(tmp_path, {"lora": {"r": 4}}), ["--lora", "null"]).lora is None


def test_loosely_annotated_section_is_typed_by_its_default():
    cfg = load_config(Run, None, [])
    assert cfg.engine == Engine(kind="vllm")
    assert load_config(Run, None, ["--engine.kind", "hf"]).engine == Engine(kind="hf")
    with pytest.raises(ValueError, match="engine.kinf"):
        load_config(Run, None, ["--engine.kinf", "hf"])


def test_unknown_keys_name_the_closest_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(Run, None, ["--optim.lrr", "1"])
    with pytest.raises(ValueError, match=r"unknown config key 'stepz'.*'steps'"):
        load_config(Run, _yaml(tmp_path, {"stepz": 3}), [])
    # A nested key given at the wrong level is found by its last component.
    with pytest.raises(ValueError, match=r"did you mean 'optim\.lr'"):
        load_config(Run, None, ["--lr", "1"])
    with pytest.raises(ValueError, match="valid keys"):
        load_config(Run, None, ["--zzzzzz", "1"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        (["--steps", "1.5"], "steps", "int"),
        (["--steps", "true"], "steps", "int"),
        (["--bf16", "maybe"], "bf16", "bool"),
        (["--optim.lr", "fast"], "optim.lr", "float"),
        (["--optim.schedule", "linear"], "optim.schedule", "'cosine', 'constant'"),
        (["--tags", "{a: 1}"], "tags", r"list\[str\]"),
        (["--optim.betas", "[1, 2, 3]"], "optim.betas", "2 items"),
        (["--weights", "{a: x}"], "weights.a", "float"),
    ],
)
def test_wrong_types_name_key_and_expected_type(override, key, expected):
    with pytest.raises(ValueError, match=rf"'{key}'.*{expected}"):
        load_config(Run, None, override)


def test_structural_errors(tmp_path):
    with pytest.raises(ValueError, match="is a section"):
        load_config(Run, None, ["--optim", "3"])
    with pytest.raises(ValueError, match="not a section"):
        load_config(Run, None, ["--steps.x", "3"])
    with pytest.raises(ValueError, match="must look like"):
        load_config(Run, None, ["steps", "3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Run, str(tmp_path / "missing.yaml"), [])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Run, str(bad), [])
    with pytest.raises(ValueError, match="optim must be a mapping"):
        load_config(Run, _yaml(tmp_path, {"optim": 3}), [])
    with pytest.raises(ValueError, match="missing required config key.*path"):
        load_config(Required, None, ["--n", "2"])
    assert load_config(Required, None, ["--path", "/x"]).path == "/x"
    with pytest.raises(ValueError, match="cls must be a dataclass"):
        load_config(dict, None, [])
    # A YAML syntax error is a ValueError naming the file (review fix: it used to escape as yaml.YAMLError).
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: 1\nsteps: [\n")
    with pytest.raises(ValueError, match=r"broken\.yaml.*not valid YAML"):
        load_config(Run, str(broken), [])


@pytest.mark.parametrize("text", ["null", "~", "None", "none", "NULL"])
def test_optional_scalar_takes_every_spelling_of_none(tmp_path, text):
    # Review fix: "None"/"none" used to be refused for an `int | None` field (YAML reads them as strings)
    # while the same words meant None for an `str | None` field.
    assert load_config(Run, _yaml(tmp_path, {"max_samples": 3}), ["--max_samples", text]).max_samples is None
    assert load_config(Run, None, ["--max_samples", "7"]).max_samples == 7
    with pytest.raises(ValueError, match="'steps' expects int"):
        load_config(Run, None, ["--steps", text])  # not Optional: None stays an error


def test_a_sections_own_check_names_the_section(tmp_path):
    # Review fix: the section's ValueError ("n must be >= 1") did not say which section held n.
    with pytest.raises(ValueError, match=r"config section 'inner': n must be >= 1, got 0"):
        load_config(Outer, None, ["--inner.n", "0"])
    with pytest.raises(ValueError, match=r"config section 'deep\.inner': n must be >= 1"):
        load_config(Outer, _yaml(tmp_path, {"deep": {"inner": {"n": -2}}}), [])
    assert load_config(Outer, None, ["--inner.n", "3"]).inner.n == 3


def test_help_lists_every_key_with_type_default_and_help():
    text = config_help(Run)
    for line in [
        "--steps int (default: 10)  Optimizer steps.",
        "--max_samples int | None (default: None)  Cap on examples.",
        "--optim.lr float (default: 1e-05)  Peak learning rate.",
        "--optim.schedule {'cosine', 'constant'} (default: 'cosine')  LR schedule.",
        "--lora.target_modules str | list[str] (default: 'all-linear')  Modules to adapt.",
        "--engine.kind {'hf', 'vllm'} (default: 'hf')  Engine kind.",
        "[optim] Optimizer.",
    ]:
        assert line in text, line
    assert "--path str (default: required)  Required path." in config_help(Required)


def test_to_dict_and_save_round_trip(tmp_path):
    cfg = load_config(
        Run, None, ["--lora.r", "4", "--optim.betas", "[0.5, 0.6]", "--tags", "a", "--steps", "3"]
    )
    data = to_dict(cfg)
    assert (
        data["optim"]["betas"] == [0.5, 0.6] and data["lora"]["r"] == 4 and data["engine"] == {"kind": "vllm"}
    )
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(Run, str(out), []) == cfg
