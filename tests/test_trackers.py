"""``--report-to``: trackers get the metrics.jsonl lines (same names, same values, step, one series per arm);
a missing backend package is refused before any output; each line reaches a tracker folder once.

TensorBoard (in the ``dev`` extra) is the backend tested end to end: its event files are read back with
TensorBoard's own ``EventAccumulator`` and compared with metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.data import trackers
from itpo_batch.data.store import RunDir
from itpo_batch.data.trackers import MetricsForwarder, TrackerError, open_trackers, parse_report_to

pytest.importorskip("tensorboard", reason="tensorboard (the dev extra) is needed to read the event files")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat_logs.jsonl"
runner = CliRunner(env={"COLUMNS": "200"})
NOT_METRICS = {"method", "round", "epoch", "seed"}  # which line it is, not a measurement


def tb_scalars(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """series (run folder under ``folder``) -> tag -> step -> value, read back from the event files."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        out[run.name] = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return out


def expected(records: list[dict], step_key: str, series: str) -> dict[str, dict[str, dict[int, float]]]:
    """What TensorBoard must hold for these metrics.jsonl lines: each number (as float32) at its step."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        tags = out.setdefault(r.get("method", series), {})
        for k, v in r.items():
            if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool):
                tags.setdefault(k, {})[r[step_key]] = float(np.float32(v))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the option ----------------------------------------------------------------------------------------
def test_report_to_names_are_parsed_and_checked() -> None:
    assert parse_report_to("none") == () and parse_report_to("") == ()
    assert parse_report_to(" TensorBoard ,tensorboard") == ("tensorboard",)
    assert parse_report_to(["tensorboard"]) == ("tensorboard",)
    with pytest.raises(TrackerError, match=r"unknown tracker 'mlflow'.*tensorboard, wandb, trackio"):
        parse_report_to("mlflow")
    with pytest.raises(TrackerError, match="'none' cannot be combined"):
        parse_report_to("none,tensorboard")


def _missing(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make backends' packages look absent (as on an install without their extra)."""
    for name in names:
        monkeypatch.setitem(trackers.BACKENDS, name, f"itpo_batch_no_such_package_{name}")


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch, "wandb", "trackio")
    with pytest.raises(TrackerError, match=r"pip install 'itpo-batch\[wandb\]'"):
        parse_report_to("tensorboard,wandb")
    with pytest.raises(TrackerError, match=r"pip install 'itpo-batch\[wandb,trackio\]'"):
        parse_report_to("wandb,trackio")


