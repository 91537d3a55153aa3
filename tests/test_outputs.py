"""No command deletes or overwrites what it did not create; inputs are checked before the first write;
created files and folders get the modes the umask gives (rules: itpo_batch/data/io.py).

Every case goes through the CLI, as a user would, with the tiny model and tiny sizes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from tests.logs_factory import nested_rows, write
from tests.test_report import make_run as make_iterate_run
from tests.test_sql import make_run as make_sql_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples/chat_logs.jsonl"
runner = CliRunner(env={"COLUMNS": "300"})  # wide: rich does not wrap the messages checked
QUICK_SCORE = ["--prm-epochs", "1", "--q-epochs", "1"]
# iterate at the smallest sizes: round 0 reads the given logs, no evaluation rollouts.
TINY_ITERATE = ["--methods", "outcome", "--rounds", "1", "--n", "8", "--set", "group_size=4",
                "--set", "eval.n=0", "--set", "max_new_tokens=8", "--set", "q.epochs=1"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (None for a folder): any change shows."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def precious(folder: Path) -> dict[str, bytes | None]:
    """The issue's folder: ``important.txt`` and an empty ``sub/``."""
    (folder / "sub").mkdir(parents=True)
    (folder / "important.txt").write_text("precious\n")
    return snapshot(folder)


def siblings(path: Path) -> list[str]:
    """What lies next to ``path`` (a temporary file or folder left behind would show here)."""
    return sorted(p.name for p in path.parent.iterdir())


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of ``folder`` and everything under it."""
    paths = [folder, *folder.rglob("*")]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid nested logs (medical-like, six conversations)."""
    return write(nested_rows(6), tmp_path_factory.mktemp("logs") / "logs.parquet")


@pytest.fixture(scope="module")
def bad_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = nested_rows(4)
    rows[1]["outcome"] = float("nan")
    return write(rows, tmp_path_factory.mktemp("logs") / "bad.parquet")


# ---- the two data-loss cases of the issue ------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "sft"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_the_tool_did_not_write_is_never_replaced(
    tmp_path: Path, command: str, flags: list[str]
) -> None:
    out = tmp_path / "d"
    before = precious(out)
    res = runner.invoke(app, [command, str(EXAMPLE), "-o", str(out), *flags])
    assert res.exit_code == 2, res.output
    assert (
        str(out) in res.stderr and "not written by itpo-batch" in res.stderr and "Traceback" not in res.output
    )
    assert snapshot(out) == before and siblings(out) == ["d"]


# ---- every writer refuses what is not its own --------------------------------------------------------
def test_simulate_and_sql_refuse_an_existing_file_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "logs.parquet"
    target.write_text("mine")
    sim = ["simulate", "--task", "medical", "--n", "8", "-o", str(target)]
    res = runner.invoke(app, sim)
    assert res.exit_code == 2 and str(target) in res.stderr and "--overwrite" in res.stderr
    assert target.read_text() == "mine"
    assert runner.invoke(app, [*sim, "--overwrite"]).exit_code == 0
    assert pq.read_table(target).num_rows == 8 and siblings(target) == ["logs.parquet"]

    run = make_sql_run(tmp_path / "run")
    csv = tmp_path / "rows.csv"
    csv.write_text("mine")
    query = ["sql", "SELECT 1 AS x", "--run", str(run.path), "-o", str(csv)]
    res = runner.invoke(app, query)
    assert res.exit_code == 2 and str(csv) in res.stderr and csv.read_text() == "mine"
    assert runner.invoke(app, [*query, "--overwrite"]).exit_code == 0 and csv.read_text() == "x\n1\n"


