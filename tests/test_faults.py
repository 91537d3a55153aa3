"""Fault injection: a fault may leave neither a half-written file nor a changed user file behind.

(NaN forced into each guarded quantity: ``tests/test_nonfinite.py``, which shares the helpers here.)

- **SIGKILL at every phase** of ``score``, ``sft`` and ``iterate`` (fits, update, checkpoints, collection,
  evaluation, table writing, the commit, the report), in a subprocess that kills *itself* at the phase
  (deterministic, unlike a kill from outside), either when ``hook`` announces it or right before the
  atomic rename of a given output: the only leftovers are the tool's hidden temporary files, ``sql``
  sees whole files only, and the rerun (``--resume`` for ``iterate``) ends with what an uninterrupted run
  writes. Slow (one interpreter start each).
- **Disk full, read-only folder, parent that cannot be created**: exit 2 and a message, nothing
  half-written. ENOSPC is injected into the writers (always), and for real on a small tmpfs, read-only on
  a read-only tmpfs, where a user namespace can mount one without root (``unshare -rm``).
- **Inputs that change under the tool**: logs truncated after ``validate``, or during ``iterate``;
  a checkpoint with a missing or corrupt safetensors file on ``--resume`` is named, never replaced by a
  fresh model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.config import from_mapping
from itpo_batch.core.errors import ItpoError
from itpo_batch.data.sql import RunDatabase
from itpo_batch.data.store import RunDir, StoreError, find_run
from itpo_batch.run.config import IterateConfig
from tests.logs_factory import nested_rows, write

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = {
    "rounds": 1, "n": 4, "group_size": 2, "max_new_tokens": 8, "rollout_batch": 8,
    "eval": {"n": 2, "max_new_tokens": 8}, "q": {"epochs": 1},
    "ippo": {"max_states": 4, "samples_per_state": 2, "max_new_tokens": 8},
}  # fmt: skip
WALL_CLOCK = re.compile(r"(seconds|_s|tokens_per_s)$")  # keys that differ between two runs of one seed
TEMP = re.compile(r"^\..+(\.tmp-.*|\.tmp|\.old-\d+)$")  # the tool's own temporary names (data/io.py)


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` but the tool's temporary ones (and ``skip``), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (
            p.is_file()
            and not any(TEMP.match(part) for part in rel.parts)
            and (skip is None or skip not in p.parents)
        ):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def stable(records: list[dict]) -> list[dict]:
    key = lambda r: (r.get("method", ""), r.get("round", 0), r.get("epoch", 0))  # noqa: E731
    return [{k: v for k, v in r.items() if not WALL_CLOCK.search(k)} for r in sorted(records, key=key)]


def sql_tables(run: Path) -> dict[str, list[dict]]:
    """What ``itpo-batch sql`` shows of a run's tables (every row, in a fixed order; the run's own path,
    which ``source_file`` holds, written as RUN so that two runs compare)."""
    here = lambda v: v.replace(str(run), "RUN") if isinstance(v, str) else v  # noqa: E731
    with RunDatabase(run) as db:
        return {
            view: [
                {k: here(v) for k, v in row.items()}
                for row in db.query(f"SELECT * FROM {view} ORDER BY ALL").to_pylist()
            ]
            for view in ("turns", "conversations", "messages")
        }


def iterate_cfg(tiny_dir: Path, **extra) -> IterateConfig:
    return from_mapping(IterateConfig, {**TINY, "model": str(tiny_dir), "methods": ["itpo"], **extra})


class StopHere(Exception):
    """Raised by a test's hook to stop ``iterate`` at a phase (in this process, unlike a SIGKILL)."""


# ------------------------------------------------------------------------------ SIGKILL at every phase
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
job = json.loads(sys.argv[1])
mode, _, target = job["kill"].partition(":")
target, _, nth = target.partition("#")
seen = {"n": 0, "nth": int(nth or 1)}

def die_if(hit):
    if hit:
        seen["n"] += 1
        if seen["n"] == seen["nth"]:
            os.kill(os.getpid(), signal.SIGKILL)

def hook(msg):
    print(msg, flush=True)
    die_if(mode == "phase" and target in msg)

if mode == "replace":  # right before the atomic rename that would publish an output
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        die_if(str(dst).endswith(target))
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace

from itpo_batch.core.config import from_mapping
from itpo_batch.data.validate import read_logs
out = Path(job["out"])
if job["cmd"] == "score":
    from itpo_batch.credit.score import ScoreConfig, run_score
    run_score(read_logs([job["logs"]]), from_mapping(ScoreConfig, job["cfg"]), out,
              progress=lambda phase, step, total, loss: hook(f"{phase} step {step}"))