@pytest.mark.parametrize("command", ["sft", "score", "iterate"])
def test_a_missing_tracker_is_refused_before_any_output(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _missing(monkeypatch, "wandb")
    target = tmp_path / "out"
    args = {
        "sft": ["sft", str(EXAMPLE), "-o", str(target)],
        "score": ["score", str(EXAMPLE), "-o", str(target)],
        "iterate": ["iterate", "--logs", str(EXAMPLE), "--run-dir", str(target)],
    }[command]
    res = runner.invoke(app, [*args, "--report-to", "tensorboard,wandb"])
    assert res.exit_code == 2, res.output
    assert "pip install 'itpo-batch[wandb]'" in res.output
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_unknown_tracker_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    res = runner.invoke(app, ["score", str(EXAMPLE), "-o", str(tmp_path / "run"), "--report-to", "mlfow"])
    assert res.exit_code == 2 and "unknown tracker 'mlfow'" in res.output
    assert not (tmp_path / "run").exists()


def test_the_default_is_none_and_help_shows_it() -> None:
    res = runner.invoke(app, ["score", "--help"])
    assert res.exit_code == 0 and "--report-to" in res.stdout and "[default: none]" in res.stdout


# ---- forwarding ----------------------------------------------------------------------------------------
def _record(method: str, round_: int) -> dict:
    return {"method": method, "round": round_, "task": "medical", "seed": 7, "estimator": "rloo",
            "eval/outcome_mean": 0.125 * round_ + (0.5 if method == "itpo" else 0.0),
            "update/steps": 3 * round_, "prm/pair_acc": float("nan"), "update/early_stop": True}  # fmt: skip


def test_each_arm_is_one_series_and_each_line_goes_once_per_tracker_folder(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for m in ("itpo", "outcome"):
        run.append_metrics(_record(m, 0))
    with open_trackers(["tensorboard"], run.path, "run") as tr:
        fwd = MetricsForwarder(tr, run.path, step_key="round", series="itpo")
        assert not (run.path / "tb").exists()  # nothing written before the first line
        assert fwd.sync() == 2 and fwd.sync() == 0
        run.append_metrics(_record("itpo", 1))
        assert fwd.sync() == 1
    got = tb_scalars(run.path / "tb")
    assert got == expected(run.read_metrics(), "round", "itpo")
    assert set(got) == {"itpo", "outcome"} and got["itpo"]["eval/outcome_mean"] == {0: 0.5, 1: 0.625}
    assert "prm/pair_acc" not in got["itpo"]  # NaN is null in metrics.jsonl: a gap, not a point
    assert "seed" not in got["itpo"] and "update/early_stop" not in got["itpo"]

    # a resume: the lines already reported stay as they are, a new round is added
    with open_trackers(["tensorboard"], run.path, "run") as tr:
        fwd = MetricsForwarder(tr, run.path, step_key="round", series="itpo")
        run.append_metrics(_record("outcome", 1))
        assert fwd.sync() == 1
    again = tb_scalars(run.path / "tb")
    assert again == expected(run.read_metrics(), "round", "itpo")
    n_events = sum(
        len(EventAccumulator(str(p)).Reload().Scalars("update/steps")) for p in (run.path / "tb").iterdir()
    )
    assert n_events == 4  # one per line, no duplicate of an earlier round


def test_after_a_failure_only_lines_of_this_call_are_sent(tmp_path: Path) -> None:
    """A command refused on a run it does not own must not report that run's old lines into it."""
    run = RunDir(tmp_path / "run")
    run.append_metrics(_record("itpo", 0))
    with open_trackers(["tensorboard"], run.path, "run") as tr:
        fwd = MetricsForwarder(tr, run.path, step_key="round", series="itpo")
        assert fwd.sync(new_only=True) == 0 and not (run.path / "tb").exists()
        run.append_metrics(_record("itpo", 1))
        assert fwd.sync(new_only=True) == 1
    assert set(tb_scalars(run.path / "tb")["itpo"]["update/steps"]) == {1}


def test_only_rank_zero_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert open_trackers(["tensorboard"], tmp_path, "x").trackers == []
    monkeypatch.setenv("RANK", "0")
    assert len(open_trackers(["tensorboard"], tmp_path, "x").trackers) == 1


# ---- the commands ---------------------------------------------------------------------------------------
def test_sft_reports_each_epoch(tmp_path: Path) -> None:
    out = tmp_path / "pol"
    res = runner.invoke(
        app, ["sft", str(EXAMPLE), "-o", str(out), "--epochs", "2", "--report-to", "tensorboard"]
    )
    assert res.exit_code == 0, res.output
    records = read_jsonl(out / "metrics.jsonl")
    got = tb_scalars(out / "tb")
    assert got == expected(records, "epoch", "sft")
    assert set(got["sft"]["sft/loss"]) == {1, 2} and got["sft"]["sft/loss"][2] == float(
        np.float32(records[1]["sft/loss"])
    )


def test_score_reports_its_metrics_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "score",
        str(EXAMPLE),
        "-o",
        str(out),
        "--prm-epochs",
        "1",
        "--q-epochs",
        "1",
        "--report-to",
        "tensorboard",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    records = RunDir(out).read_metrics()
    got = tb_scalars(out / "tb")
    assert got == expected(records, "round", "score")
    assert "score/turns" in got["score"] and got["score"]["score/turns"] == {0: 17.0}


def test_score_without_report_to_writes_no_tracker_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, ["score", str(EXAMPLE), "-o", str(out), "--prm-epochs", "1", "--q-epochs", "1"])
    assert res.exit_code == 0, res.output
    assert not (out / "tb").exists() and not (out / "wandb").exists() and not (out / "trackio").exists()


@pytest.mark.slow
def test_iterate_reports_every_arm_and_round(tmp_path: Path, tiny_dir: Path) -> None:
    """Two arms in two worker processes: the main process reads their lines back and reports both series."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "rounds": 1, "n": 4, "group_size": 2, "max_new_tokens": 6, "rollout_batch": 4,
        "eval": {"n": 2, "max_new_tokens": 6}, "q": {"epochs": 1}, "prm": {"epochs": 1},
    }))  # fmt: skip
    run_dir = tmp_path / "run"
    args = ["iterate", "--config", str(config), "--model", str(tiny_dir), "--methods", "itpo_norm,outcome",
            "--task", "medical", "--workers", "2", "--run-dir", str(run_dir), "--report-to", "tensorboard"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    records = RunDir(run_dir).read_metrics()
    got = tb_scalars(run_dir / "tb")
    assert set(got) == {"itpo_norm", "outcome"}
    assert got == expected(records, "round", "itpo_norm")
    assert set(got["outcome"]["eval/outcome_mean"]) == {0, 1}
