"""``params.yaml`` (the one source of truth for parameters) into typed config objects.

Each pipeline step owns one top-level block of ``params.yaml`` and one dataclass. Command-line
overrides use dotted keys (``--set train.lr=3e-4``) whose values are parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hescape.errors import ConfigError

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


def load_params(path: str | os.PathLike | None = None) -> dict:
    """Read ``params.yaml`` (default: ``$HESCAPE_PARAMS`` or ``./params.yaml``); ``{}`` if absent
    and not asked for explicitly."""
    explicit = path is not None or "HESCAPE_PARAMS" in os.environ
    path = Path(path or os.environ.get("HESCAPE_PARAMS", DEFAULT_PARAMS))
    if not path.exists():
        if explicit:
            raise ConfigError(f"params file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(params: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``params`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(params)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or value is None and (origin in (typing.Union, types.UnionType) and type(None) in args):
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types fail with their path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A dataclass config as a plain (YAML/JSON-safe) mapping."""
    return dataclasses.asdict(obj)


def section(params: dict, name: str, cls: type[T]) -> T:
    """Typed config of one ``params.yaml`` block."""
    return from_dict(cls, params.get(name) or {}, where=name)
