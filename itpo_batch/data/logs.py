"""Read logged conversations, batch by batch, into canonical polars frames.

Two input shapes (``schemas/logs.nested.schema.json``, ``schemas/logs.long.schema.json``), in Parquet or
JSON Lines, are detected from the column names and normalised to the canonical ``conversations`` and
``messages`` tables (``schemas/conversations.schema.json``, ``schemas/messages.schema.json``).

Design decisions:

* **Streaming.** Files are read in record batches (Parquet row batches; JSON Lines in chunks of lines),
  so a file larger than memory is never loaded whole. Each batch is cast and exploded on its own by
  vectorised polars expressions; cross-row rules (duplicate ids, turn-index gaps of long logs whose rows
  are spread over batches) are checked later by :mod:`itpo_batch.data.validate` on compact columns.
* **Rows are named.** Every canonical row carries ``source_file`` and ``source_row`` (0-based row of
  the Parquet file, or line number − 1 of the JSON Lines file) so that errors can point at it.
* **Opening hash.** Each message gets ``msg_hash``, the low 64 bits of ``md5(role ␟ content)``
  (DuckDB's ``md5_number_lower``: stable across versions, unlike polars' hash, and 8 bytes a row).
  Groups formed without ``group_id`` use it.
* JSON Lines are parsed line by line with the standard library: this names the exact line of a
  truncated or malformed record, which Arrow's block reader cannot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from itpo_batch.data.schemas import TableSchema, load_schema, polars_dtype, type_accepted, validation_rules

Format = Literal["parquet", "jsonl"]
Shape = Literal["nested", "long"]

CONVERSATION_LEVEL = ("outcome", "group_id", "task", "metadata", "oracle_turn_utility")


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


def detect_shape(columns: list[str]) -> Shape:
    """Nested if there is a ``messages`` column, long if there are ``role`` and ``content``."""
    for shape in ("nested", "long"):
        if all(c in columns for c in load_schema(f"logs.{shape}").detect_by):
            return shape  # type: ignore[return-value]
    raise FileProblem(
        "unknown-shape", f"columns {sorted(columns)} match neither the nested nor the long shape"
    )


def iter_raw_batches(path: Path, batch_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(first_row, batch)`` for a Parquet or JSON Lines file, raising :class:`FileProblem`."""
    fmt = detect_format(path)
    if not path.is_file():
        raise FileProblem("unreadable-file", "no such file")
    if fmt == "parquet":
        yield from _parquet_batches(path, batch_size)
    else:
        yield from _jsonl_batches(path, batch_size)


