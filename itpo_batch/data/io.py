"""Outputs: claimed before any work, written atomically, never over what the tool did not write.

Every command that writes (``score``, ``sft``, ``simulate``, ``sql -o``, ``report``, ``iterate``,
``quickstart``) first *claims* its output with :func:`claim_output`, before it loads a model or spends a
second of compute; a claim checks and creates nothing. The command then writes through it:
:meth:`Claim.atomic` builds a file or a folder under a temporary sibling name and renames it into place
(the claim is checked again just before the rename), :meth:`Claim.create` makes a folder that is then
written in place over time (``iterate``'s run directory, ``quickstart``'s folder, ``report``'s folder).
Writes *inside* an output the command already holds (a run's partitions, checkpoints, metrics) use
:func:`atomic_path` / :func:`atomic_dir` directly.

Design decisions:

* **Refuse, never delete.** The three kinds of output and what each does with an existing path:

  ==========  ====================================  ============================================
  kind        written                               an existing path is replaced / continued when
  ==========  ====================================  ============================================
  ``file``    whole, temp file + rename             ``--overwrite`` (or: its folder's marker
                                                    records it unmodified, ``record=True``)
  ``dir``     whole, temp folder + rename           it is empty, or has the marker and
              (score, sft)                          ``--overwrite`` is given
  ``workdir`` in place (iterate, quickstart,        it is empty, or it is the tool's (marker, or
              report)                               ``known``) and ``resume`` is given
  ==========  ====================================  ============================================

  Anything else is refused with an :class:`OutputError` (exit 2) naming the path and what to do. An
  absent path, or an empty folder, is always fine. With ``--overwrite`` the old output is removed only
  after the new one is complete (it is moved aside, the new one renamed in, then the old one deleted).
* **The marker** ``.itpo-batch.json`` (``{"written_by": "itpo-batch", "command": ...}``) is written into
  every folder the tool creates as an output. Why a file of its own rather than the layout
  (``config.yaml``, ``metrics.jsonl``, ``config.json``): those names are common (a user's project
  folder, every HF model), and ``--overwrite`` *deletes* the old folder, so only a name no one else
  writes is proof enough. Continuing in place (``--resume``, a report into a run) deletes nothing, so
  there a caller may also recognise a folder by its layout (``known``: a run directory written before
  the marker existed).
* **Recorded files.** ``report`` rewrites ``report.md`` and its PNGs each time it runs (``iterate``
  writes them on every finish). Requiring ``--overwrite`` for that would break ``report RUN`` after
  ``iterate``; replacing them blindly would lose a user's edits. So a file written with ``record=True``
  has its SHA-256 recorded in its folder's marker (``"files"``), and an existing file with exactly that
  content is the tool's own unmodified output, replaced without ``--overwrite``. A file that was edited,
  or was never the tool's, needs ``--overwrite``. Recording into a folder without a marker (an old run)
  creates one with ``"files"`` only, which does not make the folder the tool's.
* **Modes follow the umask.** ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 (private temporary
  files), and safetensors writes its weight files 0600 whatever the umask. Before a temporary file or
  folder is renamed into place, it and everything in it get 0666/0777 (0777 for a file that was
  executable) minus the umask, which is what ``open``/``mkdir`` give (0644/0755 under umask 022), so a
  teammate can read a shared run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from itpo_batch.core.errors import ItpoError

MARKER = ".itpo-batch.json"
Kind = Literal["file", "dir", "workdir"]


class OutputError(ItpoError):
    """An output path the command may not write (it holds something the tool did not write, or
    ``--overwrite`` / ``--resume`` was not given)."""


# ---- modes -------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux has it (without changing it),
    else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_sibling(dest: Path, folder: bool) -> Path:
    """A new temporary file or folder next to ``dest``, with the modes the umask gives a new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    else:  # the temporary name keeps the real suffix, so writers that go by extension accept it
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.tmp-", suffix=dest.suffix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    _apply_umask(tmp)
    return tmp


