"""YAML files and ``--section.key value`` overrides mapped onto nested keyword-only dataclasses.

One mapping for every command: a run config is a dataclass whose fields are scalars, lists, dicts or
nested config dataclasses (sections). A YAML file gives nested mappings; overrides name a field by its
dotted path. Types come from the annotations (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``,
``Literal[...]``, ``list[...]``, ``tuple[...]``, ``dict[...]``, nested dataclasses); values are checked
and converted once, here, so a typo fails before any model is loaded::

    cfg = load_config(GRPORunConfig, "run.yaml", ["--optim.lr", "1e-5", "--model.name_or_path=Qwen/x"])

Unknown keys raise ``ValueError`` naming the key and the closest valid ones; a value of the wrong type
raises ``ValueError`` naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def load_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict | None = None,
) -> T:
    """An instance of the dataclass ``cls`` from ``base`` (a nested mapping, e.g. a converted TRL config),
    then ``yaml_path`` (may be None), then ``overrides`` (later wins).

    ``overrides`` are command-line tokens: ``--a.b value``, ``--a.b=value``, or a bare ``--flag`` for a
    bool field (True). Values are parsed as YAML scalars/flow collections (``[1, 2]``, ``{k: v}``,
    ``null``), except for ``str`` fields, which take the text as is.
    """
    _require_dataclass(cls)
    data = merge(base or {}, read_yaml(yaml_path) if yaml_path is not None else {})
    for dotted, text in _split_overrides(overrides or []):
        _set_override(cls, data, dotted, text)
    return _build(cls, data, prefix="")


def merge(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s keys set over it, nested mappings merged key by key (copies)."""
    out = {k: merge(v, {}) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(yaml_path: str | Path) -> dict:
    """The top-level mapping of a YAML config file (``{}`` for an empty file); ``ValueError`` otherwise."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:  # a user's typo in the file: a message, not a parser traceback
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML{line}: {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({err.reason})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top, got {kind}")
    return loaded


def read_raw(
    yaml_path: str | Path | None, overrides: list[str] | None = None, *, base: dict | None = None
) -> dict:
    """The YAML file's mapping (over ``base``) with the overrides' raw text set at their dotted paths (no
    types, no key checks): what the CLI reads paths from before importing the config classes (and torch)."""
    data = merge(base or {}, read_yaml(yaml_path) if yaml_path is not None else {})
    for dotted, text in _split_overrides(overrides or []):
        node = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            child = node.get(name)
            if not isinstance(child, dict):
                child = node[name] = {}
            node = child
        node[leaf] = text
    return data


def config_help(cls: type, *, prefix: str = "") -> str:
    """One line per field, ``--dotted.key TYPE (default: ...)  help``, sections recursively, from
    ``field(metadata={"help": ...})``."""
    _require_dataclass(cls)
    lines: list[str] = []
    hints = _hints(cls)
    for f in _init_fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        sub = _section_type(tp)
        help_text = f.metadata.get("help", "")
        if sub is not None:
            lines.append(f"[{key}] {help_text}".rstrip())
            lines.append(config_help(sub, prefix=f"{key}."))
            continue
        default = _default_repr(f)
        lines.append(f"  --{key} {type_name(tp)} (default: {default})  {help_text}".rstrip())
    return "\n".join(line for line in lines if line)


def to_dict(obj: Any) -> Any:
    """A plain nested dict (lists for tuples) of a config instance: what ``load_config`` reads back."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (``load_config`` reads it back to an equal instance)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")


