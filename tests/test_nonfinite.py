"""NaN cannot spread: a NaN forced into each guarded quantity stops the run cleanly, uncommitted.

Each guard (PRM loss and token log-ratios, the credit's advantages, the policy update's loss and
parameters, the critic's loss, the Q-model's predictions) is broken once, by a patch that multiplies a
loss or an estimate by NaN or by an infinite learning rate, in round 1 of a run resumed from its round 0.
``iterate`` must stop with a :class:`NonFiniteError` that names the arm, the round, the quantity and how
many values are not finite; nothing of the round may be written (no checkpoint, no table row that ``sql``
shows, no metrics line), and ``--resume`` with the fault gone redoes the round. ``score`` exits 2 and
writes nothing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.errors import NonFiniteError
from itpo_batch.data.store import RunDir
from tests.logs_factory import nested_rows, write
from tests.test_faults import StopHere, iterate_cfg, sql_tables, tree

runner = CliRunner()


def test_nonfinite_error_counts_and_places() -> None:
    NonFiniteError.check("fine", torch.ones(3))
    NonFiniteError.check("fine", 1.5)
    with pytest.raises(NonFiniteError, match=r"^advantages not finite: 2 of 5 values NaN or infinite; ") as e:
        NonFiniteError.check("advantages", torch.tensor([0.0, float("nan"), 1.0, float("-inf"), 2.0]))
    placed = e.value.at("iterate, method itpo, round 2", "not committed")
    assert (
        str(placed)
        == "iterate, method itpo, round 2: advantages not finite: 2 of 5 values NaN or infinite; not committed"
    )
    with pytest.raises(NonFiniteError, match="1 of 6"):
        NonFiniteError.check_all("parameters", [torch.zeros(2), torch.tensor([1.0, 2.0, float("inf"), 0.0])])


def _nan_losses(original):
    return lambda self, *a, **k: (loss * float("nan") for loss in original(self, *a, **k))


def _poison(monkeypatch: pytest.MonkeyPatch, where: str) -> dict:
    """Force a NaN into one guarded quantity; returns the config changes it needs (empty: a patch)."""
    if where == "prm-loss":
        from itpo_batch.credit.prm import ImplicitPRM

        monkeypatch.setattr(ImplicitPRM, "_buffer_losses", _nan_losses(ImplicitPRM._buffer_losses))
    elif where == "credit":
        import itpo_batch.rl.methods as methods

        real = methods.estimate
        monkeypatch.setattr(methods, "estimate", lambda *a: tuple(x * float("nan") for x in real(*a)))
    elif where == "update-loss":
        import itpo_batch.rl.update as update

        real_loss = update.policy_loss

        def nan_loss(*args, **kwargs):
            loss, metrics = real_loss(*args, **kwargs)
            return loss * float("nan"), metrics

        monkeypatch.setattr(update, "policy_loss", nan_loss)
    inf = float("inf")  # a learning rate that breaks the model in one step (4 conversations: one step)
    return {
        "prm-logratios": {"prm": {"lr": inf}},
        "update-loss": {"methods": ["outcome"]},
        "update-params": {"methods": ["outcome"], "update": {"lr": inf}},
        "critic": {"methods": ["outcome"], "method": {"estimator": "ppo"}, "critic": {"lr": inf}},
        "q": {"methods": ["iterative_ppo"], "q": {"lr": inf, "epochs": 1}},
    }.get(where, {})


@pytest.fixture(scope="module")
def round0_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A run of three arms stopped after round 0 (the shared logs and π_0's metrics), to resume from."""
    from itpo_batch.run.rounds import iterate

    def stop_at_round_1(msg: str) -> None:
        if msg.startswith("round 1"):
            raise StopHere

    path = tmp_path_factory.mktemp("round0") / "run"
    with pytest.raises(StopHere):
        iterate(iterate_cfg(tiny_dir, eval={"n": 0}, methods=["itpo", "outcome", "iterative_ppo"]), path,
                hook=stop_at_round_1)  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("where", "method", "quantity"),
    [
        ("prm-loss", "itpo", "PRM loss (step 1 of 1)"),
        ("prm-logratios", "itpo", "PRM token log-ratios"),
        ("credit", "itpo", "advantages"),
        ("update-loss", "outcome", "policy-update loss (step 1 of 1)"),
        ("update-params", "outcome", "policy parameters after the update"),
        ("critic", "outcome", "critic loss after its fit"),
        ("q", "iterative_ppo", "Q-value predictions"),
    ],
)
def test_nan_stops_the_round_uncommitted(
    tmp_path: Path, tiny_dir: Path, round0_run: Path, monkeypatch: pytest.MonkeyPatch,
    where: str, method: str, quantity: str,
) -> None:  # fmt: skip
    from itpo_batch.run.rounds import iterate

    bad = _poison(monkeypatch, where)
    run = RunDir(shutil.copytree(round0_run, tmp_path / "run"))
    with pytest.raises(NonFiniteError) as e:
        iterate(iterate_cfg(tiny_dir, eval={"n": 0}, **bad), run.path, resume=True)
    msg = str(e.value)
    assert msg.startswith(f"iterate, method {method}, round 1: {quantity}") and "not committed" in msg, msg
    assert re.search(r"not finite: [1-9]\d* of [1-9]\d* values NaN or infinite", msg), msg
    assert run.completed_rounds(method) == [0]
    assert not (run.path / "checkpoints" / f"method={method}" / "round=1").exists()
    assert all(rows == [] for rows in sql_tables(run.path).values())  # nothing of round 1 (nor of any other)
    if where in (
        "prm-loss",
        "update-params",
    ):  # --resume redoes the round (the patch undone, the setting back)
        monkeypatch.undo()
        good = {k: v for k, v in bad.items() if k in ("methods", "method")}
        iterate(iterate_cfg(tiny_dir, eval={"n": 0}, **good), run.path, resume=True)
        assert run.completed_rounds(method) == [0, 1]
        assert {r["round"] for r in sql_tables(run.path)["turns"]} == {1}


def test_cli_iterate_nan_exits_2_with_the_arm_round_and_quantity(tmp_path: Path, tiny_dir: Path) -> None:
    res = runner.invoke(
        app, ["iterate", "--rounds", "1", "--methods", "outcome", "--model", str(tiny_dir), "--n", "4",
              "--set", "group_size=2", "--set", "max_new_tokens=8", "--set", "eval.n=0",
              "--set", "update.lr=inf", "--run-dir", str(tmp_path / "run")],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert (
        "error: iterate, method outcome, round 1: policy parameters after the update not finite" in res.stderr
    )
    assert "Traceback" not in res.output and RunDir(tmp_path / "run").completed_rounds("outcome") == [0]


def test_cli_score_nan_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from itpo_batch.credit.prm import ImplicitPRM

    logs = write(nested_rows(8), tmp_path / "logs.parquet")
    before = tree(tmp_path)
    monkeypatch.setattr(ImplicitPRM, "_buffer_losses", _nan_losses(ImplicitPRM._buffer_losses))
    res = runner.invoke(
        app, ["score", str(logs), "-o", str(tmp_path / "run"), "--prm-epochs", "1", "--q-epochs", "1"]
    )
    assert res.exit_code == 2 and "error: PRM loss (step 1 of " in res.stderr and "not finite" in res.stderr
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["logs.parquet"]
