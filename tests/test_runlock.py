"""One command per run directory (itpo_batch.data.runlock): the lock refuses a second ``iterate``, names
the holder, dies with it (SIGKILL included); the sweep removes exactly the tool's temporary leftovers under
``tables/`` and ``checkpoints/``."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.config import from_mapping
from itpo_batch.data.io import _replace_dir, _temp_sibling, is_temporary
from itpo_batch.data.runlock import LOCK_NAME, RunBusy, RunLock, sweep_leftovers
from itpo_batch.data.store import RunDir
from itpo_batch.run.config import IterateConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {"rounds": 1, "n": 4, "group_size": 2, "max_new_tokens": 8, "rollout_batch": 8, "eval": {"n": 2}}


def _cfg(tiny_dir: Path) -> IterateConfig:
    return from_mapping(IterateConfig, {**TINY, "model": str(tiny_dir), "methods": ["itpo"]})


class _Stop(Exception):
    """Raised by a test to stop a write or a run at a point."""


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ names
def test_is_temporary_matches_the_names_the_writers_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = [_temp_sibling(tmp_path / "part-0.parquet", folder=False), _temp_sibling(tmp_path / "policy", folder=True),
            _temp_sibling(tmp_path / "config.yaml", folder=False), _temp_sibling(tmp_path / "README", folder=False)]  # fmt: skip
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "w").write_text("old")
    real_replace, moved = os.replace, []

    def replace(src, dst):  # a kill right after _replace_dir moved the old folder aside
        real_replace(src, dst)
        moved.append(Path(dst))
        raise _Stop

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Stop):
        _replace_dir(_temp_sibling(tmp_path / "policy", folder=True), tmp_path / "policy")
    monkeypatch.undo()
    assert [p.name for p in moved] == [f".policy.old-{os.getpid()}"]
    for path in [*made, *moved]:
        assert is_temporary(path.name), path.name
    for name in ("part-0.parquet", ".hidden", "notes.tmp", ".x.tmp", ".itpo-batch.json", LOCK_NAME,
                 ".a.tmp-ABCDEFGH.parquet", ".a.tmp-abc.parquet", ".a.old-", ".a.old-12x", "a.b.abcdefgh.tmp"):  # fmt: skip
        assert not is_temporary(name), name


# ------------------------------------------------------------------------------------------- lock
def test_second_lock_is_refused_naming_the_holder_and_free_after_release(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None and first.held
    refused = second.acquire()
    assert refused is not None and not second.held
    assert str(tmp_path) in refused and f"pid {os.getpid()}" in refused and "in use" in refused
    first.release()
    assert not first.held and second.acquire() is None and second.held
    second.release()


def test_lock_waits_for_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = RunLock(run)
    assert lock.acquire() is None and not lock.held and not run.exists()  # nothing created
    run.mkdir()
    assert lock.acquire() is None and lock.held
    lock.release()


HOLDER = """
import sys, time
from itpo_batch.data.runlock import RunLock
lock = RunLock(sys.argv[1])
assert lock.acquire() is None and lock.held
print("held", flush=True)
time.sleep(600)
"""


def test_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        refused = RunLock(tmp_path).acquire()
        assert refused is not None and f"pid {proc.pid}" in refused
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and lock.held  # no unlocking by hand after a crash
    lock.release()


def test_file_system_without_flock_runs_unlocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and not lock.held
    assert lock.warning is not None and "running unlocked" in lock.warning and str(tmp_path) in lock.warning


def test_a_lock_file_that_cannot_be_opened_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path, flags, mode=0o777):  # what a read-only run directory gives (root is not refused)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(os, "open", denied)
    refused = RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert refused is not None and f"cannot lock run directory {tmp_path} (Permission denied)" in refused


def test_iterate_on_a_run_in_use_exits_2_before_loading_anything(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itpo_batch.run.context as context

    loaded: list[object] = []
    monkeypatch.setattr(context, "load_model", lambda *a, **k: loaded.append(a))
    run = tmp_path / "run"
    RunDir(run).write_config(_cfg(tiny_dir))
    holder = RunLock(run)
    assert holder.acquire() is None
    before = _files(run)
    try:
        res = CliRunner().invoke(app, ["iterate", "--resume", "--run-dir", str(run)])
        assert res.exit_code == 2, res.output
        assert "in use by another itpo-batch command" in res.output and f"pid {os.getpid()}" in res.output
        assert _files(run) == before  # nothing written, the holder's lock file untouched
        from itpo_batch.run.rounds import iterate

        heard: list[str] = []
        with pytest.raises(RunBusy):
            iterate(_cfg(tiny_dir), run, resume=True, hook=heard.append)
        assert heard == [] and loaded == []  # refused before π_0 was loaded
    finally:
        holder.release()


# ------------------------------------------------------------------------------------------ sweep
def _plant(run: Path) -> tuple[list[Path], list[Path]]:
    """Leftovers a killed iterate leaves (made by the real writers), and files the sweep must keep."""
    part_dir = run / "turns" / "method=itpo" / "round=1"
    ckpt = run / "checkpoints" / "method=itpo" / "round=1"
    part_dir.mkdir(parents=True)
    ckpt.mkdir(parents=True)
    part = _temp_sibling(part_dir / "part-0.parquet", folder=False)
    part.write_bytes(b"PAR1 half")
    policy = _temp_sibling(ckpt / "policy", folder=True)
    (policy / "model.safetensors").write_bytes(b"x" * 1000)
    aside = ckpt / ".prm.old-123"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    logs = _temp_sibling(ckpt / "logs.parquet", folder=False)
    keep = [
        part_dir / "part-0.parquet",
        ckpt / "logs.parquet",
        part_dir / ".notes",
        run / "turns" / "mine.tmp",
        _temp_sibling(run / "report.md", folder=False),
    ]  # fmt: skip  (the top level is report's)
    for path in keep:
        path.write_text("keep")
    return [part, policy, aside, logs], keep


def test_sweep_removes_only_the_tools_leftovers(tmp_path: Path) -> None:
    leftovers, keep = _plant(tmp_path)
    sizes = sum(p.stat().st_size for p in leftovers if p.is_file()) + 1000 + 2
    removed, n_bytes = sweep_leftovers(tmp_path)
    assert sorted(removed) == sorted(leftovers) and n_bytes == sizes
    assert not any(p.exists() for p in leftovers) and all(p.read_text() == "keep" for p in keep)
    assert sweep_leftovers(tmp_path) == ([], 0)
    assert sweep_leftovers(tmp_path / "absent") == ([], 0)


def test_resume_sweeps_under_the_lock(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.run.rounds import iterate

    run = tmp_path / "run"
    RunDir(run).write_config(_cfg(tiny_dir))
    leftovers, keep = _plant(run)
    heard: list[str] = []

    def hook(msg: str) -> None:
        heard.append(msg)
        if msg.startswith("round 0"):
            assert RunLock(run).acquire() is not None  # held while the rounds run
            raise _Stop

    with pytest.raises(_Stop):
        iterate(_cfg(tiny_dir), run, resume=True, hook=hook)
    assert heard[0] == "removed 4 temporary file(s) an interrupted write left (0.0 MB)", heard
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)
    assert f"pid {os.getpid()}" in (run / LOCK_NAME).read_text()
    lock = RunLock(run)  # released when iterate raised
    assert lock.acquire() is None and lock.held
    lock.release()
