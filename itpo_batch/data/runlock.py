"""One writer per run directory, and what a killed writer left behind in it.

Design decisions:

* **A lock file, held for the whole command.** ``iterate`` (and ``quickstart``, which runs it) takes an
  exclusive, non-blocking ``flock`` on ``RUN/.itpo-batch.lock``: before it loads anything when the run
  exists (``--resume``), else as soon as it has created the run. A second ``iterate`` on the same run then
  exits 2 naming the process that holds it, instead of both running the same rounds (metric lines twice,
  one checkpoint renamed over another mid-save). Under a launcher rank 0 holds it for every rank.
* **flock, not a PID file.** The kernel drops a flock when its holder dies, SIGKILL and OOM-kill included,
  so a crashed run never needs unlocking by hand; a stale PID file would need a liveness check, which
  fails across hosts and under PID reuse. Not the directory's own flock either (``store._locked``): the
  metrics appends take that one per line and would wait behind a lock held for hours.
* **The lock file stays.** Deleting it on exit races with a process that has just opened it (it would then
  lock a file no longer in the directory). It holds the holder's PID and host, for the message only.
* **A file system without flock** (some NFS mounts: ENOLCK, EOPNOTSUPP): the run goes on unlocked and says
  so; refusing would make runs there impossible.
* **Sweep under the lock.** Only ``iterate`` writes under ``tables/`` and ``checkpoints/``, so once it holds
  the lock every temporary name there (:func:`~itpo_batch.data.io.is_temporary`) is a killed writer's
  leftover: a half-written partition, a half-saved checkpoint (gigabytes for a real model). They are
  removed. The top level is not swept: ``report`` writes there without the lock (it may run beside
  ``iterate`` to look at a run in progress), and its temporary files are small.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import is_temporary
from itpo_batch.data.store import layout

LOCK_NAME = ".itpo-batch.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunBusy(ItpoError):
    """Another command holds the run directory's lock."""


class RunLock:
    """The exclusive lock on one run directory; :meth:`acquire` takes it, :meth:`release` gives it back."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.warning: str | None = None  # set when the file system refused flock and the run goes unlocked
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock if the run directory exists and it is not held yet.

        Returns ``None`` when it is held now, unsupported (see :attr:`warning`) or the directory does not
        exist yet (call again once it does), else the one-line reason another command holds it.
        """
        if self.held or self.warning is not None or not self.path.parent.is_dir():
            return None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # a read-only or foreign run directory: say so, on every rank
            return (
                f"cannot lock run directory {self.path.parent} ({exc.strerror}): {self.path} cannot be opened"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return (
                    f"run directory {self.path.parent} is in use by another itpo-batch command "
                    f"({self._holder()}); wait for it to finish or stop it, then run again"
                )
            if exc.errno in _UNSUPPORTED:
                self.warning = (
                    f"the file system of {self.path.parent} has no flock ({exc.strerror}): running unlocked"
                )
                return None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "its PID is not written yet"
        except OSError:
            return "holder unknown"


def sweep_leftovers(run_dir: Path | str) -> tuple[list[Path], int]:
    """Remove the temporary files and folders killed writers left under ``tables/`` and ``checkpoints/``;
    returns what was removed and its size in bytes. Call only while holding the run's :class:`RunLock`."""
    spec = layout()
    roots = [Path(run_dir) / t["directory"] for t in spec["tables"].values()]
    roots.append(Path(run_dir) / spec["checkpoints"]["directory"])
    removed: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [n for n in dirnames if is_temporary(n)]:
                dirnames.remove(name)  # not walked into: it goes whole
                removed.append(Path(dirpath) / name)
            removed += [Path(dirpath) / n for n in filenames if is_temporary(n)]
    n_bytes = _size(removed)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed, n_bytes


def _size(paths: list[Path]) -> int:
    """Bytes in ``paths``: files, and every file under folders (links not followed)."""
    total = 0
    for path in paths:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        total += sum(p.lstat().st_size for p in files)
    return total
