"""The run directory: where a run's tables, metrics, config and checkpoints live.

Layout (``schemas/run_layout.json``; nothing of it is restated here beyond reading that file)::

    runs/NAME/config.yaml  metrics.jsonl  report.md
    runs/NAME/turns/method=M/round=R/part-0.parquet          (schemas/turns.schema.json)
    runs/NAME/conversations/method=M/round=R/part-0.parquet  (schemas/scored_conversations.schema.json)
    runs/NAME/messages/method=M/round=R/part-0.parquet       (schemas/messages.schema.json)
    runs/NAME/checkpoints/method=M/round=R/{policy,prm,qvalue}/

Design decisions:

* **Hive partitions, one file each.** ``method`` and ``round`` live in the path only, so DuckDB reads
  every arm and round with one glob (``schemas/views.sql``). :meth:`RunDir.write_partition` drops them
  from the table (after checking that, if present, they hold the partition's values).
* **Contracts are enforced at the boundary.** A partition is checked against its schema file before
  it is written: unknown columns, missing required columns, types outside ``accept``, nulls in
  required columns, values outside a field's ``values`` and non-finite floats are refused with a
  :class:`StoreError` naming the table and column ("NaN cannot spread" starts here). Optional columns
  that are absent are written as nulls, so every partition has the same columns in schema order.
* **Atomic writes.** Parquet files and ``config.yaml`` go through :mod:`itpo_batch.data.io` (temporary file,
  then ``os.replace``); a crash leaves the old file or the new one, never half of one.
* **metrics.jsonl is rewritten, not appended.** :meth:`RunDir.append_metrics` writes the whole file
  (old lines plus the new one) to a temporary file, fsyncs it and replaces the old one, under an
  ``flock`` on the run directory. O_APPEND with one ``write`` would be O(1), but a short write (disk
  full) or a power loss can leave half a line, which would break every later read; the file has one
  line per (method, round), so rewriting it costs nothing, and the lock keeps two writers (two arms in
  two processes) from losing each other's lines.
* **One metrics line per (method, round), written last.** It is the round's commit point:
  :meth:`RunDir.completed_rounds` reads it, so ``iterate --resume`` restarts after the last round
  whose metrics were recorded, even if that round's partitions or checkpoints were written before a
  crash. A second line for the same (method, round) is refused. Non-finite floats become ``null``
  (JSON has no NaN, and DuckDB's JSON reader refuses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import atomic_path, write_parquet
from itpo_batch.data.schemas import Field, TableSchema, arrow_type, load_schema, run_layout, type_accepted


class StoreError(ItpoError):
    """A run directory, or something to be written into it, breaks the run layout or a table contract."""


def layout() -> dict[str, Any]:
    """``schemas/run_layout.json``."""
    return run_layout()


def partition_columns() -> list[str]:
    """Names of the hive partition columns, in path order (``method``, ``round``)."""
    return [c["name"] for c in layout()["partition_columns"]]


def table_schema(table: str) -> TableSchema:
    """The contract of a run table (``turns``, ``conversations``, ``messages``)."""
    tables = layout()["tables"]
    if table not in tables:
        raise StoreError(f"unknown run table {table!r}; known: {', '.join(tables)}")
    return load_schema(tables[table]["schema"])


def check_partition(method: str, round: int) -> None:
    """Refuse partition values that would not make a clean ``method=M/round=R`` path."""
    spec = {c["name"]: c for c in layout()["partition_columns"]}
    if not isinstance(method, str) or not re.fullmatch(spec["method"]["pattern"], method):
        raise StoreError(f"method {method!r} must match {spec['method']['pattern']}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise StoreError(f"round must be a non-negative integer, got {round!r}")


def conform(table: str, data: pa.Table) -> pa.Table:
    """Check ``data`` against the table's schema and cast it to the canonical columns and types."""
    schema = table_schema(table)
    unknown = [c for c in data.column_names if c not in schema.names]
    if unknown:
        raise StoreError(f"{table}: columns not in schemas/{schema.name}.schema.json: {', '.join(unknown)}")
    missing = [c for c in schema.required if c not in data.column_names]
    if missing:
        raise StoreError(f"{table}: missing required columns: {', '.join(missing)}")
    columns = [_conform_column(table, f, data) for f in schema.fields]
    return pa.Table.from_arrays(columns, schema=schema.arrow_schema())


