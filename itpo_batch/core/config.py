"""Typed configs from YAML and ``key.sub=value`` overrides: CLI overrides YAML overrides the defaults.

Configs are plain (nested) dataclasses. :func:`from_mapping` builds one from a mapping, recursing into
dataclass-typed fields and refusing unknown keys with the dotted path of the key (a typo must not be
silently ignored). :func:`apply_overrides` applies ``a.b=value`` strings (values parsed as YAML, so
``1e-4``, ``true``, ``[a, b]`` and ``null`` work). The resolved config is what a run writes to its
``config.yaml``, and ``--resume`` reads it back with :func:`from_mapping`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from itpo_batch.core.errors import ItpoError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Value for a field of type ``tp``: nested dataclasses are built, lists become tuples for tuple fields."""
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ItpoError(f"config {where}: expected a mapping, got {value!r}")
        return from_mapping(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    options = set(typing.get_args(tp)) if origin in (typing.Union, types.UnionType) else {tp}
    if float in options and isinstance(value, str | int) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ItpoError(f"config {where.rstrip('.')}: expected a number, got {value!r}") from None
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (missing keys keep their defaults; unknown keys are an error)."""
    types = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        path = ", ".join(f"{where}{k}" for k in unknown)
        raise ItpoError(
            f"unknown config key(s): {path}; known under {where or 'the top'}: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(types[k], v, f"{where}{k}.") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ItpoError(f"config {where or 'top level'}: {e}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, with a clear error naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ItpoError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise ItpoError(f"{path}: a config must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``a.b.c=value`` set (a new dict; nested dicts are created as needed)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ItpoError(f"--set {item!r}: expected KEY=VALUE, e.g. update.lr=3e-4")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ItpoError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def to_mapping(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (what ``config.yaml`` holds)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
