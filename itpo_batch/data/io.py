"""Atomic writes: an output either appears whole or not at all.

Files are written to a temporary name in the destination folder and moved into place with
``os.replace`` (atomic on POSIX within one filesystem); directories are filled under a temporary name
and renamed. A crash, a validation error or Ctrl-C therefore never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; on success it replaces ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the real suffix, so readers that go by extension accept it.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.tmp-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dest: Path | str, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it becomes ``dest``.

    An existing ``dest`` is replaced only after the new one is complete (``overwrite=True``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise FileExistsError(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: pa.Table, dest: Path | str, compression: str = "zstd") -> Path:
    """Write ``table`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(dest)
