"""Raw log files → Arrow record batches, each row named by its place in the file.

The first layer of reading logs (:mod:`itpo_batch.data.logs` casts the batches to canonical frames):

* **Streaming.** Parquet is read in row batches, JSON Lines in chunks of ``batch_size`` records, so a file
  larger than memory is never loaded whole.
* **Rows are named.** Each batch comes with the 0-based source row of every record: the Parquet row, or
  the JSON Lines line number − 1 (blank lines are skipped but counted), so errors point at the real line.
* **JSON Lines are parsed line by line** with the standard library: this names the exact line of a
  truncated or malformed record, which Arrow's block reader cannot. Columns are then built one by one;
  a value Arrow cannot hold is found by bisection and named with its line (:func:`_value_problem`).
* **JSON has no column types.** A scalar contract column whose values are each of an accepted kind is
  taken in the canonical type whatever their order (:func:`_coerce_json`).
* Everything a user can get wrong raises :class:`FileProblem` with the rule of ``schemas/validation.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itpo_batch.data.schemas import load_schema, validation_rules

Format = Literal["parquet", "jsonl"]


class FileProblem(Exception):
    """A rule broken at file level (the file cannot be read further). Caught by the validator."""

    def __init__(self, rule: str, detail: str, row: int | None = None):
        super().__init__(detail)
        self.rule, self.detail, self.row = rule, detail, row


def detect_format(path: Path) -> Format:
    """``parquet`` or ``jsonl`` from the file extension; anything else breaks ``wrong-extension``."""
    suffix = path.suffix.lower()
    for fmt, exts in validation_rules()["extensions"].items():
        if suffix in exts:
            return fmt
    allowed = ", ".join(e for exts in validation_rules()["extensions"].values() for e in exts)
    raise FileProblem("wrong-extension", f"extension {suffix or '(none)'!r} is not one of {allowed}")


def iter_raw_batches(path: Path, batch_size: int) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    """Yield ``(rows, batch)`` for a Parquet or JSON Lines file, raising :class:`FileProblem`.

    ``rows`` holds each record's 0-based source row (int64): the Parquet row, or the JSON Lines line
    number − 1, which skips blank lines, so rows of one batch need not be consecutive.
    """
    fmt = detect_format(path)
    if not path.is_file():
        raise FileProblem("unreadable-file", "no such file")
    if fmt == "parquet":
        yield from _parquet_batches(path, batch_size)
    else:
        yield from _jsonl_batches(path, batch_size)


def _parquet_batches(path: Path, batch_size: int) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    try:
        # pre_buffer=False: with pre-buffering Arrow keeps every column chunk it has read in its pool
        # until the file is closed, so memory grew with the file (measured: 356 MiB pool for 1.2 GiB).
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise FileProblem("unreadable-file", f"not a readable Parquet file ({e})") from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            yield np.arange(row, row + batch.num_rows, dtype=np.int64), batch
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise FileProblem("unreadable-file", f"Parquet data is corrupt or truncated ({e})", row) from None


def _jsonl_batches(path: Path, batch_size: int) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    records: list[dict] = []
    lines: list[int] = []
    try:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh):
                if not line.strip():
                    continue
                records.append(_parse_line(line, lineno))
                lines.append(lineno)
                if len(records) == batch_size:
                    yield np.asarray(lines, dtype=np.int64), _records_to_batch(records, lines)
                    records, lines = [], []
    except OSError as e:
        raise FileProblem("unreadable-file", str(e)) from None
    if records:
        yield np.asarray(lines, dtype=np.int64), _records_to_batch(records, lines)


def _parse_line(line: bytes, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except UnicodeDecodeError as e:
        raise FileProblem(
            "unreadable-file", f"line {lineno + 1} is not UTF-8 text ({e.reason})", lineno
        ) from None
    except json.JSONDecodeError as e:
        raise FileProblem(
            "unreadable-file", f"line {lineno + 1} is not valid JSON ({e.msg})", lineno
        ) from None
    if not isinstance(rec, dict):
        raise FileProblem("unreadable-file", f"line {lineno + 1} is not a JSON object", lineno)
    return rec


_BUILD_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError)


def _records_to_batch(records: list[dict], lines: list[int]) -> pa.RecordBatch:
    """Build an Arrow batch column by column so a bad value names its column and its line.

    JSON objects in a ``json`` column (``metadata``) are kept as their compact JSON text, never turned
    into Arrow structs: a struct's encoding depends on the other objects of its batch (missing keys
    become nulls), so the rows of one long-shape conversation could disagree across batches.
    """
    names = list(dict.fromkeys(k for r in records for k in r))
    arrays = []
    for name in names:
        values = [r.get(name) for r in records]
        if _json_kinds().get(name, ("",))[0] == "json":
            values = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) if isinstance(v, dict) else v
                      for v in values]  # fmt: skip
        try:
            arrays.append(pa.array(values))
        except _BUILD_ERRORS:
            coerced = _coerce_json(name, values)
            if coerced is None:
                raise _value_problem(name, values, lines) from None
            arrays.append(coerced)
    return pa.RecordBatch.from_arrays(arrays, names=names)


@cache
def _json_kinds() -> dict[str, tuple[str, frozenset[str]]]:
    """Scalar contract columns: name → (canonical type, JSON kinds it accepts), from every input schema."""
    kinds = {"integer": "int", "floating": "float", "boolean": "bool", "string": "str", "struct": "dict"}
    out = {}
    for schema in ("logs.nested", "logs.long", "outcomes"):
        for f in load_schema(schema).fields:
            if f.type in ("float64", "string", "json"):
                out[f.name] = (f.type, frozenset(kinds[a] for a in f.accept if a in kinds))
    return out


_JSON_KIND = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict"}


def _coerce_json(name: str, values: list) -> pa.Array | None:
    """A JSON column whose values are each of a kind the contract accepts, as the canonical type.

    JSON has no column types, so ``[true, 0.5]`` is as good an outcome column as ``[0.5, true]``,
    ``[7, "c8"]`` as good a conversation_id column as ``["c8", 7]``. Arrow's inference takes some orders and refuses others (booleans after numbers, not
    numbers after booleans), which made a file's verdict depend on its row order and on the batch size.
    None when some value is of a kind the column does not accept (then :func:`_value_problem` names it).
    """
    if name not in _json_kinds():
        return None
    kind, accepted = _json_kinds()[name]
    if any(v is not None and _JSON_KIND.get(type(v)) not in accepted for v in values):
        return None
    try:
        if kind == "float64":
            return pa.array([None if v is None else float(v) for v in values], pa.float64())
        return pa.array([v if v is None or isinstance(v, str) else str(v) for v in values], pa.string())
    except _BUILD_ERRORS:  # e.g. a lone surrogate: not text at all
        return None


def _value_problem(name: str, values: list, lines: list[int]) -> FileProblem:
    """Why ``values`` make no Arrow column: the first value that breaks it, found by bisection.

    Arrow's errors neither name the row nor survive every case (a list of lists after a list of numbers,
    an integer over 64 bits, a lone UTF-16 surrogate from a ``\\ud800`` JSON escape), so the column is
    rebuilt on prefixes: a prefix that fails keeps failing when it grows, so bisection finds the first
    bad value in ``log2(n)`` builds, paid only by a file that is already rejected.
    """
    lo, hi = 0, len(values)  # values[:lo] builds, values[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pa.array(values[:mid])
            lo = mid
        except _BUILD_ERRORS:
            hi = mid
    bad = hi - 1
    line = lines[bad] + 1
    try:
        pa.array(values[bad : bad + 1])
    except UnicodeEncodeError:
        return FileProblem("unreadable-file", f"line {line}: column {name!r} holds text that is not valid "
                           "Unicode (an unpaired surrogate such as \\ud800)", line - 1)  # fmt: skip
    except OverflowError:
        return FileProblem("column-type", f"column {name!r} holds an integer that does not fit in 64 bits "
                           f"(line {line})", line - 1)  # fmt: skip
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        return FileProblem(
            "column-type", f"column {name!r}: the value on line {line} is not valid ({e})", line - 1
        )
    before = next((v for v in values[:bad] if v is not None), None)
    return FileProblem(
        "column-type",
        f"column {name!r} mixes {_kind(before)} and {_kind(values[bad])} values (line {line})",
        line - 1,
    )


def _kind(value: object) -> str:
    """A JSON value's type in words, one level into lists (``list of numbers``)."""
    if isinstance(value, list):
        inner = next((v for v in value if v is not None), None)
        return "empty list" if inner is None else f"list of {_kind(inner)}s"
    return {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}.get(
        type(value), type(value).__name__
    )
