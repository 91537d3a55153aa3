"""``itpo-batch sql``: query a run's scored turns with DuckDB, read-only (see :mod:`itpo_batch.data.sql`)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer
from rich.table import Table
from rich.text import Text

from itpo_batch.cli.common import Format, OverwriteOpt, err, format_option, out, user_errors
from itpo_batch.data.io import claim_output
from itpo_batch.data.sql import QueryError, Rows, RunDatabase, write_rows
from itpo_batch.data.store import find_run

FORMATS = (Format.table, Format.json, Format.jsonl, Format.csv, Format.markdown, Format.parquet)
_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet", ".md": "markdown"}


@user_errors
def sql(
    query: Annotated[str, typer.Argument(help="One read-only statement; '-' reads it from stdin.")],
    run: Annotated[
        Path | None,
        typer.Option("--run", help="Run directory to read (default: the most recent under ./runs)."),
    ] = None,
    fmt: Annotated[
        Format | None, format_option(*FORMATS, help="Output format (default: from -o's suffix, else table).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE (atomically) instead of stdout.")
    ] = None,
    overwrite: OverwriteOpt = False,
    max_rows: Annotated[int, typer.Option(help="Rows shown by --format table (0: all).")] = 100,
    max_width: Annotated[int, typer.Option(help="Characters shown per cell by --format table.")] = 60,
) -> None:
    """Query a run with SQL (DuckDB): views turns, conversations, messages and rounds, read-only.

    Columns are those of schemas/turns.schema.json, scored_conversations.schema.json,
    messages.schema.json and metrics.jsonl, with the partition columns method and round first.
    Statements that could write or change settings are refused with exit code 2.

    Example: itpo-batch sql "SELECT method, round, avg(implicit_reward) FROM turns GROUP BY ALL ORDER BY ALL" --run runs/demo
    """
    text = sys.stdin.read() if query == "-" else query
    kind = _resolve_format(fmt, output)
    rundir = find_run(run)
    claim = claim_output(output, "file", "sql", overwrite=overwrite) if output is not None else None
    if run is None:
        err.print(Text(f"run: {rundir.path}", style="dim"), highlight=False)
    with RunDatabase(rundir) as db, db.stream(text) as rows:
        if kind == "table":
            out.print(_table(rows, max_rows, max_width, out.width))
        elif claim is None:
            _to_stdout(rows, kind)
        else:
            with claim.atomic() as tmp, open(tmp, "wb") as sink:
                n = write_rows(rows, kind, sink)
            err.print(Text(f"wrote {n:,} rows to {output}", style="dim"), highlight=False)


def _to_stdout(rows: Rows, kind: str) -> None:
    """Stream to stdout; a reader that stops early (``| head``) ends the command quietly."""
    try:
        write_rows(rows, kind, sys.stdout.buffer)
        sys.stdout.flush()
    except OSError as e:
        # polars reports a closed pipe as a plain OSError("Broken pipe (os error 32)"), without errno.
        if not (isinstance(e, BrokenPipeError) or e.errno == errno.EPIPE or "os error 32" in str(e)):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def _resolve_format(fmt: Format | None, output: Path | None) -> str:
    if fmt is None:
        if output is None:
            return "table"
        if output.suffix.lower() not in _SUFFIXES:
            raise QueryError(
                f"cannot tell the format from {output.name}; pass --format csv|json|jsonl|markdown|parquet"
            )
        return _SUFFIXES[output.suffix.lower()]
    if fmt is Format.parquet and output is None:
        raise QueryError("--format parquet needs -o FILE (Parquet is binary)")
    if fmt is Format.table and output is not None:
        raise QueryError(
            "--format table is for the terminal; use csv, json, jsonl, markdown or parquet with -o"
        )
    return fmt.value


def _table(rows: Rows, max_rows: int, max_width: int, width: int) -> Table:
    """A rich table of the first ``max_rows`` rows (the rest are counted, not shown).

    Like DuckDB's own shell, columns that do not fit the terminal are left out from the middle and
    replaced by one "…" column; the caption says how many rows and columns are shown.
    """
    names = rows.schema.names
    cells: list[list[Text]] = []
    total = 0
    for batch in rows.batches:
        keep = batch.num_rows if max_rows <= 0 else max(0, min(batch.num_rows, max_rows - total))
        cells += [[_cell(v, max_width) for v in row.values()] for row in batch.slice(0, keep).to_pylist()]
        total += batch.num_rows
    widths = [max([len(n), *(c[i].cell_len for c in cells)]) + 3 for i, n in enumerate(names)]
    shown = _fit_columns(widths, width)
    table = Table(show_edge=False, header_style="bold")
    for i in shown:
        if i < 0:
            table.add_column("…", no_wrap=True)
            continue
        numeric = pa.types.is_integer(rows.schema.types[i]) or pa.types.is_floating(rows.schema.types[i])
        table.add_column(names[i], justify="right" if numeric else "left", no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*(row[i] if i >= 0 else Text("…") for i in shown))
    noun = "row" if total == 1 else "rows"
    caption = f"{total:,} {noun}" if len(cells) == total else f"{len(cells):,} of {total:,} rows (--max-rows)"
    n_cols = sum(i >= 0 for i in shown)
    if n_cols < len(names):
        caption += f", {n_cols} of {len(names)} columns (select fewer, or --format csv)"
    table.caption = caption
    return table


def _fit_columns(widths: list[int], width: int) -> list[int]:
    """Indices of the columns to show, from both ends inwards; -1 marks the elided middle."""
    if sum(widths) <= width or len(widths) <= 2:
        return list(range(len(widths)))
    left, right, used = [], [], 4  # room for the "…" column
    lo, hi = 0, len(widths) - 1
    while lo <= hi:
        take_left = len(left) <= len(right)
        i = lo if take_left else hi
        if used + widths[i] > width and (left or right):
            break
        used += widths[i]
        if take_left:
            left.append(i)
            lo += 1
        else:
            right.insert(0, i)
            hi -= 1
    return [*left, -1, *right] if lo <= hi else [*left, *right]


def _cell(value: Any, max_width: int) -> Text:
    if value is None:
        return Text("NULL", style="dim")
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value).replace("\r", " ").replace("\n", "⏎")
    if max_width > 0 and len(text) > max_width:
        text = text[: max(1, max_width - 1)] + "…"
    return Text(text)
