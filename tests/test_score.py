"""`itpo-batch score` then `itpo-batch sql`, end to end on a hand-made chat-format logs file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.credit.prm import PRMConfig
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.credit.score import ScoreConfig, run_score
from itpo_batch.data.validate import read_logs
from tests.logs_factory import nested_rows, write

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("runs") / "example"
    cfg = ScoreConfig(
        model=str(tiny_dir), prm=PRMConfig(epochs=2, shuffle=True), q=QConfig(model=str(tiny_dir), epochs=2)
    )
    return run, run_score(read_logs([ROOT / "examples/chat_logs.jsonl"]), cfg, run)


def test_every_assistant_turn_is_scored(scored) -> None:
    _, result = scored
    assert result.turns.height == 17  # assistant messages in examples/chat_logs.jsonl
    assert result.turns["q_value"].null_count() == 0 and result.turns["content"].null_count() == 0
    assert set(result.turns["split"].unique()) <= {"train", "holdout"}


def test_written_norm_itpo_rewards_sum_to_outcomes(scored) -> None:
    run, _ = scored
    res = runner.invoke(
        app,
        ["sql", "SELECT c.conversation_id, c.outcome, sum(t.itpo_norm_reward) AS s FROM conversations c "
         "JOIN turns t USING (conversation_id) GROUP BY ALL", "--run", str(run), "--format", "json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 8
    for r in rows:
        assert r["s"] == pytest.approx(r["outcome"], abs=1e-6)


def test_run_layout_and_metrics(scored) -> None:
    run, _ = scored
    assert (run / "turns/method=score/round=0/part-0.parquet").is_file()
    assert (run / "checkpoints/method=score/round=0/prm/model.safetensors").is_file()
    assert (run / "checkpoints/method=score/round=0/qvalue/value_head.safetensors").is_file()
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["method"] == "score" and metrics["round"] == 0 and "prm/pair_acc" in metrics
    assert "q/train_mse" in metrics


def test_alignment_reported_when_oracle_present(tmp_path: Path, tiny_dir: Path) -> None:
    rows = nested_rows(10, group_size=2)
    logs = read_logs([write(rows, tmp_path / "logs.parquet")])
    cfg = ScoreConfig(model=str(tiny_dir), prm=PRMConfig(epochs=1), q=QConfig(model=str(tiny_dir), epochs=1))
    result = run_score(logs, cfg, tmp_path / "run")
    assert set(result.alignment["signal"]) >= {
        "implicit_reward",
        "q_value",
        "length_share",
        "itpo_norm_weight",
    }
    assert result.turns["oracle_utility"].null_count() == 0
    first = result.turns.filter(pl.col("conversation_id") == "c2").sort("turn")
    assert first["oracle_utility"].to_list() == pytest.approx([0.0, 0.1, 0.2])


def test_cli_score_bad_logs_leave_no_run(tmp_path: Path) -> None:
    rows = nested_rows(4)
    rows[1]["outcome"] = float("nan")
    res = runner.invoke(
        app, ["score", str(write(rows, tmp_path / "bad.parquet")), "--output", str(tmp_path / "run")]
    )
    assert res.exit_code == 2 and "outcome-not-finite" in res.stderr and "'c1'" in res.stderr
    assert not (tmp_path / "run").exists()


def test_an_empty_training_split_is_named_not_blamed_on_the_context(tmp_path: Path) -> None:
    """'c0' alone lands in the 20% hold-out at seed 0: the error says so, instead of 'no conversation fits
    the context' (what the PRM said when it was handed no conversation at all)."""
    rows = [r for r in nested_rows(4) if r["conversation_id"] == "c0"]
    path = write(rows, tmp_path / "one.parquet")
    res = runner.invoke(app, ["score", str(path), "--output", str(tmp_path / "run"), "--seed", "0"])
    assert res.exit_code == 2 and "hold-out" in res.stderr and "--holdout" in res.stderr, res.stderr
    assert "context" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_cli_score_prints_credit_summary(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["score", str(ROOT / "examples/chat_logs.jsonl"), "-o", str(tmp_path / "run"),
              "--prm-epochs", "1", "--q-epochs", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "highest implicit reward" in res.stdout and "lowest implicit reward" in res.stdout
    assert "prm/" in res.stdout and "q/" in res.stdout


def test_cli_score_center_removes_the_mean_token_reward(tmp_path: Path) -> None:
    """``--center`` (docs/method.md §2.2): every turn reward loses the batch mean token reward × its length,
    so over all turns (they cover every assistant token) the centred rewards sum to zero."""
    turns = {}
    for name, extra in (("raw", []), ("centred", ["--center"])):
        args = [
            "score",
            str(ROOT / "examples/chat_logs.jsonl"),
            "-o",
            str(tmp_path / name),
            "--prm-epochs",
            "1",
        ]
        res = runner.invoke(app, [*args, "--q-epochs", "1", *extra])
        assert res.exit_code == 0, res.output
        turns[name] = pl.read_parquet(tmp_path / name / "turns", hive_partitioning=True).sort(
            "conversation_id", "turn"
        )
    raw, centred = turns["raw"], turns["centred"]
    mean = raw["implicit_reward"].sum() / raw["n_tokens"].sum()
    assert abs(mean) > 1e-4  # a fitted PRM drifts: there is something to remove
    expect = raw["implicit_reward"] - mean * raw["n_tokens"]
    np.testing.assert_allclose(centred["implicit_reward"].to_numpy(), expect.to_numpy(), atol=1e-5)
    assert abs(centred["implicit_reward"].sum()) < 1e-4


@pytest.mark.parametrize("task", ["medical", "math", "docwrite"])
def test_score_then_sql_on_simulated_logs(tmp_path: Path, task: str) -> None:
    logs = tmp_path / f"{task}.parquet"
    assert runner.invoke(app, ["simulate", "--task", task, "--n", "16", "-o", str(logs)]).exit_code == 0
    run = tmp_path / "run"
    res = runner.invoke(app, ["score", str(logs), "-o", str(run), "--prm-epochs", "1", "--q-epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "credit alignment" in res.stdout
    query = "SELECT count(*) AS n, count(oracle_utility) AS with_oracle, min(task) AS task FROM turns"
    res = runner.invoke(app, ["sql", query, "--run", str(run), "--format", "json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["n"] == row["with_oracle"] > 16 and row["task"] == task


@pytest.fixture(scope="module")
def scored_with_a_drop(tmp_path_factory: pytest.TempPathFactory):
    """`score` on 8 conversations, one of them opening with 2,500 words: over the tiny model's context."""
    d = tmp_path_factory.mktemp("drop")
    rows = nested_rows(8)
    rows[3]["messages"][1]["content"] = "word " * 2500  # not even its first assistant turn fits
    args = ["score", str(write(rows, d / "logs.parquet")), "-o", str(d / "run"), "--prm-epochs", "0"]
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        res = runner.invoke(app, [*args, "--q-epochs", "1"])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert res.exit_code == 0, res.output
    return res, d / "run", [r.getMessage() for r in seen]


def test_score_says_how_many_conversations_were_dropped_and_why(scored_with_a_drop) -> None:
    res, run, logged = scored_with_a_drop
    assert "scored 14 turns of 7 conversations (1 of 8 dropped for length)" in res.stdout
    note = " ".join(res.stderr.split())
    assert "warning: 1 of 8 conversations dropped" in note and "2048-token context" in note and "'c3'" in note
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert metrics["score/prm_dropped_overlength"] == 1
    assert not [
        m for m in logged if "longer than the specified maximum" in m
    ]  # ours to say, not transformers'


def test_pair_accuracy_over_no_pair_reads_not_applicable(scored_with_a_drop) -> None:
    res, run, _ = scored_with_a_drop
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert metrics["prm/holdout/n_pairs"] == 0 and metrics["prm/n_pairs"] > 0  # this split: no hold-out pair
    row = next(line for line in res.stdout.splitlines() if "prm/holdout/pair_acc " in line)
    assert "n/a (0 pairs)" in row and "nan" not in res.stdout