def type_name(tp: Any) -> str:
    """A short readable name of an annotation: ``int``, ``float | None``, ``{'a', 'b'}``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ", ".join(repr(a) for a in args) + "}"
    if _is_union(tp):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------------------
# overrides


def _split_overrides(tokens: list[str]) -> list[tuple[str, str | None]]:
    """``["--a.b", "1", "--c=2", "--flag"]`` -> ``[("a.b", "1"), ("c", "2"), ("flag", None)]``."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"override {tok!r} must look like --section.key value or --section.key=value")
        key = tok[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not _looks_like_key(tokens[i + 1]):
            text = tokens[i + 1]
            i += 2
        else:
            text = None  # bare flag: only valid for bool fields, checked when typed
            i += 1
        pairs.append((key.replace("-", "_"), text))
    return pairs


def _looks_like_key(tok: str) -> bool:
    # "--x" is a key; "-1" or "-1e-3" is a negative number value.
    return tok.startswith("--") and len(tok) > 2


def _set_override(cls: type, data: dict, dotted: str, text: str | None) -> None:
    parts = dotted.split(".")
    node_cls, node = cls, data
    for depth, name in enumerate(parts):
        fields = {f.name: f for f in _init_fields(node_cls)}
        path = ".".join(parts[: depth + 1])
        if name not in fields:
            raise _unknown_key(path, node_cls, ".".join(parts[:depth]))
        tp = _hints(node_cls)[name]
        sub = _section_type(tp)
        last = depth == len(parts) - 1
        if sub is not None and not last:
            child = node.get(name)
            if not isinstance(child, dict):
                child = node[name] = {}
            node_cls, node = sub, child
            continue
        if not last:
            raise ValueError(f"override --{dotted}: {path!r} is a {type_name(tp)} value, not a section")
        if sub is not None:
            if text is not None and text.strip().lower() in ("null", "none", "~") and _allows_none(tp):
                node[name] = None
                return
            raise ValueError(f"override --{dotted}: {path!r} is a section; set its keys like --{path}.<key>")
        node[name] = _BareFlag() if text is None else _Text(text)
        return


class _Text(str):
    """An override's raw text: parsed as YAML unless the field is a ``str``."""


class _BareFlag:
    """``--flag`` with no value."""


# ---------------------------------------------------------------------------------------------------------
# building


def _build(cls: type[T], data: Any, *, prefix: str, base: Any = None) -> T:
    """``cls`` from the mapping ``data``; keys absent from ``data`` keep ``base``'s values (or defaults)."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in _init_fields(cls)}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(f"{prefix}{key}", cls, prefix.rstrip("."))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        # A section the mapping sets is built from its keys (not a replace() of its default instance, whose
        # __post_init__ may have filled in fields: TrainConfig's max_steps would then clash with a given
        # num_train_epochs).
        current = getattr(base, name) if base is not None else None
        kwargs[name] = _convert(hints[name], value, key=f"{prefix}{name}", current=current)
    if base is None:
        missing = [
            f"{prefix}{n}"
            for n, f in fields.items()
            if n not in kwargs and f.default is _MISSING and f.default_factory is _MISSING
        ]
        if missing:
            raise ValueError(f"missing required config key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ValueError as err:
        # The section's own check (``__post_init__``) names its field; say which section it sits in.
        if not prefix:
            raise
        raise ValueError(f"config section {prefix.rstrip('.')!r}: {err}") from err


def _convert(tp: Any, value: Any, *, key: str, current: Any = None) -> Any:
    """One field's value: sections recurse (starting from ``current``), overrides' text is parsed."""
    sub = _section_type(tp)
    if sub is not None:
        if value is None or (isinstance(value, _Text) and value.strip().lower() in ("null", "none", "~")):
            if _allows_none(tp):
                return None
            raise ValueError(f"config key {key!r} is a section and cannot be null")
        if isinstance(value, sub):
            return value
        return _build(sub, value, prefix=f"{key}.", base=current if isinstance(current, sub) else None)
    if isinstance(value, _BareFlag):
        if _strip_optional(tp) is bool:
            return True
        raise ValueError(f"config key {key!r} needs a value of type {type_name(tp)}")
    if isinstance(value, _Text):
        value = _parse_text(tp, str(value))
    return _coerce(tp, value, key)


def _parse_text(tp: Any, text: str) -> Any:
    core = _strip_optional(tp)
    # "none"/"None" mean None for every Optional field, as they do for Optional[str] (YAML alone knows
    # only null and ~, so `--x.seed None` used to be refused for an `int | None` field).
    if _allows_none(tp) and text.strip().lower() in ("null", "none", "~"):
        return None
    if core is str or (
        typing.get_origin(core) is Literal and all(isinstance(a, str) for a in typing.get_args(core))
    ):
        return text
    if core is bool:  # _coerce reads the words (true/yes/1/on, ...); YAML would make "1"/"0" ints
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; ValueError otherwise."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ValueError:
                pass
        raise _wrong_type(key, tp, value)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(choice, (int, float)) and not isinstance(choice, bool) and isinstance(value, str):
                try:
                    if type(choice)(value) == choice:
                        return choice
                except ValueError:
                    pass
        raise _wrong_type(key, tp, value)
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" from the command line
            pieces = [v.strip() for v in value.split(",") if v.strip()]
            as_text = args and _strip_optional(args[0]) is str
            value = pieces if as_text else [yaml.safe_load(v) for v in pieces]
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(
                    f"config key {key!r} expects {len(args)} items ({type_name(tp)}), got {value!r}"
                )
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value)
        if not args:
            return dict(value)
        return {
            _coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _wrong_type(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong_type(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong_type(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read an unquoted name like 1.5 as a number
        raise _wrong_type(key, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _wrong_type(key, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong_type(key, tp, value)
    raise ValueError(f"config key {key!r} has an annotation fastrl.config cannot map: {tp!r}")


# ---------------------------------------------------------------------------------------------------------
# helpers


def _require_dataclass(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"cls must be a dataclass type, got {cls!r}")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _allows_none(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field annotations, resolved; a field annotated loosely (``object``, ``Any``) whose default is a
    config dataclass is a section of that dataclass (a lazily imported config, e.g. the engine's)."""
    hints = typing.get_type_hints(cls)
    for f in _init_fields(cls):
        if hints.get(f.name) in (object, Any):
            default = _field_default(f)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                hints[f.name] = type(default)
    return hints


def _section_type(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (also ``Optional[DC]``), or None for a plain value."""
    core = _strip_optional(tp)
    if isinstance(core, type) and dataclasses.is_dataclass(core):
        return core
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is _MISSING and f.default_factory is _MISSING:
        return "required"
    return repr(_field_default(f))


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in _init_fields(cls):
        sub = _section_type(hints[f.name])
        keys.append(prefix + f.name)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + f.name + "."))
    return keys


def _unknown_key(path: str, section_cls: type, section: str) -> ValueError:
    """Suggest the closest keys of the section, also nested ones (``lr`` -> ``optim.lr``)."""
    leaf = path.rsplit(".", 1)[-1]
    full = lambda k: f"{section}.{k}" if section else k
    candidates = _all_keys(section_cls)
    scored = sorted(
        ((difflib.SequenceMatcher(None, leaf, c.rsplit(".", 1)[-1]).ratio(), c) for c in candidates),
        key=lambda sc: -sc[0],
    )
    close = [full(c) for score, c in scored if score >= 0.6][:3]
    where = f"in section {section!r}" if section else "at the top level"
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "valid keys: " + ", ".join(full(f.name) for f in _init_fields(section_cls))
    return ValueError(f"unknown config key {path!r} ({where}); {hint}")


def _wrong_type(key: str, tp: Any, value: Any) -> ValueError:
    return ValueError(f"config key {key!r} expects {type_name(tp)}, got {value!r} ({type(value).__name__})")