# The names _temp_sibling and _replace_dir give: ".NAME.XXXXXXXX.tmp" (a folder), ".STEM.tmp-XXXXXXXX.SUFFIX"
# (a file; tempfile's random part is 8 of [a-z0-9_]) and ".NAME.old-PID" (an old folder moved aside).
_TEMPORARY = re.compile(r"\..+\.(?:[a-z0-9_]{8}\.tmp|tmp-[a-z0-9_]{8}(?:\.[^./]*)?|old-\d+)")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one this module gives a write in progress: a temporary file or folder, or an old
    folder moved aside. A writer killed before its rename or cleanup (SIGKILL, power loss) leaves it behind."""
    return _TEMPORARY.fullmatch(name) is not None


def _apply_umask(tmp: Path) -> None:
    """Give ``tmp`` and everything under it the modes a new file or folder gets under the umask."""
    mask = current_umask()
    for path in [tmp, *(tmp.rglob("*") if tmp.is_dir() else ())]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a non-empty ``dest`` is moved aside first and deleted only after."""
    _apply_umask(tmp)
    if dest.is_dir() and any(dest.iterdir()):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)  # an empty folder is replaced by rename(2) itself


@contextlib.contextmanager
def _write_failures(dest: Path) -> Iterator[None]:
    """A write of ``dest`` the file system refused (disk full, read-only, no permission, a file where a
    folder should be) becomes an :class:`OutputError` naming it: exit 2, no traceback. The writers around
    it have already discarded their temporary file or folder, so nothing half-written is left."""
    # a file inside a temporary output folder (.NAME.XXXX.tmp/...) is shown at its place in NAME
    shown = re.sub(r"/\.([^/]+)\.[^./]+\.tmp(?=/|$)", r"/\1", str(dest))
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {shown}: {e.strerror or e}; nothing of it was written") from e
    except Exception as e:  # safetensors' writer raises its own type: "... I/O error: ... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        reason = os.strerror(int(code.group(1)))
        raise OutputError(f"cannot write {shown}: {reason}; nothing of it was written") from e