def _conform_column(table: str, field: Field, data: pa.Table) -> pa.ChunkedArray:
    target = arrow_type(field.type)
    if field.name not in data.column_names:
        return pa.chunked_array([pa.nulls(data.num_rows, target)], type=target)
    col = data.column(field.name)
    where = f"{table}.{field.name}"
    if col.type != target and not type_accepted(col.type, field):
        raise StoreError(f"{where}: type {col.type} is not one of {', '.join(field.accept)}")
    try:
        col = col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise StoreError(f"{where}: cannot cast {col.type} to {field.type}: {e}") from None
    if field.required and col.null_count:
        raise StoreError(f"{where}: {col.null_count} null values in a required column")
    if pa.types.is_floating(target):
        bad = len(col) - col.null_count - (pc.sum(pc.is_finite(col)).as_py() or 0)
        if bad:
            raise StoreError(f"{where}: {bad} NaN or infinite values")
    if field.values:
        outside = pc.unique(pc.filter(col, pc.invert(pc.is_in(col, pa.array(field.values))))).to_pylist()
        outside = [v for v in outside if v is not None]
        if outside:
            raise StoreError(f"{where}: values {outside[:5]} not in {list(field.values)}")
    return col


def _drop_partition_columns(data: pa.Table, values: dict[str, Any]) -> pa.Table:
    for name, value in values.items():
        if name not in data.column_names:
            continue
        held = pc.unique(data.column(name)).to_pylist()
        if any(str(v) != str(value) for v in held):
            raise StoreError(f"column {name} holds {held[:5]}, but the partition is {name}={value}")
        data = data.drop_columns([name])
    return data


