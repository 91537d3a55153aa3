"""Load the data contracts in ``schemas/``.

The contracts are language-neutral JSON files kept once, at the top of the repository, and shipped
inside the wheel as ``itpo_batch/schemas`` (``pyproject.toml``: force-include). This module only reads
them; no schema is repeated in Python. Types are written as Arrow-like strings
(``list<struct<role: string, content: string>>``); ``accept`` lists the input type *classes* that are
cast to the canonical type (``integer`` ids become strings, ``boolean`` outcomes become floats).
A schema may ``extends`` another (its fields come first, then its own), and a field may list the
``values`` it allows. ``run_layout.json`` describes the run directory and ``views.sql`` its SQL views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.types as pat


def schemas_dir() -> Path:
    """Directory holding the contract files: inside the installed package, else the repo root."""
    here = Path(__file__).resolve().parent  # itpo_batch/data
    for candidate in (here.parent / "schemas", here.parent.parent / "schemas"):
        if (candidate / "validation.json").is_file():
            return candidate
    raise FileNotFoundError(f"schemas/ not found next to {here} (broken install?)")


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    required: bool
    accept: tuple[str, ...]
    description: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSchema:
    name: str
    description: str
    fields: tuple[Field, ...]
    detect_by: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def required(self) -> list[str]:
        return [f.name for f in self.fields if f.required]

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def arrow_schema(self) -> pa.Schema:
        """Canonical Arrow schema (``json`` fields are stored as strings)."""
        return pa.schema([pa.field(f.name, arrow_type(f.type), nullable=not f.required) for f in self.fields])


@cache
def load_schema(name: str) -> TableSchema:
    """Read ``schemas/<name>.schema.json`` (e.g. ``logs.nested``, ``conversations``)."""
    raw = json.loads((schemas_dir() / f"{name}.schema.json").read_text())
    base = load_schema(raw["extends"]).fields if "extends" in raw else ()
    fields = base + tuple(
        Field(
            name=f["name"],
            type=f["type"],
            required=bool(f["required"]),
            accept=tuple(f.get("accept", [_default_accept(f["type"])])),
            description=f.get("description", ""),
            values=tuple(f.get("values", ())),
        )
        for f in raw["fields"]
    )
    return TableSchema(raw["name"], raw.get("description", ""), fields, tuple(raw.get("detect_by", [])))


def nested_logs_schema() -> pa.Schema:
    """Arrow schema of the nested logs this tool writes (rollouts, round logs): the ``logs.nested`` contract."""
    return load_schema("logs.nested").arrow_schema()


@cache
def run_layout() -> dict[str, Any]:
    """The run directory's layout (``schemas/run_layout.json``): partitions, tables, files, views."""
    return json.loads((schemas_dir() / "run_layout.json").read_text())


def views_sql() -> str:
    """The SQL view definitions over a run directory (``schemas/views.sql``), with a ``{run}`` placeholder."""
    return (schemas_dir() / "views.sql").read_text()


@cache
def validation_rules() -> dict[str, Any]:
    """The validation limits and rule catalogue (``schemas/validation.json``)."""
    return json.loads((schemas_dir() / "validation.json").read_text())


def rule_message(rule_id: str) -> str:
    """Human sentence for a rule id; unknown ids are a programming error."""
    for rule in validation_rules()["rules"]:
        if rule["id"] == rule_id:
            return rule["message"]
    raise KeyError(rule_id)


_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "json": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


def arrow_type(spec: str) -> pa.DataType:
    """Parse a type string such as ``list<struct<role: string, content: string>>``."""
    spec = spec.strip()
    if spec in _SCALARS:
        return _SCALARS[spec]
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(arrow_type(spec[5:-1]))
    if spec.startswith("struct<") and spec.endswith(">"):
        parts = _split_top_level(spec[7:-1])
        return pa.struct(
            [pa.field(p.split(":", 1)[0].strip(), arrow_type(p.split(":", 1)[1])) for p in parts]
        )
    raise ValueError(f"unknown type in schema: {spec!r}")


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in parts if p.strip()]


_CLASSES = (
    ((pat.is_string, pat.is_large_string, pat.is_string_view), "string"),
    ((pat.is_integer,), "integer"),
    ((pat.is_floating,), "floating"),
    ((pat.is_boolean,), "boolean"),
    ((pat.is_struct,), "struct"),
    ((pat.is_map,), "map"),
    ((pat.is_null,), "null"),
)
_LISTS = (pat.is_list, pat.is_large_list, pat.is_list_view, pat.is_fixed_size_list)


def type_class(t: pa.DataType) -> str:
    """Class name of an Arrow type as used in ``accept`` (``list<floating>``, ``integer``, ...)."""
    if any(is_list(t) for is_list in _LISTS):
        return f"list<{type_class(t.value_type)}>"
    for predicates, name in _CLASSES:
        if any(p(t) for p in predicates):
            return name
    return str(t)


def type_accepted(t: pa.DataType, field: Field) -> bool:
    """Whether an input column of type ``t`` can be cast to the field's canonical type.

    An all-null column (type ``null``, common in JSON Lines) is accepted for optional fields.
    """
    cls = type_class(t)
    if cls == "null" or cls.endswith("<null>"):
        return not field.required
    if field.type.startswith("list<struct<"):
        return cls.startswith("list<struct") and _has_struct_fields(t.value_type, ("role", "content"))
    return cls in field.accept


def _has_struct_fields(t: pa.DataType, names: tuple[str, ...]) -> bool:
    if not pat.is_struct(t):
        return False
    have = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return all(n in have and type_class(have[n]) in ("string", "null") for n in names)


def polars_dtype(spec: str):
    """The polars dtype of a schema type string (via Arrow, so both agree by construction)."""
    import polars as pl

    return pl.Series(pa.array([], type=arrow_type(spec))).dtype


def canonical_cast(df, table: TableSchema):
    """Select and cast a polars frame to a canonical table's columns, in the schema's order."""
    import polars as pl

    return df.select([pl.col(f.name).cast(polars_dtype(f.type)) for f in table.fields])


def _default_accept(spec: str) -> str:
    """Without an ``accept`` list a field takes its own type class (so large/view variants pass)."""
    return "string" if spec == "json" else type_class(arrow_type(spec))
