"""Read-only SQL over a run directory with DuckDB: views ``turns``, ``conversations``, ``messages``, ``rounds``.

The views are defined once, in ``schemas/views.sql`` (``{run}`` stands for the run directory), over the
hive-partitioned Parquet files and ``metrics.jsonl`` of :mod:`itpo_batch.data.store`'s layout.

Design decisions:

* **A view whose files do not exist yet is created empty**, with the columns of its schema
  (``run_layout.json`` "views") and the partition columns, rather than left out: ``SELECT * FROM rounds``
  on a run that has not finished a round returns no rows with the right columns, and a query that
  names a column of it still binds. (DuckDB itself would fail the whole command: ``read_parquet`` of a
  glob that matches nothing is an error.) Zero-byte files count as missing.
* **Read-only, in three independent layers**, each tested on its own (``tests/test_sql.py``):

  1. *DuckDB's parser* (``extract_statements``): exactly one statement, of type SELECT (which covers
     FROM-first queries, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT with an IN list), or EXPLAIN
     [ANALYZE] of such a SELECT (the explained statement is parsed again, since EXPLAIN ANALYZE runs it).
     COPY, EXPORT, ATTACH, DETACH, INSTALL, LOAD, CREATE, DROP, ALTER, INSERT, UPDATE, DELETE, MERGE,
     SET, RESET, USE, PRAGMA, CALL, CHECKPOINT, VACUUM, PREPARE, EXECUTE and transactions are refused.
  2. *A read-only transaction* (``BEGIN TRANSACTION READ ONLY``, rolled back after every query): DuckDB
     parses ``WITH x AS (INSERT ... RETURNING *) SELECT ...`` as a SELECT and runs the INSERT; inside a
     read-only transaction the engine refuses it.
  3. *DuckDB's own lock-down*, set after the views exist: ``enable_external_access = false`` (no COPY
     TO/FROM, no file readers, no extension INSTALL/LOAD, no network) with ``allowed_paths`` = the globs
     of the views plus the files they matched when the connection opened, ``temp_directory = ''`` (else
     DuckDB quietly allows the working directory's ``.tmp/``), extension auto-install/auto-load off, and
     ``lock_configuration = true`` (no SET/RESET/PRAGMA that changes a setting, including turning
     external access back on). Found by experiment on DuckDB 2.0.0: ``allowed_directories`` grants
     *write* access as well (``COPY ... TO 'run/x.csv'`` succeeds), and ``allowed_paths`` is needed
     per file (the glob string alone lets ``glob()`` list but not read), so files only, never
     directories, are allowed: no new file can be created anywhere, and nothing outside the run's view
     files can be read (``/etc/passwd``, the run's ``config.yaml``, ``../`` paths). DuckDB checks path
     strings, so a symlink inside the run directory is followed; the run directory is the user's own.

  Left to layer 1 alone (found by experiment): overwriting one of the allowed data files in place,
  ``COPY ... TO '<that file>' (USE_TMP_FILE false)``; a plain COPY writes a ``tmp_`` file first and is refused.
  The connection is in memory and thrown away, so temporary objects a SELECT may create (CSV
  ``store_rejects`` tables) never outlive the command.
* **Spilling is off** (``temp_directory = ''``): queries run in memory (DuckDB's memory limit, 80% of
  RAM). 1M scored turns with their text take a few hundred MB (``bench/duckdb_turns.py``).
* **Results stream** (``to_arrow_reader``) into the writers, so ``--format csv`` of millions of rows
  never holds them all; the reader is closed and the transaction rolled back before the next query
  (DuckDB 2 keeps the connection busy while a reader is open).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.schemas import arrow_type, load_schema, run_layout, views_sql
from itpo_batch.data.store import RunDir, find_run

FORMATS = ("csv", "json", "jsonl", "markdown", "parquet")
ALLOWED = (
    "SELECT, FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT ... IN (...), EXPLAIN [ANALYZE] SELECT"
)
_EXPLAIN = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^()]*\)\s*)?", re.IGNORECASE)
_VIEW = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(\w+)", re.IGNORECASE)
_RUN_PATH = re.compile(r"'\{run\}(/[^']*)'")
_HINT = "itpo-batch sql reads only the run's view files (turns, conversations, messages, rounds)"


class QueryError(ItpoError):
    """A query failed (DuckDB's message, e.g. a syntax error or an unknown column)."""


class ReadOnlyError(QueryError):
    """A statement that could write, change the database or change settings was refused."""


class Rows(NamedTuple):
    """A query result as a stream: its Arrow schema and its record batches."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the one read statement in ``sql``; :class:`ReadOnlyError` for anything else."""
    statements = _parse(con, sql)
    if not statements:
        raise QueryError("empty query")
    if len(statements) > 1:
        raise ReadOnlyError(f"one statement per query, got {len(statements)}: itpo-batch sql is read-only")
    text, kind = statements[0]
    if kind == "EXPLAIN":
        if _explained_kinds(con, text) != ["SELECT"]:
            raise ReadOnlyError(
                f"EXPLAIN is allowed only of a SELECT: itpo-batch sql is read-only ({ALLOWED})"
            )
    elif kind == "MULTI":
        raise ReadOnlyError(
            "a PIVOT without IN (...) runs several statements; list the values: PIVOT t ON c IN ('a', 'b')"
        )
    elif kind != "SELECT":
        raise ReadOnlyError(f"{kind} statements are refused: itpo-batch sql is read-only ({ALLOWED})")
    return text


def _explained_kinds(con: duckdb.DuckDBPyConnection, text: str) -> list[str]:
    """Statement types of what an EXPLAIN statement explains (empty when that cannot be told)."""
    head = _EXPLAIN.match(text)
    try:
        return [kind for _, kind in _parse(con, text[head.end() :])] if head else []
    except QueryError:
        return []


def _parse(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[str, str]]:
    """(text, statement type) of each statement, from DuckDB's own parser."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    parsed = []
    for st in statements:
        try:
            kind = st.type.name
        except ValueError:  # a statement type the Python client has no name for (e.g. UPDATE EXTENSIONS)
            kind = "unrecognised"
        parsed.append((st.query, kind))
    return parsed


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duckdb_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _duckdb_type(t.value_type) + "[]"
    if pa.types.is_struct(t):
        inner = ", ".join(f'"{f.name}" {_duckdb_type(f.type)}' for f in t)
        return f"STRUCT({inner})"
    names = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "float": "FLOAT"}
    names |= {"double": "DOUBLE", "bool": "BOOLEAN"}
    return names[str(t)]


def empty_view_sql(view: str) -> str:
    """``CREATE VIEW`` of no rows with the view's columns: partition columns, then its schema's fields."""
    layout = run_layout()
    columns = [(c["name"], c["type"]) for c in layout["partition_columns"]]
    taken = {name for name, _ in columns}
    columns += [(f.name, f.type) for f in load_schema(layout["views"][view]).fields if f.name not in taken]
    select = ", ".join(f'CAST(NULL AS {_duckdb_type(arrow_type(t))}) AS "{n}"' for n, t in columns)
    return f"CREATE VIEW {view} AS SELECT {select} WHERE false"


@functools.cache
def _view_templates() -> list[tuple[str, str]]:
    """(view name, statement with ``{run}``) for each statement of ``schemas/views.sql``."""
    scratch = duckdb.connect(":memory:")
    try:
        texts = [text for text, _ in _parse(scratch, views_sql())]
    finally:
        scratch.close()
    views = []
    for text in texts:
        match = _VIEW.search(text)
        if match is None:
            raise ValueError(f"schemas/views.sql: not a CREATE VIEW statement: {text[:80]!r}")
        views.append((match.group(1), text))
    return views


class RunDatabase:
    """An in-memory DuckDB connection with read-only views over one run directory.

    Example::

        with RunDatabase("runs/demo") as db:
            table = db.query("SELECT method, round, avg(implicit_reward) FROM turns GROUP BY ALL")
    """

    def __init__(self, run: RunDir | Path | str | None = None, threads: int | None = None):
        self.run = run if isinstance(run, RunDir) else find_run(run)
        root = self.run.path.resolve()
        if any(ch in str(root) for ch in "*?[]{}"):
            raise QueryError(f"run directory {root}: glob characters in the path are not supported")
        self.con = duckdb.connect(":memory:")
        try:
            if threads:
                self.con.execute(f"SET threads = {int(threads)}")
            allowed: list[str] = []
            self.views = {
                name: self._create_view(name, text, root, allowed) for name, text in _view_templates()
            }
            self._lock_down(allowed)
        except BaseException:
            self.con.close()
            raise

    def _create_view(self, name: str, template: str, root: Path, allowed: list[str]) -> int:
        """Create one view; return how many files it reads (0: created empty)."""
        patterns = [str(root) + rel for rel in _RUN_PATH.findall(template)]
        files = []
        for pattern in patterns:
            found = [r[0] for r in self.con.execute("SELECT file FROM glob(?)", [pattern]).fetchall()]
            found = [f for f in found if Path(f).stat().st_size > 0]
            if not found:
                self.con.execute(empty_view_sql(name))
                return 0
            files += found
        try:
            self.con.execute(template.replace("{run}", _sql_string(str(root))[1:-1]))
        except duckdb.Error as e:
            raise QueryError(f"cannot create view {name} over {root}: {e}") from None
        allowed += patterns + files
        return len(files)

    def _lock_down(self, allowed: list[str]) -> None:
        self.con.execute("SET temp_directory = ''")
        self.con.execute("SET allowed_paths = ?", [allowed])
        self.con.execute("SET autoinstall_known_extensions = false")
        self.con.execute("SET autoload_known_extensions = false")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    @contextlib.contextmanager
    def stream(self, sql: str, batch_size: int = 65_536) -> Iterator[Rows]:
        """Run one read statement; yield its schema and batches (valid inside the ``with`` only)."""
        text = check_read_only(self.con, sql)
        self.con.execute("BEGIN TRANSACTION READ ONLY")
        reader = None
        try:
            try:
                rel = self.con.sql(text)
                if rel is None:
                    raise ReadOnlyError(f"the statement returned no rows: {ALLOWED}")
                reader = rel.to_arrow_reader(batch_size)
            except duckdb.Error as e:
                raise _query_error(e) from None
            yield Rows(reader.schema, _checked(reader))
        finally:
            if reader is not None:
                reader.close()
            self.con.execute("ROLLBACK")

    def query(self, sql: str) -> pa.Table:
        """Run one read statement and return all its rows."""
        with self.stream(sql) as rows:
            return pa.Table.from_batches(list(rows.batches), schema=rows.schema)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> RunDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The reader's batches; an error DuckDB raises while producing them becomes a :class:`QueryError`."""
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException, duckdb.Error) as e:
            raise _query_error(e) from None
        yield batch