elif job["cmd"] == "sft":
    from itpo_batch.model.sft import SFTConfig, train_sft
    train_sft(read_logs([job["logs"]]), from_mapping(SFTConfig, job["cfg"]), out,
              on_step=lambda step, total, loss: hook(f"sft step {step}"))
else:
    from itpo_batch.run.config import IterateConfig
    from itpo_batch.run.report import write_report
    from itpo_batch.run.rounds import iterate
    iterate(from_mapping(IterateConfig, job["cfg"]), out, hook=hook)
    hook("writing report")
    write_report([out], out)
print("done", flush=True)
"""


def killed_at(kill: str, cmd: str, cfg: dict, out: Path, logs: Path | None = None) -> list[str]:
    """Run ``cmd`` in a fresh interpreter that SIGKILLs itself at ``kill``; returns what it printed.

    ``kill``: ``phase:TEXT[#N]`` (the N-th phase message containing TEXT) or ``replace:SUFFIX[#N]`` (the
    N-th atomic rename onto a path ending in SUFFIX, the temporary file or folder complete).
    """
    job = {"kill": kill, "cmd": cmd, "cfg": cfg, "out": str(out), "logs": str(logs)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=out.parent, timeout=600)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, lines, proc.stderr[-3000:])
    assert "done" not in lines
    return lines


SCORE_CFG = {"prm": {"epochs": 1}, "q": {"epochs": 1}}
SFT_CFG = {"epochs": 2}


@pytest.fixture(scope="module")
def logs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(nested_rows(8), tmp_path_factory.mktemp("logs") / "logs.parquet")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, logs_file: Path) -> dict[str, Path]:
    """Uninterrupted score, sft and iterate (with its report), in this process: what a rerun must equal."""
    from itpo_batch.credit.score import ScoreConfig, run_score
    from itpo_batch.data.validate import read_logs
    from itpo_batch.model.sft import SFTConfig, train_sft
    from itpo_batch.run.report import write_report
    from itpo_batch.run.rounds import iterate

    root = tmp_path_factory.mktemp("straight")
    logs = read_logs([logs_file])
    run_score(logs, from_mapping(ScoreConfig, {**SCORE_CFG, "model": str(tiny_dir)}), root / "scored")
    train_sft(logs, from_mapping(SFTConfig, {**SFT_CFG, "model": str(tiny_dir)}), root / "policy")
    iterate(iterate_cfg(tiny_dir), root / "run")
    write_report([root / "run"], root / "run")
    return {"score": root / "scored", "sft": root / "policy", "iterate": root / "run"}


def same_report(a: Path, b: Path) -> bool:
    text = lambda run: (run / "report.md").read_text().replace(str(run), "RUN")  # noqa: E731
    return text(a) == text(b)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["phase:prm step 1", "phase:qvalue step 1", "replace:/scored"])
def test_sigkill_score_then_rerun(
    tmp_path: Path, tiny_dir: Path, logs_file: Path, straight, kill: str
) -> None:
    from itpo_batch.credit.score import ScoreConfig, run_score
    from itpo_batch.data.validate import read_logs

    out = tmp_path / "runs" / "scored"
    out.parent.mkdir()
    cfg = {**SCORE_CFG, "model": str(tiny_dir)}
    killed_at(kill, "score", cfg, out, logs_file)
    assert not out.exists() and tree(tmp_path) == {}  # only the tool's temporary folder, if anything
    with pytest.raises(StoreError, match="no run directory"):
        find_run(None, root=out.parent)  # sql without --run does not take the temporary folder for a run
    run_score(read_logs([logs_file]), from_mapping(ScoreConfig, cfg), out)
    assert stable(RunDir(out).read_metrics()) == stable(RunDir(straight["score"]).read_metrics())
    assert sql_tables(out) == sql_tables(straight["score"])


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["phase:sft step 1", "replace:/policy"])
def test_sigkill_sft_then_rerun(tmp_path: Path, tiny_dir: Path, logs_file: Path, straight, kill: str) -> None:
    from itpo_batch.data.validate import read_logs
    from itpo_batch.model.sft import SFTConfig, train_sft

    cfg = {**SFT_CFG, "model": str(tiny_dir)}
    killed_at(kill, "sft", cfg, tmp_path / "policy", logs_file)
    assert tree(tmp_path) == {}
    train_sft(read_logs([logs_file]), from_mapping(SFTConfig, cfg), tmp_path / "policy")
    weights = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(tmp_path / "policy") == weights(straight["sft"])
    metrics = lambda d: stable([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])  # noqa: E731
    assert metrics(tmp_path / "policy") == metrics(straight["sft"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill",
    [
        "phase:round 1 · itpo: fitting PRM",
        "phase:round 1 · itpo: updating policy",
        "replace:method=itpo/round=1/prm",  # saving checkpoints
        "phase:round 1 · itpo: collecting logs",
        "phase:evaluating (greedy)#2",  # round 1's (the first is π_0's)
        "replace:turns/method=itpo/round=1/part-0.parquet",  # writing tables
        "replace:metrics.jsonl#2",  # round 1's commit
        "replace:report.md",
    ],
)
def test_sigkill_iterate_then_resume(
    tmp_path: Path, tiny_dir: Path, logs_file: Path, straight, kill: str
) -> None:
    from itpo_batch.run.report import write_report
    from itpo_batch.run.rounds import iterate

    run, reference = tmp_path / "run", straight["iterate"]
    before = tree(tmp_path)
    cfg = iterate_cfg(tiny_dir)
    killed_at(kill, "iterate", dataclasses.asdict(cfg), run)
    assert tree(tmp_path, skip=run) == before  # nothing outside the run directory changed
    left = tree(run)
    assert set(left) <= set(tree(reference))  # in it: whole files of the run's layout, and temporary ones
    assert all(
        left[f] == tree(reference)[f] for f in ("config.yaml", "checkpoints/round0_logs.parquet") if f in left
    )
    seen = sql_tables(run)  # sql reads whole files only (a temporary .part-0.tmp-*.parquet is not one)
    for view, rows in seen.items():
        assert rows in ([], sql_tables(reference)[view]), view
    iterate(cfg, run, resume=True)
    write_report([run], run)
    swept = [p for p in run.rglob("*") if TEMP.match(p.name) and p.relative_to(run).parts[0] != p.name]
    assert swept == []  # what the kill left under tables/ and checkpoints/ is gone (runlock.sweep_leftovers)
    assert stable(RunDir(run).read_metrics()) == stable(RunDir(reference).read_metrics())
    assert sql_tables(run) == sql_tables(reference)
    assert same_report(run, reference)
    assert set(tree(run)) == set(tree(reference))


# ------------------------------------------------------- disk full, read-only folder, no room for a parent
def _full_disk(where: str | Path) -> OSError:
    """What a full disk does to a write: the start of the file is there, then ENOSPC."""
    Path(where).write_bytes(b"PAR1 half a file")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))


def _score(logs: Path, out: Path):
    return runner.invoke(app, ["score", str(logs), "-o", str(out), "--prm-epochs", "1", "--q-epochs", "1"])


def test_disk_full_while_score_writes_its_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    before = tree(tmp_path)

    def full(table, where, **kwargs):  # every Parquet file of the package is written by pq.write_table
        raise _full_disk(where)

    monkeypatch.setattr(pq, "write_table", full)
    res = _score(logs, tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert (
        "error: " in res.stderr and "No space left on device" in res.stderr and "Traceback" not in res.output
    )
    assert tree(tmp_path) == before and os.listdir(tmp_path) == ["logs.parquet"]  # not even a temporary file


def test_disk_full_while_sft_saves_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.modeling_utils
    from safetensors import SafetensorError

    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    before = tree(tmp_path)

    def full(tensors, filename, metadata=None):  # safetensors' Rust writer raises its own error type
        _full_disk(filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    res = runner.invoke(app, ["sft", str(logs), "-o", str(tmp_path / "policy"), "--epochs", "1"])
    assert res.exit_code == 2, res.output
    assert "No space left on device" in res.stderr and "Traceback" not in res.output
    assert tree(tmp_path) == before and os.listdir(tmp_path) == ["logs.parquet"]


def test_disk_full_at_the_commit_leaves_the_round_uncommitted(
    tmp_path: Path, tiny_dir: Path, committed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from itpo_batch.run.rounds import iterate

    run = RunDir(shutil.copytree(committed_run, tmp_path / "run"))
    committed = run.metrics_path.read_bytes()
    cfg = iterate_cfg(tiny_dir, eval={"n": 0}, method={"estimator": "ppo"}, rounds=2)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # metrics.jsonl is fsync-ed before its rename
    with pytest.raises(ItpoError, match=r"metrics\.jsonl: No space left on device"):
        iterate(cfg, run.path, resume=True)
    assert run.metrics_path.read_bytes() == committed and run.completed_rounds("itpo") == [0, 1]
    assert not [p for p in run.path.iterdir() if p.name.startswith(".metrics")]
    monkeypatch.undo()
    iterate(cfg, run.path, resume=True)
    assert run.completed_rounds("itpo") == [0, 1, 2]


def test_output_under_a_file_exits_2(tmp_path: Path) -> None:
    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    before = tree(tmp_path)
    res = _score(logs, tmp_path / "notes.txt" / "runs" / "run")  # its parent cannot be created
    assert res.exit_code == 2, res.output
    assert "notes.txt" in res.stderr and "Traceback" not in res.output and tree(tmp_path) == before


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a read-only folder (the tmpfs case covers it)"
)
def test_read_only_output_folder_exits_2(tmp_path: Path) -> None:
    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    shared = tmp_path / "shared"
    shared.mkdir()
    before = tree(tmp_path)
    shared.chmod(0o555)
    try:
        res = _score(logs, shared / "run")
    finally:
        shared.chmod(0o755)
    assert res.exit_code == 2, res.output
    assert "Permission denied" in res.stderr and "Traceback" not in res.output
    assert tree(tmp_path) == before and os.listdir(shared) == []


def _can_mount_tmpfs(where: Path) -> bool:
    """Whether a user namespace can mount a tmpfs here without root (``unshare -rm``)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                           capture_output=True, timeout=30)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(("options", "message"), [("size=64k", "No space left on device"),
                                                  ("size=1m,ro", "Read-only file system")])  # fmt: skip