def _parquet_batches(path: Path, batch_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    try:
        # pre_buffer=False: with pre-buffering Arrow keeps every column chunk it has read in its pool
        # until the file is closed, so memory grew with the file (measured: 356 MiB pool for 1.2 GiB).
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise FileProblem("unreadable-file", f"not a readable Parquet file ({e})") from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            yield row, batch
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise FileProblem("unreadable-file", f"Parquet data is corrupt or truncated ({e})", row) from None


def _jsonl_batches(path: Path, batch_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    records: list[dict] = []
    first = 0
    try:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh):
                if not line.strip():
                    continue
                if not records:
                    first = lineno
                records.append(_parse_line(line, lineno))
                if len(records) == batch_size:
                    yield first, _records_to_batch(records, first)
                    records = []
    except UnicodeDecodeError as e:
        raise FileProblem("unreadable-file", f"not UTF-8 text ({e})") from None
    except OSError as e:
        raise FileProblem("unreadable-file", str(e)) from None
    if records:
        yield first, _records_to_batch(records, first)


def _parse_line(line: bytes, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise FileProblem(
            "unreadable-file", f"line {lineno + 1} is not valid JSON ({e.msg})", lineno
        ) from None
    if not isinstance(rec, dict):
        raise FileProblem("unreadable-file", f"line {lineno + 1} is not a JSON object", lineno)
    return rec


def _records_to_batch(records: list[dict], first: int) -> pa.RecordBatch:
    """Build an Arrow batch column by column so a type clash names its column (and a line)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    arrays = []
    for name in names:
        values = [r.get(name) for r in records]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds = [type(v).__name__ for v in values]
            bad = next(i for i, k in enumerate(kinds) if k not in ("NoneType", kinds[0]))
            raise FileProblem(
                "column-type",
                f"column {name!r} mixes {kinds[0]} and {kinds[bad]} values (line {first + bad + 1})",
                first + bad,
            ) from None
    return pa.RecordBatch.from_arrays(arrays, names=names)


def check_columns(schema: pa.Schema, table: TableSchema, *, batch: bool = False) -> None:
    """Raise ``missing-column`` / ``column-type`` for the first problem of an input schema.

    In a JSON Lines batch a required key may be absent from every line of the batch; that is reported
    per row (``null-value``) by the row checks, so ``batch=True`` skips the missing-column rule.
    """
    present = set(schema.names)
    for field in table.fields:
        if field.name not in present:
            if field.required and not batch:
                raise FileProblem("missing-column", f"required column {field.name!r} is missing")
            continue
        t = schema.field(field.name).type
        if not (pa.types.is_null(t) or type_accepted(t, field)):
            raise FileProblem(
                "column-type",
                f"column {field.name!r} has type {t}, expected {field.type} (accepted: {', '.join(field.accept)})",
            )


@dataclass
class CanonicalBatch:
    """One input batch in canonical form; ``conversations`` is None for long logs (built later)."""

    conversations: pl.DataFrame | None
    messages: pl.DataFrame


def canonical_batch(batch: pa.RecordBatch, shape: Shape, first_row: int, file: str) -> CanonicalBatch:
    """Cast and explode one input batch (vectorised; no loop over rows)."""
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    df = _fill_missing(df, load_schema(f"logs.{shape}"))
    df = df.with_columns(
        source_row=pl.int_range(pl.len(), dtype=pl.Int64) + first_row,
        source_file=pl.lit(file, dtype=pl.Categorical),  # 4 bytes a row, not the path
        conversation_id=pl.col("conversation_id").cast(pl.String),
        group_id=pl.col("group_id").cast(pl.String),
        outcome=pl.col("outcome").cast(pl.Float64),
        metadata=_json_expr(df.schema["metadata"]),
        oracle_turn_utility=pl.col("oracle_turn_utility").cast(pl.List(pl.Float64)),
    )
    if shape == "nested":
        return _nested(df)
    msgs = df.with_columns(
        turn_index=pl.col("turn_index").cast(pl.Int64),
        behavior_logprobs=pl.col("behavior_logprobs").cast(pl.List(pl.Float64)),
    )
    return CanonicalBatch(None, _with_hash(msgs))


def _fill_missing(df: pl.DataFrame, table: TableSchema) -> pl.DataFrame:
    """Absent or all-null optional columns become typed nulls, so later expressions see one dtype."""
    empty = [f for f in table.fields if f.name not in df.columns or df.schema[f.name] == pl.Null]
    df = df.with_columns([pl.lit(None, dtype=polars_dtype(f.type)).alias(f.name) for f in empty])
    return df.with_columns(
        [pl.col(c).cast(pl.String) for c in ("task", "role", "content") if c in df.columns]
    )


def _json_expr(dtype: pl.DataType) -> pl.Expr:
    """Metadata as a JSON string: structs are encoded; Arrow maps arrive as lists of key/value structs."""
    col = pl.col("metadata")
    if isinstance(dtype, pl.Struct):
        return col.struct.json_encode()
    if isinstance(dtype, pl.List):
        items = col.list.eval(pl.element().struct.json_encode()).list.join(",")
        return pl.concat_str(pl.lit("["), items, pl.lit("]"))
    return col.cast(pl.String)


def _nested(df: pl.DataFrame) -> CanonicalBatch:
    df = df.with_columns(n_messages=pl.col("messages").list.len().fill_null(0).cast(pl.Int32))
    msgs = (
        df.select("conversation_id", "source_row", "source_file", "messages")
        .filter(pl.col("messages").list.len() > 0)
        .explode("messages")
        .with_columns(
            role=pl.col("messages").struct.field("role").cast(pl.String),
            content=pl.col("messages").struct.field("content").cast(pl.String),
            turn_index=pl.int_range(pl.len(), dtype=pl.Int64).over("source_row"),
        )
        .drop("messages")
    )
    msgs = _number_assistant_turns(msgs, "source_row")
    n_asst = msgs.group_by("source_row").agg(
        n_assistant_turns=(pl.col("role") == "assistant").sum().cast(pl.Int32)
    )
    conv = df.join(n_asst, on="source_row", how="left").with_columns(pl.col("n_assistant_turns").fill_null(0))
    lp = _explode_behavior(df)
    msgs = msgs.join(lp, on=["source_row", "assistant_turn"], how="left")
    conv = conv.with_columns(n_behavior=pl.col("behavior_logprobs").list.len()).drop(
        "messages", "behavior_logprobs"
    )
    return CanonicalBatch(conv, _with_hash(msgs))


def _number_assistant_turns(msgs: pl.DataFrame, by: str) -> pl.DataFrame:
    is_asst = pl.col("role") == "assistant"
    return msgs.with_columns(
        assistant_turn=pl.when(is_asst).then(is_asst.cast(pl.Int32).cum_sum().over(by) - 1).otherwise(None)
    )


def _explode_behavior(df: pl.DataFrame) -> pl.DataFrame:
    lp = df.select("source_row", pl.col("behavior_logprobs").cast(pl.List(pl.List(pl.Float64))))
    lp = lp.filter(pl.col("behavior_logprobs").list.len() > 0).explode("behavior_logprobs")
    return lp.with_columns(assistant_turn=pl.int_range(pl.len(), dtype=pl.Int32).over("source_row"))


@cache
def _duck() -> duckdb.DuckDBPyConnection:
    """One in-memory DuckDB connection per process for hashing (opening one per batch costs ms)."""
    return duckdb.connect()


def _with_hash(msgs: pl.DataFrame) -> pl.DataFrame:
    """Add ``msg_hash`` (low 64 bits of md5 of role ␟ content) used to form groups by opening messages."""
    pair = msgs.select(role=pl.col("role").fill_null(""), content=pl.col("content").fill_null("")).to_arrow()
    cur = _duck().cursor()
    try:
        cur.register("pair", pair)
        hashes = cur.sql(
            "SELECT md5_number_lower(role || chr(31) || content) AS h FROM pair"
        ).to_arrow_table()
    finally:
        cur.close()
    return msgs.with_columns(msg_hash=pl.from_arrow(hashes.column("h")))