@dataclass(frozen=True)
class RunDir:
    """A run directory. Paths are computed from ``schemas/run_layout.json``; nothing is created until written."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ---- paths ------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / layout()["files"]["config"]

    @property
    def metrics_path(self) -> Path:
        return self.path / layout()["files"]["metrics"]

    @property
    def report_path(self) -> Path:
        return self.path / layout()["files"]["report"]

    def table_dir(self, table: str) -> Path:
        table_schema(table)  # refuses unknown tables
        return self.path / layout()["tables"][table]["directory"]

    def partition_dir(self, table: str, method: str, round: int) -> Path:
        check_partition(method, round)
        return self.table_dir(table) / f"method={method}" / f"round={round}"

    def partition_path(self, table: str, method: str, round: int) -> Path:
        return self.partition_dir(table, method, round) / layout()["partition_file"]

    def checkpoint_dir(self, method: str, round: int, kind: str) -> Path:
        """``checkpoints/method=M/round=R/KIND/`` for KIND in ``policy``, ``prm``, ``qvalue``."""
        spec = layout()["checkpoints"]
        if kind not in spec["kinds"]:
            raise StoreError(f"checkpoint kind {kind!r} is not one of {', '.join(spec['kinds'])}")
        check_partition(method, round)
        return self.path / spec["directory"] / f"method={method}" / f"round={round}" / kind

    def is_run(self) -> bool:
        """Whether the directory holds anything of a run (config, metrics or a table directory)."""
        files = layout()["files"].values()
        dirs = [t["directory"] for t in layout()["tables"].values()]
        return self.path.is_dir() and any((self.path / n).exists() for n in (*files, *dirs))

    # ---- tables -----------------------------------------------------------------------------------
    def write_partition(self, table: str, method: str, round: int, data: pa.Table) -> Path:
        """Validate ``data`` against the table's schema and write it atomically as the partition's file.

        Partition columns present in ``data`` must hold the partition's values; they are dropped.
        An existing partition file is replaced (a round that is re-run after a crash rewrites it).
        """
        dest = self.partition_path(table, method, round)
        data = _drop_partition_columns(data, {"method": method, "round": round})
        return write_parquet(conform(table, data), dest)

    def read_partition(self, table: str, method: str, round: int) -> pa.Table:
        """One partition's rows, without the partition columns."""
        path = self.partition_path(table, method, round)
        if not path.is_file():
            raise StoreError(f"no partition {path}")
        return pq.read_table(path, partitioning=None)

    def partitions(self, table: str) -> list[tuple[str, int]]:
        """The (method, round) partitions of a table that have a file, sorted."""
        found = self.table_dir(table).glob(f"method=*/round=*/{layout()['partition_file']}")
        pairs = [(p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1]) for p in found]
        return sorted((m, int(r)) for m, r in pairs if r.isdigit())

    # ---- metrics ----------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty when the file does not exist)."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for i, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StoreError(f"{self.metrics_path}:{i}: not JSON ({e.msg})") from None
        return records

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Record one round's metrics (the round's commit point; see the module docstring)."""
        check_partition(record.get("method"), record.get("round"))  # type: ignore[arg-type]
        line = json.dumps(_jsonable(dict(record)), allow_nan=False, ensure_ascii=False)
        self.path.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            old = self.read_metrics()
            key = (record["method"], record["round"])
            if any((r.get("method"), r.get("round")) == key for r in old):
                raise StoreError(f"metrics for method={key[0]} round={key[1]} are already recorded")
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old) + line + "\n"
            with atomic_path(self.metrics_path) as tmp, open(tmp, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())

    def completed_rounds(self, method: str) -> list[int]:
        """Rounds of ``method`` whose metrics line was recorded, sorted."""
        return sorted({int(r["round"]) for r in self.read_metrics() if r.get("method") == method})

    # ---- config -----------------------------------------------------------------------------------
    def write_config(self, config: Any) -> Path:
        """Write the resolved config (a dataclass, possibly nested, or a mapping) as YAML, atomically."""
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        if not isinstance(config, Mapping):
            raise StoreError(f"config must be a dataclass or a mapping, got {type(config).__name__}")
        text = yaml.safe_dump(_plain(dict(config)), sort_keys=False, allow_unicode=True)
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(text)
        return self.config_path

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise StoreError(f"no config in {self.path}")
        return yaml.safe_load(self.config_path.read_text()) or {}


def _plain(value: Any) -> Any:
    """Turn paths, enums, tuples and numpy scalars into what YAML/JSON write without tags."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def _jsonable(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive ``flock`` on a directory (no lock file is left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def find_run(path: Path | str | None, root: Path | str = "runs") -> RunDir:
    """The run at ``path``; without one, the most recently modified run under ``root``.

    Hidden folders are never picked: a writer killed mid-way leaves its temporary ``.NAME.*.tmp`` there,
    which looks like a run but is not one. Raises :class:`StoreError` with what to do when the directory
    is missing or is not a run.
    """
    if path is None:
        found = [p for p in Path(root).glob("*") if not p.name.startswith(".")]
        candidates = [RunDir(p) for p in found if RunDir(p).is_run()]
        if not candidates:
            raise StoreError(f"no --run given and no run directory under {root}/; pass --run runs/NAME")
        return max(candidates, key=lambda r: r.path.stat().st_mtime)
    run = RunDir(path)
    if not run.path.exists():
        raise StoreError(f"run directory {run.path} does not exist")
    if not run.path.is_dir():
        raise StoreError(f"{run.path} is not a directory")
    if not run.is_run():
        names = [*layout()["files"].values(), *(t["directory"] + "/" for t in layout()["tables"].values())]
        raise StoreError(f"{run.path} is not a run directory (it has none of {', '.join(names)})")
    return run