def test_a_file_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").mkdir()
    res = runner.invoke(app, ["simulate", "--task", "medical", "--n", "8", "-o", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2 and "is a folder" in res.stderr


def test_report_refuses_a_foreign_folder_and_files_it_did_not_write(tmp_path: Path) -> None:
    run = make_iterate_run(tmp_path, "run")
    other = tmp_path / "mine"
    before = precious(other)
    res = runner.invoke(app, ["report", str(run), "-o", str(other), "--overwrite"])
    assert res.exit_code == 2 and "not written by itpo-batch" in res.stderr and snapshot(other) == before

    (run / "outcome.png").write_bytes(b"my own plot")  # a file of the same name in the run
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and "outcome.png" in res.stderr and "--overwrite" in res.stderr
    assert not (run / "report.md").exists()  # every file is checked before the first is written
    assert (run / "outcome.png").read_bytes() == b"my own plot"
    assert runner.invoke(app, ["report", str(run), "--overwrite"]).exit_code == 0
    assert (run / "outcome.png").read_bytes() != b"my own plot"


def test_report_rewrites_its_own_report_but_not_an_edited_one(tmp_path: Path) -> None:
    run = make_iterate_run(tmp_path, "run")
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0  # unchanged since: its own, rewritten
    md = run / "report.md"
    md.write_text(md.read_text() + "\nmy notes\n")
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and str(md) in res.stderr and md.read_text().endswith("my notes\n")
    assert runner.invoke(app, ["report", str(run), "--overwrite"]).exit_code == 0
    assert "my notes" not in md.read_text()


def test_iterate_refuses_a_foreign_folder_even_with_resume(tmp_path: Path, logs: Path) -> None:
    out = tmp_path / "d"
    before = precious(out)
    for flags in ([], ["--resume"]):
        res = runner.invoke(
            app, ["iterate", "--run-dir", str(out), "--logs", str(logs), *TINY_ITERATE, *flags]
        )
        assert res.exit_code == 2 and "not written by itpo-batch" in res.stderr, res.output
        assert snapshot(out) == before


def test_quickstart_refuses_another_commands_folder_on_resume(tmp_path: Path) -> None:
    run = make_sql_run(tmp_path / "run")  # a run directory: not a quickstart folder
    run.path.joinpath(".itpo-batch.json").write_text('{"written_by": "itpo-batch", "command": "score"}')
    before = snapshot(run.path)
    res = runner.invoke(app, ["quickstart", "-o", str(run.path), "--resume"])
    assert res.exit_code == 2 and "itpo-batch score" in res.stderr and snapshot(run.path) == before


# ---- --overwrite replaces the tool's own output, only once the new one is complete ------------------------
@pytest.mark.slow
def test_score_overwrite_replaces_its_own_run_and_modes_follow_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with umask(0o022):
        res = runner.invoke(app, ["score", str(EXAMPLE), "-o", str(out), *QUICK_SCORE])
    assert res.exit_code == 0, res.output
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}  # a teammate can read the run
    first = snapshot(out)
    res = runner.invoke(app, ["score", str(EXAMPLE), "-o", str(out), *QUICK_SCORE, "--seed", "1"])
    assert res.exit_code == 2 and "--overwrite" in res.stderr and snapshot(out) == first
    with umask(0o077):
        res = runner.invoke(
            app, ["score", str(EXAMPLE), "-o", str(out), *QUICK_SCORE, "--seed", "1", "--overwrite"]
        )
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert modes(out) == {("dir", 0o700), ("file", 0o600)}  # the umask, not a fixed mode
    assert siblings(out) == ["run"]  # neither the old run nor a temporary one is left beside it


def test_sft_overwrite_replaces_its_own_model(tmp_path: Path) -> None:
    out = tmp_path / "policy"
    base = ["sft", str(EXAMPLE), "-o", str(out), "--epochs", "1"]
    assert runner.invoke(app, base).exit_code == 0
    weights = (out / "model.safetensors").read_bytes()
    res = runner.invoke(app, [*base, "--seed", "1"])
    assert res.exit_code == 2 and "already holds the output of `itpo-batch sft`" in res.stderr
    assert runner.invoke(app, [*base, "--seed", "1", "--overwrite"]).exit_code == 0
    assert (out / "model.safetensors").read_bytes() != weights and siblings(out) == ["policy"]


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path: Path) -> None:
    from itpo_batch.data.io import claim_output

    for kind, out in (("dir", tmp_path / "run"), ("file", tmp_path / "rows.csv")):
        with claim_output(out, kind, "score").atomic() as tmp:
            (tmp / "a" if kind == "dir" else tmp).write_text("old")
        before = snapshot(tmp_path)
        with pytest.raises(RuntimeError), claim_output(out, kind, "score", overwrite=True).atomic() as tmp:
            (tmp / "a" if kind == "dir" else tmp).write_text("new")
            raise RuntimeError("killed while writing")
        assert snapshot(tmp_path) == before  # the old output, and no temporary one beside it