# ---- writes inside an output the command holds --------------------------------------------------------
@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; on success it replaces ``dest``.

    For files inside an output the command has claimed (a run's tables, metrics, config); a command's
    own output goes through :meth:`Claim.atomic`, which refuses what it may not replace.
    """
    dest = Path(dest)
    with _write_failures(dest):
        tmp = _temp_sibling(dest, folder=False)
        try:
            yield tmp
            _apply_umask(tmp)
            os.replace(tmp, dest)
        finally:
            _discard(tmp)


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it becomes ``dest``.

    An existing ``dest`` is replaced only after the new one is complete. For folders inside an output
    the command has claimed (a round's checkpoints, which a re-run round rewrites).
    """
    dest = Path(dest)
    with _write_failures(dest):
        tmp = _temp_sibling(dest, folder=True)
        try:
            yield tmp
            _replace_dir(tmp, dest)
        finally:
            _discard(tmp)


def write_parquet(table: pa.Table, dest: Path | str, compression: str = "zstd") -> Path:
    """Write ``table`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(dest)


# ---- the marker ---------------------------------------------------------------------------------------
def read_marker(folder: Path | str) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (or one that is not the tool's JSON)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "itpo-batch" else None


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    with atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps({"written_by": "itpo-batch", **data}, indent=1, sort_keys=True) + "\n")


def written_by(folder: Path | str) -> str | None:
    """The command whose output ``folder`` is, by its marker; None when the tool did not create it."""
    marker = read_marker(folder)
    command = marker.get("command") if marker else None
    return command if isinstance(command, str) and command else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded(path: Path) -> bool:
    """Whether ``path`` holds exactly what the tool wrote there (its hash, in its folder's marker)."""
    files = (read_marker(path.parent) or {}).get("files")
    return isinstance(files, dict) and files.get(path.name) == _sha256(path)


def _record(path: Path, digest: str) -> None:
    marker = read_marker(path.parent) or {}
    marker.pop("written_by", None)
    files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    _write_marker(path.parent, {**marker, "files": {**files, path.name: digest}})


# ---- claims -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One command's right to write one output path (see the module docstring for the rules).

    ``known``: the caller recognised the folder as the tool's by its layout (honoured by ``resume``,
    never by ``overwrite``). ``continues``: the commands whose folders ``resume`` may continue (None:
    any of the tool's). ``record``: a file's hash goes into its folder's marker. ``option``: the
    option that names the path, for the messages.
    """

    path: Path
    kind: Kind
    command: str
    overwrite: bool = False
    resume: bool = False
    known: bool = False
    continues: Collection[str] | None = None
    record: bool = False
    option: str = "--output"

    def check(self) -> None:
        """Raise :class:`OutputError` unless the command may write the path now."""
        p = self.path
        if self.kind == "file":
            if p.is_dir():
                raise OutputError(
                    f"{p} is a folder; {self.command} writes a file there: choose another {self.option}"
                )
            if (p.exists() or p.is_symlink()) and not (self.overwrite or (self.record and _recorded(p))):
                raise OutputError(
                    f"{p} already exists; pass --overwrite to replace it (the old file is replaced only once "
                    f"the new one is complete), or choose another {self.option}"
                )
            return
        if p.exists() and not p.is_dir():
            raise OutputError(f"{p} is a file, not a folder: choose another {self.option}")
        if not p.exists() or not any(p.iterdir()):
            return
        owner = written_by(p)
        if self.kind == "workdir" and (owner or self.known):
            if owner and self.continues is not None and owner not in self.continues:
                raise OutputError(
                    f"{p} holds the output of `itpo-batch {owner}`, not of {self.command}: choose another "
                    f"{self.option}"
                )
            if not self.resume:
                raise OutputError(
                    f"{p} already holds the output of `itpo-batch {owner or self.command}`; pass --resume to "
                    f"continue it, or choose another {self.option}"
                )
            return
        if self.kind == "dir" and owner:
            if not self.overwrite:
                raise OutputError(
                    f"{p} already holds the output of `itpo-batch {owner}`; pass --overwrite to replace it "
                    f"(the old folder is removed only once the new one is complete), or choose another "
                    f"{self.option}"
                )
            return
        hint = " (--resume continues only a folder itpo-batch wrote)" if self.kind == "workdir" else ""
        raise OutputError(
            f"{p} is not empty and was not written by itpo-batch (it has no {MARKER}): {self.command} never "
            f"writes into or replaces a folder it did not create; choose another {self.option}, or empty "
            f"that folder yourself{hint}"
        )

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Path]:
        """Yield a temporary sibling file or folder; on success it becomes the path (checked again
        first; a folder gets the marker). On failure nothing of it is left."""
        if self.kind == "workdir":
            raise ValueError("a workdir is written in place: use Claim.create()")
        with _write_failures(self.path):
            tmp = _temp_sibling(self.path, folder=self.kind == "dir")
            try:
                yield tmp
                if self.kind == "dir":
                    _write_marker(tmp, {"command": self.command})
                digest = _sha256(tmp) if self.record else None
                self.check()
                if self.kind == "dir":
                    _replace_dir(tmp, self.path)
                else:
                    _apply_umask(tmp)
                    os.replace(tmp, self.path)
                if digest is not None:
                    _record(self.path, digest)
            finally:
                _discard(tmp)

    def create(self) -> Path:
        """Make the folder (and its parents) to write in place; a new or empty one gets the marker."""
        if self.kind != "workdir":
            raise ValueError("only a workdir is written in place: use Claim.atomic()")
        self.check()
        fresh = not self.path.exists() or not any(self.path.iterdir())
        with _write_failures(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            if fresh:
                _write_marker(self.path, {"command": self.command})
        return self.path


def claim_output(
    path: Path | str,
    kind: Kind,
    command: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    known: bool = False,
    continues: Collection[str] | None = None,
    record: bool = False,
    option: str = "--output",
) -> Claim:
    """Check that ``command`` may write ``path`` (creating nothing) and return the :class:`Claim`.

    Call it before any work, so a refused output costs nothing; write through the claim afterwards.
    """
    claim = Claim(Path(path), kind, command, overwrite, resume, known, continues, record, option)
    claim.check()
    return claim