def test_score_onto_a_full_or_read_only_tmpfs(
    tmp_path: Path, logs_file: Path, options: str, message: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no user namespace to mount a tmpfs in")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    score = f"'{sys.executable}' -m itpo_batch score '{logs_file}' -o '{mnt}/run' --prm-epochs 1 --q-epochs 1"
    script = f"mount -t tmpfs -o {options} tmpfs '{mnt}' && {score}; echo \"rc=$?\"; ls -A '{mnt}'"
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    rc_line = [x for x in proc.stdout.splitlines() if x.startswith("rc=")]
    assert rc_line == ["rc=2"], (proc.stdout, proc.stderr[-3000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines()[-1] == "rc=2"  # and `ls -A` of the tmpfs printed nothing after it


# ------------------------------------------------------------------------- inputs that change under the tool
def test_logs_truncated_after_validate_are_refused(tmp_path: Path) -> None:
    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    assert runner.invoke(app, ["validate", str(logs)]).exit_code == 0
    logs.write_bytes(logs.read_bytes()[: logs.stat().st_size // 2])
    res = _score(logs, tmp_path / "run")
    assert res.exit_code == 2 and "logs.parquet" in res.stderr and "unreadable-file" in res.stderr
    assert not (tmp_path / "run").exists()


def test_iterate_keeps_the_logs_it_validated_when_the_file_changes(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.run.rounds import iterate

    rows = nested_rows(8)
    logs = write(rows, tmp_path / "logs.parquet")
    original = logs.read_bytes()

    def truncate_then_stop(msg: str) -> None:
        if logs.stat().st_size == len(original):  # the first phase: the logs were validated before it
            logs.write_bytes(original[: len(original) // 2])
        if msg.startswith("round 1"):
            raise StopHere

    with pytest.raises(StopHere):
        iterate(
            iterate_cfg(tiny_dir, eval={"n": 0}, logs=str(logs)), tmp_path / "run", hook=truncate_then_stop
        )
    filed = pq.read_table(tmp_path / "run" / "checkpoints" / "round0_logs.parquet")
    assert sorted(filed["conversation_id"].to_pylist()) == sorted(r["conversation_id"] for r in rows)


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """Round 1 of ``itpo`` with the PPO critic committed: every kind of checkpoint a resume reads."""
    from itpo_batch.run.rounds import iterate

    path = tmp_path_factory.mktemp("committed") / "run"
    iterate(iterate_cfg(tiny_dir, eval={"n": 0}, method={"estimator": "ppo"}), path)
    return path


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:
    p.write_bytes(b"\xff" * 64 + p.read_bytes()[64:])


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("policy/model.safetensors", _truncate),
        ("policy/model.safetensors", Path.unlink),
        ("prm/model.safetensors", _garble),
        ("critic/value_head.safetensors", Path.unlink),  # would load as a fresh head: a silent restart
        ("critic/value_head.safetensors", _truncate),
        ("logs.parquet", _truncate),
    ],
    ids=["policy-truncated", "policy-missing", "prm-corrupt", "critic-head-missing", "critic-head-truncated",
         "logs-truncated"],
)  # fmt: skip
def test_resume_from_a_damaged_checkpoint_names_the_file(
    tmp_path: Path, committed_run: Path, name: str, damage
) -> None:
    run = RunDir(shutil.copytree(committed_run, tmp_path / "run"))
    damage(run.path / "checkpoints" / "method=itpo" / "round=1" / name)
    before = tree(run.path)
    res = runner.invoke(app, ["iterate", "--resume", "--run-dir", str(run.path), "--rounds", "2"])
    assert res.exit_code == 2, res.output
    folder, file = name.rsplit("/", 1) if "/" in name else ("", name)
    assert file in res.stderr and f"round=1/{folder}".rstrip("/") in res.stderr, res.stderr
    assert "Traceback" not in res.output and tree(run.path) == before  # no restart: not a file changed
