"""Atomic writes leave either the whole new output or the old one, never a mix or a temp file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itpo_batch.data.io import atomic_dir, atomic_path, write_parquet


def test_failed_file_write_keeps_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_dir_is_replaced_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    with atomic_dir(dest) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_parquet_round_trip(tmp_path: Path) -> None:
    table = pa.table({"x": [1, 2, 3]})
    assert pq.read_table(write_parquet(table, tmp_path / "d" / "t.parquet")).equals(table)
