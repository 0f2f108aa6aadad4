"""Typed, validated configuration that round-trips through flat dotted dicts.

Every concern (data, tasks, method, optimisation, evaluation, sweep) is a dataclass deriving from
:class:`Config`. Fields carry their constraints in ``field(metadata=...)`` through :func:`param`,
so the allowed range lives next to the default and every error message can quote it::

    @dataclass
    class DataConfig(Config):
        image_size: int = param(256, low=32, high=4096, doc="side of the cached square images")

Nested configs flatten to dotted keys (``{"data.image_size": 256}``), which is what Ray Tune's
``param_space`` overrides and what MLflow logs as params; :meth:`Config.from_flat` reverses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from cxrtune.errors import ConfigError

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | list | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with its validation rule and a one-line description.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; for sequences the bounds
    and choices apply to every element.
    """
    metadata = {
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": tuple(choices) if choices is not None else None,
        "doc": doc,
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _describe_range(meta: Mapping[str, Any]) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    if low is not None and high is not None:
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return f"{'>' if meta.get('low_open') else '>='} {low}"
    if high is not None:
        return f"{'<' if meta.get('high_open') else '<='} {high}"
    return "any value of the declared type"


def _check_scalar(owner: str, name: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{owner}.{name} = {value!r} is not allowed: use {_describe_range(meta)}")
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}.{name} = {value!r} is not a number: use a number {_describe_range(meta)}")
    if value != value:  # NaN
        raise ConfigError(f"{owner}.{name} = nan is not allowed: use a number {_describe_range(meta)}")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if too_low or too_high:
        raise ConfigError(f"{owner}.{name} = {value!r} is out of range: use a value {_describe_range(meta)}")


def _coerce_number(owner: str, name: str, value: Any, kind: type) -> int | float:
    """An int field takes ints, integral floats and integer strings; a float field any number or
    numeric string; neither takes a boolean."""
    what = "an integer" if kind is int else "a number"
    if not isinstance(value, bool):
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    raise ConfigError(f"{owner}.{name} = {value!r} is not {what}")


def _coerce(owner: str, name: str, value: Any, annotation: Any) -> Any:
    """Coerce values that arrive from CLIs, JSON or Ray Tune to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(owner, name, value, non_none[0])
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{owner}.{name} = {value!r} is not a boolean: use true or false")
    if annotation in (int, float):
        return _coerce_number(owner, name, value, annotation)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{owner}.{name} = {value!r} is not a string")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set probe.shots=20`: one shot count
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{owner}.{name} = {value!r} is not a sequence: use a list such as [1, 5, 10]")
        elem = args[0] if args else Any
        items = [_coerce(owner, name, v, elem) if elem is not Any else v for v in value]
        return tuple(items) if origin is tuple else list(items)
    return value


class Config:
    """Mixin for validated dataclasses. Subclasses must be ``@dataclasses.dataclass``."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            annotation = hints.get(f.name, Any)
            if isinstance(value, Config):
                continue
            if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
                object.__setattr__(self, f.name, annotation.from_dict(value))
                continue
            value = _coerce(owner, f.name, value, annotation)
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                for item in value:
                    _check_scalar(owner, f.name, item, f.metadata)
            else:
                _check_scalar(owner, f.name, value, f.metadata)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override and raise :class:`ConfigError`."""

    # -- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field {unknown[0]!r}: valid fields are {', '.join(sorted(names))}"
            )
        return cls(**dict(data))

    def to_flat(self, prefix: str = "") -> dict[str, Any]:
        """Flatten to dotted keys: ``{"data.image_size": 256, ...}``."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            key = f"{prefix}{f.name}"
            if isinstance(value, Config):
                flat.update(value.to_flat(prefix=key + "."))
            elif isinstance(value, tuple):
                flat[key] = list(value)
            else:
                flat[key] = value
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "Config":
        """Inverse of :meth:`to_flat`; missing keys keep their defaults."""
        return cls.from_dict(unflatten(flat))

    def override(self, flat: Mapping[str, Any]) -> "Config":
        """A copy with dotted keys replaced (what a Ray Tune ``param_space`` does)."""
        merged = self.to_flat()
        for key in flat:
            if key not in merged:
                raise ConfigError(
                    f"unknown config key {key!r} for {type(self).__name__}: "
                    f"valid keys are {', '.join(sorted(merged))}"
                )
        merged.update(flat)
        return type(self).from_flat(merged)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(dotted name, default, allowed values, doc) for every leaf field, for --help texts."""
        rows: list[tuple[str, str, str, str]] = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            annotation = hints.get(f.name)
            if isinstance(annotation, type) and issubclass(annotation, Config):
                for name, default, allowed, doc in annotation.describe():
                    rows.append((f"{f.name}.{name}", default, allowed, doc))
                continue
            if f.default is not _MISSING:
                default = repr(f.default)
            elif f.default_factory is not _MISSING:  # type: ignore[misc]
                default = repr(f.default_factory())  # type: ignore[misc]
            else:
                default = "(required)"
            rows.append((f.name, default, _describe_range(f.metadata), f.metadata.get("doc", "")))
        return rows


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key!r} conflicts with the scalar key {part!r}")
            node = child
        node[parts[-1]] = value
    return nested
