"""`itpo-batch simulate`: valid logs for every task and policy, identical for the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.data.validate import read_logs

runner = CliRunner()


@pytest.mark.parametrize("task", ["medical", "math", "docwrite"])
def test_scripted_logs_are_valid_and_deterministic(tmp_path: Path, task: str) -> None:
    paths = [tmp_path / f"{task}-{i}.parquet" for i in range(2)]
    for p in paths:
        res = runner.invoke(app, ["simulate", "--task", task, "--n", "24", "--group-size", "8", "-o", str(p)])
        assert res.exit_code == 0, res.output
    assert paths[0].read_bytes() == paths[1].read_bytes()
    logs = read_logs([paths[0]])
    conv = logs.conversations
    assert conv.height == 24 and conv["group_id"].n_unique() == 3 and set(conv["task"]) == {task}
    assert conv["oracle_turn_utility"].null_count() == 0
    other = tmp_path / "seed1.parquet"
    runner.invoke(app, ["simulate", "--task", task, "--n", "24", "--seed", "1", "-o", str(other)])
    assert other.read_bytes() != paths[0].read_bytes()


def test_hf_policy_logs_carry_behaviour_logprobs(tmp_path: Path) -> None:
    out = tmp_path / "tiny.parquet"
    args = ["simulate", "--task", "math", "--n", "4", "--group-size", "2", "--policy", "tiny",
            "--max-new-tokens", "8", "--max-turns", "2", "-o", str(out)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    logs = read_logs([out])
    asst = logs.messages.filter(logs.messages["role"] == "assistant")
    assert asst["behavior_logprobs"].null_count() == 0
    assert all(0 < len(lp) <= 8 for lp in asst["behavior_logprobs"].to_list())


def test_unknown_task_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["simulate", "--task", "chess", "-o", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2 and "unknown task 'chess'" in res.stderr
    assert not (tmp_path / "x.parquet").exists()
