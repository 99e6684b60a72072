"""Typed recipe configs: dataclass defaults, a YAML beside each recipe, a user's YAML, and
``key.sub=value`` overrides on the command line.

Every value is checked against the dataclass before any work starts: an unknown key names
the closest valid keys, a wrong type names the expected type, a value outside its range or
choices names them. Field metadata carries the documentation shown by ``--help``:

    lr: float = option(3e-4, "peak learning rate", min=0.0)
    mode: str = option("token", "distillation mode", choices=["sequence", "token"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from posttrain.errors import ConfigError


def option(default: Any = MISSING, help: str = "", *, choices=None, min=None, max=None, default_factory=MISSING):
    """A config field with its documentation and valid values."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RewardConfig:
    """One weighted reward: ``{name, weight, params}``."""

    name: str = option("", "reward: entry-point name (see `posttrain rewards list`) or module:function")
    weight: float = option(1.0, "weight in the combined reward")
    params: dict[str, Any] = option({}, "keyword arguments bound to the reward function")
    timeout_s: float = option(600.0, "longest one call of this reward may take, in seconds (0 = no limit); a slower call stops the run naming the reward", min=0.0)


@dataclass
class RunConfig:
    """Keys every recipe accepts."""

    output_dir: str = option("runs", "runs are written to OUTPUT_DIR/<recipe>/<run_name>/")
    run_name: str = option("", "run directory name (default: the start time)")
    seed: int = option(0, "random seed for data, initialisation and sampling")
    max_steps: int = option(100, "optimiser steps", min=0)
    resume: bool = option(False, "continue the latest unfinished run of this recipe from its last checkpoint")
    save_every: int = option(50, "checkpoint every N steps (0 = only at the end)", min=0)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", min=1)
    log_every: int = option(10, "write metrics every N steps", min=1)
    rewards: list[RewardConfig] = option([], "extra reward plugins, [{name, weight, params}]")
    trust_remote_code: bool = option(False, "let model folders whose config.json asks for their own code (auto_map) run it; only for models you trust")
    deepspeed: str = option("", "DeepSpeed ZeRO for the TRL-based trainers on GPUs: zero2, zero3 (recipes/configs/) or a DeepSpeed JSON file; empty = the plain backend (CPU runs)")


# ---------------------------------------------------------------------------------------
# Introspection helpers


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp) -> str:
    """A short human name for a type annotation."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} or null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(get_args(tp)[0])}" if get_args(tp) else "list"
    if origin is dict:
        args = get_args(tp)
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if tp is Any:
        return "any value"
    if is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp, key: str, from_string: bool = False) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``key``."""

    def bad(expected: str | None = None):
        shown = value if not isinstance(value, str) else repr(value)
        raise ConfigError(f"config key '{key}': expected {expected or type_name(tp)}, got {shown}")

    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (from_string and isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, inner, key, from_string)
    if tp is Any:
        if from_string and isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError:  # not YAML: the text itself (e.g. a path like {stage}/talker)
                return value
        return value
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        bad("a string")
    if origin in (list, tuple):
        if from_string and isinstance(value, str):
            value = _parse_yaml_value(value, key)
        if not isinstance(value, (list, tuple)):
            bad()
        (item_tp,) = get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if from_string and isinstance(value, str):
            value = _parse_yaml_value(value, key)
        if not isinstance(value, dict):
            bad()
        k_tp, v_tp = get_args(tp) or (str, Any)
        return {coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if from_string and isinstance(value, str):
            value = _parse_yaml_value(value, key)
        if not isinstance(value, dict):
            bad()
        return build(tp, value, prefix=key + ".")
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")  # a posttrain bug


def _parse_yaml_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': cannot parse {text!r}: {e}") from None


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata or {}
    choices = meta.get("choices")
    if choices is not None and value is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                raise ConfigError(
                    f"config key '{key}': {v!r} is not a valid choice; choose one of {', '.join(map(str, choices))}"
                )
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"config key '{key}': {value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"config key '{key}': {value} is above the maximum {hi}")


def _unknown_key(cls, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    return ConfigError(
        f"unknown config key '{prefix}{name}'{hint}; valid keys here: {', '.join(prefix + v for v in valid)}"
    )


def build(cls, values: dict[str, Any], prefix: str = ""):
    """An instance of dataclass ``cls`` from a (nested) mapping, every value checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    hints = _hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in by_name:
            raise _unknown_key(cls, str(name), prefix)
        f = by_name[name]
        key = prefix + name
        v = coerce(value, hints[name], key)
        _check_bounds(f, v, key)
        kwargs[name] = v
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg) -> dict[str, Any]:
    """A plain nested dict of a config, for YAML and JSON."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------
# Loading: recipe defaults -> user's YAML -> command-line overrides


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from ``path``, with errors naming the file and line."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path!r}{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of keys to values at the top level")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` merged into a copy of ``base``; nested mappings merge, other values replace."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type_at(cls, path: list[str]):
    """The annotated type of dotted ``path`` in ``cls``, or None where it leaves the dataclasses
    (inside a mapping the caller accepts any key)."""
    tp = cls
    for i, part in enumerate(path):
        if is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                raise _unknown_key(tp, part, "".join(p + "." for p in path[:i]))
            tp = hints[part]
            _, tp = _is_optional(tp)
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1] if get_args(tp) else Any
            _, tp = _is_optional(tp)
        elif tp is Any:  # free-form mapping (e.g. a pipeline's per-stage overrides): any sub-key
            continue
        else:
            raise ConfigError(f"config key '{'.'.join(path)}': '{'.'.join(path[:i])}' has no sub-keys")
    return tp


def parse_overrides(cls, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``key.sub=value`` strings as a nested mapping (values typed from ``cls``), plus the
    ``config=FILE`` paths found among them."""
    nested: dict[str, Any] = {}
    config_files = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: write key=value (for example max_steps=200)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if key == "config":
            config_files.append(raw)
            continue
        path = key.split(".")
        if any(not p for p in path):
            raise ConfigError(f"bad override {item!r}: empty part in key {key!r}")
        tp = _field_type_at(cls, path)
        value = coerce(raw, tp, key, from_string=True)
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[path[-1]] = value
    return nested, config_files


def load_config(cls, defaults_yaml: str | None, overrides: list[str]):
    """The resolved config: dataclass defaults <- recipe YAML <- ``config=FILE`` <- overrides."""
    values: dict[str, Any] = {}
    if defaults_yaml and os.path.exists(defaults_yaml):
        values = read_yaml(defaults_yaml)
    cli_values, config_files = parse_overrides(cls, overrides)
    for path in config_files:
        values = deep_merge(values, read_yaml(path))
    values = deep_merge(values, cli_values)
    return build(cls, values)


def describe(cfg, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, current value, help) for every field of a config instance, nested
    sections flattened with dots."""
    rows = []
    hints = _hints(type(cfg))
    for f in fields(cfg):
        tp = hints[f.name]
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if is_dataclass(value):
            rows.extend(describe(value, key + "."))
            continue
        meta = f.metadata or {}
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" [choices: {', '.join(map(str, meta['choices']))}]"
        bounds = [f"{name} {meta[name]}" for name in ("min", "max") if meta.get(name) is not None]
        if bounds:
            help_text += f" [{', '.join(bounds)}]"
        if isinstance(value, list) and value and is_dataclass(value[0]):
            value = [to_dict(v) for v in value]
        shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        shown = shown.removesuffix("...").strip()
        rows.append((key, type_name(tp), shown, help_text))
    return rows
