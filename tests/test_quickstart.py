"""quickstart (itpo_batch.run.quickstart + cli): every stage runs at toy sizes and the report has every method's
rounds; --resume skips finished stages; the CLI refuses a non-empty --output without --resume; the defaults
are the ones the README and docs/results.md describe."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.config import from_mapping
from itpo_batch.model.sft import SFTConfig
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.quickstart import (
    QuickstartConfig,
    quickstart_config,
    quickstart_iterate_config,
    run_quickstart,
)

TOY = {
    "rounds": 1, "methods": ["itpo", "outcome"], "n": 8, "group_size": 4, "max_new_tokens": 8,
    "rollout_batch": 8, "eval": {"n": 4, "max_new_tokens": 8},
}  # fmt: skip


def _toy(out: Path) -> QuickstartConfig:
    return QuickstartConfig(
        out=out,
        n_logs=16,
        sft=SFTConfig(epochs=1, batch_tokens=1024, min_outcome=None),
        iterate=from_mapping(IterateConfig, TOY),
    )


def test_quickstart_stages_report_and_resume(tmp_path: Path) -> None:
    msgs: list[str] = []
    report = run_quickstart(_toy(tmp_path / "qs"), msgs.append)
    assert report == tmp_path / "qs" / "run" / "report.md" and report.is_file()
    assert [m.split(":")[0] for m in msgs[:2]] == ["simulate", "sft"] and msgs[-1] == "report"
    assert (tmp_path / "qs" / "pi0" / "config.json").is_file()
    records = [
        json.loads(line) for line in (tmp_path / "qs" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {(r["method"], r["round"]) for r in records} == {(m, k) for m in TOY["methods"] for k in (0, 1)}
    text = report.read_text()
    assert all(m in text for m in TOY["methods"])
    again: list[str] = []
    run_quickstart(_toy(tmp_path / "qs"), again.append, resume=True)
    assert not any(m.startswith(("simulate", "sft")) for m in again), again


def test_cli_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    res = CliRunner().invoke(app, ["quickstart", "--output", str(tmp_path)])
    assert res.exit_code != 0 and "--resume" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_defaults_match_the_documented_quickstart() -> None:
    cfg = QuickstartConfig()  # the clarify sanity recipe (itpo_batch.run.sanity)
    assert (cfg.task, cfg.n_logs, cfg.skill, cfg.sft.min_outcome, cfg.sft.epochs) == (
        "clarify",
        2048,
        0.1,
        None,
        6,
    )
    assert cfg.logs_settings == {"explicit_rate": 0.5} and cfg.iterate.task_settings == {}
    assert (cfg.iterate.n, cfg.iterate.eval.n, cfg.iterate.update.lr, cfg.iterate.rounds) == (32, 64, 1e-4, 8)
    assert cfg.iterate.update.warmup_steps == cfg.iterate.ippo.update.warmup_steps == 4  # README: 8 rounds
    assert cfg.iterate.methods == ["itpo_norm", "itpo", "iterative_ppo", "outcome"]
    med = quickstart_config("medical", seed=2)
    assert (med.task, med.n_logs, med.skill, med.sft.min_outcome, med.sft.epochs) == (
        "medical",
        2048,
        0.8,
        0.5,
        3,
    )
    assert med.iterate == quickstart_iterate_config(2)
    it = quickstart_iterate_config()
    assert (it.n, it.group_size, it.eval.n, it.ippo.max_states) == (16, 8, 16, 16)
    assert it.methods == ["itpo_norm", "itpo", "iterative_ppo", "outcome"] and it.rounds == 5
    assert quickstart_iterate_config(3).seed == 3