def test_a_folder_that_appears_while_the_command_works_is_not_replaced(tmp_path: Path) -> None:
    from itpo_batch.data.io import OutputError, claim_output

    out = tmp_path / "run"
    claim = claim_output(out, "dir", "score")  # free when the command starts
    with pytest.raises(OutputError, match="not written by itpo-batch"), claim.atomic() as tmp:
        (tmp / "a").write_text("new")
        before = precious(out)  # someone else fills it meanwhile
    assert snapshot(out) == before and siblings(out) == ["run"]


def test_file_modes_follow_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "logs.parquet"
    with umask(0o022):
        assert (
            runner.invoke(app, ["simulate", "--task", "medical", "--n", "8", "-o", str(out)]).exit_code == 0
        )
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    run = make_iterate_run(tmp_path, "run")
    with umask(0o027):
        assert runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "cmp")]).exit_code == 0
    assert modes(tmp_path / "cmp") == {("dir", 0o750), ("file", 0o640)}


# ---- iterate: every input is checked before the run directory appears --------------------------------
BAD = {"logs": "--logs", "model": "--model", "task": "--task"}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_iterate_bad_input_leaves_no_run_directory(
    tmp_path: Path, logs: Path, bad_logs: Path, bad: str
) -> None:
    run_dir = tmp_path / "runs" / "r"
    good = {"logs": str(logs), "model": "tiny", "task": "medical"}
    wrong = {"logs": str(bad_logs), "model": str(tmp_path / "no-such-model"), "task": "no_such_module:Task"}
    values = {**good, bad: wrong[bad]}
    args = [arg for name, flag in BAD.items() for arg in (flag, values[name])]
    res = runner.invoke(app, ["iterate", "--run-dir", str(run_dir), *TINY_ITERATE, *args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "runs").exists()  # not even the parent


def test_resume_with_new_logs_uses_and_records_them(
    tmp_path: Path, logs: Path, bad_logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's sequence: a bad --logs, then --resume --logs good.parquet."""
    import itpo_batch.run.rounds as rounds

    monkeypatch.setattr(rounds, "arm_round", lambda *a, **k: None)  # round 0 is what is checked here
    run_dir = tmp_path / "r"
    common = ["iterate", "--run-dir", str(run_dir), *TINY_ITERATE]
    assert runner.invoke(app, [*common, "--logs", str(bad_logs)]).exit_code == 2
    res = runner.invoke(app, [*common, "--resume", "--logs", str(logs)])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logs"] == str(logs)
    filed = pq.read_table(run_dir / "checkpoints" / "round0_logs.parquet")
    assert sorted(filed["conversation_id"].to_pylist()) == [f"c{i}" for i in range(6)]

    other = write(nested_rows(4), tmp_path / "other.parquet")  # round 0 has filed its logs now
    before = snapshot(run_dir)
    res = runner.invoke(app, [*common, "--resume", "--logs", str(other)])
    assert res.exit_code == 2 and "already filed its logs" in res.stderr and snapshot(run_dir) == before


def test_resume_logs_replace_round0_logs_not_yet_filed(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped before round 0 filed its logs (here: its logs file was moved away since)."""
    import itpo_batch.run.rounds as rounds

    gone = write(nested_rows(4), tmp_path / "moved.parquet")
    run_dir = tmp_path / "r"
    common = ["iterate", "--run-dir", str(run_dir), *TINY_ITERATE]

    def crash(*_a: object, **_k: object) -> None:
        raise RuntimeError("killed")  # a crash as round 0 starts

    monkeypatch.setattr(rounds, "round_zero", crash)
    runner.invoke(app, [*common, "--logs", str(gone)])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logs"] == str(gone)
    gone.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(rounds, "arm_round", lambda *a, **k: None)
    res = runner.invoke(app, [*common, "--resume", "--logs", str(logs)])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logs"] == str(logs)
    assert pq.read_table(run_dir / "checkpoints" / "round0_logs.parquet").num_rows == 6
