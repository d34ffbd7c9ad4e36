"""The search space: ``tune.space`` of params.yaml as typed specs, sampled into ``train.*`` values.

Each entry names a key of the ``train`` block and a distribution::

    temperature: {type: float, low: 0.02, high: 0.2, log: true}
    head_hidden: {type: int, low: 128, high: 512, step: 128}
    image_head:  {type: categorical, choices: [linear, mlp]}

Every bound and choice is checked against :class:`~hescape.train.config.TrainConfig` when the space
is parsed, so a typo fails before the first trial rather than inside one.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from hescape.config import from_dict
from hescape.errors import ConfigError
from hescape.train.config import TrainConfig

BLOCK = "train"
TYPES = ("float", "int", "categorical")
_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class ParamSpec:
    """One searched ``train`` key and its distribution.

    Attributes
    ----------
    name
        Key of the ``train`` block (a :class:`TrainConfig` field).
    type
        ``float``, ``int`` or ``categorical``.
    low, high, log, step
        Bounds (inclusive), log scale and grid step of numeric types.
    choices
        Values of a categorical.
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """Draw this parameter for an Optuna trial (``trial.suggest_*``)."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    @property
    def override_key(self) -> str:
        return f"{BLOCK}.{self.name}"


def _number(value, where: str, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(value) if integer else float(value)


def _check_train_value(name: str, value, where: str) -> None:
    """``value`` must be valid for ``train.<name>`` (type and, through TrainConfig, nothing more)."""
    try:
        from_dict(TrainConfig, {name: value}, where=BLOCK)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid value of train.{name}: {exc}") from exc


def parse_entry(name: str, entry) -> ParamSpec:
    """One ``tune.space`` entry as a :class:`ParamSpec`; raises :class:`ConfigError` naming the entry."""
    where = f"tune.space.{name}"
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in known:
        raise ConfigError(f"{where}: unknown train key {name!r}; known: {', '.join(sorted(known))}")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type', got {entry!r}")
    kind = entry.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: unknown type {kind!r}; known types: {', '.join(TYPES)}")
    extra = sorted(set(entry) - _KEYS[kind])
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra} for type {kind}; allowed: {sorted(_KEYS[kind])}")

    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list, got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(f"{where}: choice {choice!r} is not a scalar (Optuna stores scalars only)")
            _check_train_value(name, choice, where)
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: duplicate choices in {choices!r}")
        return ParamSpec(name=name, type=kind, choices=tuple(choices))

    for key in ("low", "high"):
        if key not in entry:
            raise ConfigError(f"{where}: '{key}' is required for type {kind}")
    integer = kind == "int"
    low = _number(entry["low"], f"{where}.low", integer=integer)
    high = _number(entry["high"], f"{where}.high", integer=integer)
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true/false, got {log!r}")
    step = entry.get("step")
    if step is not None:
        step = _number(step, f"{where}.step", integer=integer)
        if step <= 0:
            raise ConfigError(f"{where}.step: must be positive, got {step}")
        if log:
            raise ConfigError(f"{where}: 'step' and 'log: true' cannot be combined")
    if log and low <= 0:
        raise ConfigError(f"{where}: 'log: true' needs low > 0, got {low}")
    for value in (low, high):
        _check_train_value(name, value, where)
    return ParamSpec(name=name, type=kind, low=low, high=high, log=log, step=step)


def parse_space(space: dict) -> list[ParamSpec]:
    """``tune.space`` -> specs, in the file's order."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"tune.space: expected a non-empty mapping of train key -> distribution, got {space!r}")
    return [parse_entry(str(name), entry) for name, entry in space.items()]


def suggest(trial, specs: list[ParamSpec]) -> dict[str, Any]:
    """Sampled ``train`` values of one trial (a retried or enqueued trial returns its fixed values)."""
    return {spec.name: spec.suggest(trial) for spec in specs}


def apply_values(params: dict, values: dict[str, Any]) -> dict:
    """A copy of ``params`` with ``train.<key> = value`` for every sampled value (typed, no parsing)."""
    out = copy.deepcopy(params)
    block = out.get(BLOCK)
    out[BLOCK] = dict(block) if isinstance(block, dict) else {}
    out[BLOCK].update(values)
    return out


def format_value(value) -> str:
    """``value`` as ``--set`` text that :func:`hescape.config.apply_overrides` parses back to the same
    value. YAML, not ``str()``: PyYAML reads ``1e-05`` as a string, ``1.0e-05`` as a float."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text  # drop the end-of-document marker


def to_overrides(values: dict[str, Any]) -> list[str]:
    """``{"lr": 3e-4}`` -> ``["train.lr=0.0003"]`` (for ``--set`` and the best-parameters file)."""
    return [f"{BLOCK}.{name}={format_value(value)}" for name, value in values.items()]
