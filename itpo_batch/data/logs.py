"""Read logged conversations, batch by batch, into canonical polars frames.

Two input shapes (``schemas/logs.nested.schema.json``, ``schemas/logs.long.schema.json``), in Parquet or
JSON Lines, are detected from the column names and normalised to the canonical ``conversations`` and
``messages`` tables (``schemas/conversations.schema.json``, ``schemas/messages.schema.json``).

Design decisions:

* **Streaming.** Files arrive in record batches (:mod:`itpo_batch.data.raw`), so a file larger than
  memory is never loaded whole. Each batch is cast and exploded on its own by vectorised polars
  expressions; cross-row rules (duplicate ids, turn-index gaps of long logs whose rows are spread over
  batches) are checked later by :mod:`itpo_batch.data.validate` on compact columns.
* **Rows are named.** Every canonical row carries ``source_file`` and ``source_row`` (0-based row of
  the Parquet file, or line number − 1 of the JSON Lines file) so that errors can point at it.
* **Opening hash.** Each message gets ``msg_hash``, the low 64 bits of ``md5(role ␟ content)``
  (DuckDB's ``md5_number_lower``: stable across versions, unlike polars' hash, and 8 bytes a row).
  Groups formed without ``group_id`` use it.
* **Only the contract's columns are read**; any other input column is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from itpo_batch.data.raw import FileProblem
from itpo_batch.data.schemas import Field, TableSchema, load_schema, polars_dtype, type_accepted, type_class

Shape = Literal["nested", "long"]

CONVERSATION_LEVEL = ("outcome", "group_id", "task", "metadata", "oracle_turn_utility")


def detect_shape(columns: list[str]) -> Shape:
    """Nested if there is a ``messages`` column, long if there are ``role`` and ``content``."""
    for shape in ("nested", "long"):
        if all(c in columns for c in load_schema(f"logs.{shape}").detect_by):
            return shape  # type: ignore[return-value]
    raise FileProblem(
        "unknown-shape", f"columns {sorted(columns)} match neither the nested nor the long shape"
    )


def check_columns(schema: pa.Schema, table: TableSchema, *, batch: bool = False) -> None:
    """Raise ``duplicate-column`` / ``missing-column`` / ``column-type`` for the first problem of a schema.

    In a JSON Lines batch a required key may be absent from every line of the batch; that is reported
    per row (``null-value``) by the row checks, so ``batch=True`` skips the missing-column rule. Columns
    the contract does not name are ignored (and dropped by :func:`canonical_batch`), even when repeated.
    """
    present = set(schema.names)
    twice = sorted({n for n in table.names if schema.names.count(n) > 1})
    if twice:
        raise FileProblem("duplicate-column", f"column {twice[0]!r} appears more than once")
    for field in table.fields:
        if field.name not in present:
            if field.required and not batch:
                raise FileProblem("missing-column", f"required column {field.name!r} is missing")
            continue
        t = schema.field(field.name).type
        if not (pa.types.is_null(t) or (_nulls_fit(t, field) and type_accepted(t, field))):
            raise FileProblem(
                "column-type",
                f"column {field.name!r} has type {t}, expected {field.type} (accepted: {', '.join(field.accept)})",
            )


def _nulls_fit(t: pa.DataType, field: Field) -> bool:
    """A type with nulls inside (``list<null>``: only empty lists or null items) fits only a field that is
    at least that deep in lists: ``[]`` is a fine ``oracle_turn_utility`` but not a ``task`` string."""
    cls = type_class(t)
    return not cls.endswith("<null>") or field.type.startswith(cls.removesuffix("<null>") + "<")


@dataclass
class CanonicalBatch:
    """One input batch in canonical form; ``conversations`` is None for long logs (built later)."""

    conversations: pl.DataFrame | None
    messages: pl.DataFrame


def canonical_batch(batch: pa.RecordBatch, shape: Shape, rows: np.ndarray, file: str) -> CanonicalBatch:
    """Cast and explode one input batch (vectorised; no loop over rows).

    Only the columns of the shape's contract are read: an extra input column is ignored, so one named
    like a column this module adds (``source_row``, ``n_messages``, ``role`` in a nested file) changes nothing.
    Arrow's fixed-size lists become plain lists, and an unsigned ``turn_index`` over the int64 range is
    clipped to it (a turn-index gap, then, not a failed cast).
    """
    table = load_schema(f"logs.{shape}")
    df = pl.from_arrow(batch.select([n for n in batch.schema.names if n in table.names]))
    assert isinstance(df, pl.DataFrame)
    df = df.with_columns([pl.col(n).arr.to_list() for n, t in df.schema.items() if isinstance(t, pl.Array)])
    if df.schema.get("turn_index") == pl.UInt64:
        df = df.with_columns(pl.col("turn_index").clip(upper_bound=2**63 - 1))
    df = _fill_missing(df, table)
    df = df.with_columns(
        source_row=pl.Series(rows, dtype=pl.Int64),
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