def _query_error(e: Exception) -> QueryError:
    message = str(e)
    if isinstance(e, duckdb.PermissionException) or "disabled by configuration" in message:
        return ReadOnlyError(f"{message}\n({_HINT})")
    if "read-only mode" in message:
        return ReadOnlyError(f"{message}\n(the query writes to the database: itpo-batch sql is read-only)")
    if "configuration has been locked" in message:
        return ReadOnlyError(f"{message}\n(settings cannot be changed: itpo-batch sql is read-only)")
    return QueryError(message)


def query(run: RunDir | Path | str | None, sql: str) -> pa.Table:
    """One-shot: open the run's views, run one read statement, return its rows."""
    with RunDatabase(run) as db:
        return db.query(sql)


# ---- writers ----------------------------------------------------------------------------------------
def write_rows(rows: Rows, fmt: str, sink: BinaryIO) -> int:
    """Write a result as ``csv``, ``json`` (an array of objects), ``jsonl``, ``markdown`` (a GitHub table)
    or ``parquet``; return rows."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        return _write_parquet(rows, sink)
    if fmt == "markdown":
        return _write_markdown(rows, sink)
    import polars as pl

    n = 0
    if fmt == "json":
        sink.write(b"[")
    for batch in rows.batches:
        df = pl.from_arrow(_json_nested(batch) if fmt == "csv" else batch)
        if fmt == "csv":
            df.write_csv(sink, include_header=n == 0)
        elif fmt == "jsonl":
            df.write_ndjson(sink)
        elif batch.num_rows:
            body = _ndjson(df).rstrip(b"\n").replace(b"\n", b",\n")
            sink.write((b"\n" if n == 0 else b",\n") + body)
        n += batch.num_rows
    if fmt == "csv" and n == 0:
        sink.write((",".join(_csv_field(c) for c in rows.schema.names) + "\n").encode())
    if fmt == "json":
        sink.write(b"\n]\n" if n else b"]\n")
    return n


def _ndjson(df: object) -> bytes:
    import io

    buf = io.BytesIO()
    df.write_ndjson(buf)  # type: ignore[attr-defined]
    return buf.getvalue()


def _csv_field(name: str) -> str:
    return '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n\r') else name


def _json_nested(batch: pa.RecordBatch) -> pa.RecordBatch:
    """CSV cannot hold lists or structs: write them as JSON text."""
    nested = [i for i, f in enumerate(batch.schema) if pa.types.is_nested(f.type)]
    for i in nested:
        values = [None if v is None else json.dumps(v, default=str) for v in batch.column(i).to_pylist()]
        batch = batch.set_column(i, batch.schema.field(i).name, pa.array(values, pa.string()))
    return batch


def _write_markdown(rows: Rows, sink: BinaryIO) -> int:
    """A GitHub-flavoured table: numbers right-aligned, NULL empty, lists and structs as JSON text, ``|``
    escaped and line breaks as ``<br>`` so that a cell stays in its row. Streams batch by batch."""
    import polars as pl

    names = [n.replace("|", "\\|") for n in rows.schema.names]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
               for f in rows.schema]  # fmt: skip
    sink.write(("| " + " | ".join(names) + " |\n").encode())
    sink.write(("|" + "|".join("---:" if num else "---" for num in numeric) + "|\n").encode())
    n = 0
    for batch in rows.batches:
        if not batch.num_rows:
            continue
        df = pl.from_arrow(_json_nested(batch))
        assert isinstance(df, pl.DataFrame)
        cells = [
            pl.col(c).cast(pl.String).fill_null("").str.replace_all("|", "\\|", literal=True)
            .str.replace_all("\r\n", "<br>", literal=True).str.replace_all("\n", "<br>", literal=True)
            for c in df.columns
        ]  # fmt: skip
        lines = df.select(pl.concat_str([pl.lit("| "), pl.concat_str(cells, separator=" | "), pl.lit(" |")]))
        sink.write(("\n".join(lines.to_series().to_list()) + "\n").encode())
        n += batch.num_rows
    return n


def _write_parquet(rows: Rows, sink: BinaryIO) -> int:
    n = 0
    with pq.ParquetWriter(sink, rows.schema, compression="zstd") as writer:
        for batch in rows.batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n
