"""iterate (itpo_batch.run.rounds + cli): rounds write checkpoints, tables and metrics; SIGKILL mid-round then
--resume ends with the same metrics as an uninterrupted run; --env none stops and continues; bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.config import apply_overrides, from_mapping
from itpo_batch.core.errors import ItpoError
from itpo_batch.data.store import RunDir
from itpo_batch.run.config import IterateConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "rounds": 2, "n": 8, "group_size": 4, "max_new_tokens": 8, "rollout_batch": 8,
    "eval": {"n": 4, "max_new_tokens": 8},
    "ippo": {"max_states": 4, "samples_per_state": 2, "max_new_tokens": 8},
    "q": {"epochs": 1},
}  # fmt: skip
# Every wall-clock metric the package records (each next to a time.perf_counter() in itpo_batch/), named
# exactly: they differ between two runs of one seed; every other key must match.
WALL_CLOCK = frozenset({
    "time/round_s", "update/seconds", "q/fit_seconds", "q/seconds", "sft/tokens_per_s",
    "ippo/seconds", "ippo/gen_seconds", "ippo/q_seconds", "ippo/logp_seconds",
})  # fmt: skip


def _stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def test_stable_drops_only_the_wall_clock_keys() -> None:
    deterministic = {"method": "itpo", "round": 1, "eval/greedy_success": 0.5, "eval/greedy_score": 0.2,
                     "q/holdout_spearman": 0.4, "update/early_stop": 1.0, "eval/outcome_ci_low": 0.1}  # fmt: skip
    timed = {"time/round_s": 1.5, "update/seconds": 0.3, **dict.fromkeys(WALL_CLOCK, 1.5)}
    assert _stable([{**deterministic, **timed}]) == [deterministic]
    source = "".join(p.read_text() for p in (REPO / "itpo_batch").rglob("*.py"))
    assert all(f'"{key}"' in source for key in WALL_CLOCK)  # the list names keys the package writes


def _cfg(methods: list[str], **extra) -> IterateConfig:
    return from_mapping(IterateConfig, {**TINY, "methods": methods, **extra})


SCRIPT = """
import sys, torch
from pathlib import Path
from itpo_batch.core.config import from_mapping
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.rounds import iterate
import json
torch.set_num_threads(1)
cfg = from_mapping(IterateConfig, json.loads(sys.argv[1]))
iterate(cfg, Path(sys.argv[2]), resume=sys.argv[3] == "1", hook=lambda m: print(m, flush=True))
print("done", flush=True)
"""


def _run(cfg: dict, run_dir: Path, resume: bool, kill_at: str | None = None) -> list[str]:
    """Run iterate in a subprocess; with ``kill_at``, SIGKILL it as soon as it prints that phase."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", SCRIPT, json.dumps(cfg), str(run_dir), "1" if resume else "0"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_at is not None and kill_at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=600)
    if kill_at is None:
        assert proc.returncode == 0, lines
    return lines


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = {**TINY, "methods": ["itpo_norm", "iterative_ppo"], "model": str(tiny_dir)}
    _run(cfg, tmp_path / "straight", resume=False)
    lines = _run(cfg, tmp_path / "killed", resume=False, kill_at="round 2 · itpo_norm: collecting logs")
    assert "done" not in lines
    killed = RunDir(tmp_path / "killed")
    assert killed.completed_rounds("itpo_norm") == [0, 1]  # round 2 was cut after its checkpoints
    assert (killed.path / "checkpoints" / "method=itpo_norm" / "round=2" / "policy").is_dir()
    _run(cfg, tmp_path / "killed", resume=True)
    straight = RunDir(tmp_path / "straight").read_metrics()
    resumed = killed.read_metrics()
    key = lambda r: (r["method"], r["round"])  # noqa: E731
    assert _stable(sorted(straight, key=key)) == _stable(sorted(resumed, key=key))
    assert len(resumed) == 6  # rounds 0-2 of two arms, each exactly once


def _contents(run: RunDir) -> dict[str, object]:
    """Every table partition and checkpoint file of a run, by relative path: Parquet as rows (the run's own
    path, which logs and tables name, written as RUN), log-prob caches as tensors, anything else as bytes.
    config.yaml is left out (it records the workers)."""
    out: dict[str, object] = {}
    for d in ("turns", "conversations", "messages", "checkpoints"):
        for p in sorted(q for q in (run.path / d).rglob("*") if q.is_file()):
            if p.suffix == ".parquet":
                out[str(p.relative_to(run.path))] = (
                    pq.read_table(p).to_pylist().__repr__().replace(str(run.path), "RUN")
                )
            elif p.name.endswith(".logprobs.safetensors"):  # its key hashes the logs file, which names RUN
                out[str(p.relative_to(run.path))] = {k: v.tolist() for k, v in load_file(str(p)).items()}
            else:
                out[str(p.relative_to(run.path))] = p.read_bytes()
    return out


@pytest.mark.slow
def test_parallel_arms_write_what_a_sequential_run_writes(tmp_path: Path, tiny_dir: Path) -> None:
    """Issue 14: two arms in two worker processes (one thread each) against the same two arms one after the
    other in this process (one thread): the same metrics, tables and checkpoints."""
    from itpo_batch.run.rounds import iterate

    methods = ["itpo_norm", "outcome"]
    heard: list[str] = []
    seq = iterate(_cfg(methods, model=str(tiny_dir), workers=1), tmp_path / "seq")
    par = iterate(_cfg(methods, model=str(tiny_dir), workers=2), tmp_path / "par", hook=heard.append)
    key = lambda r: (r["method"], r["round"])  # noqa: E731
    assert _stable(sorted(seq.read_metrics(), key=key)) == _stable(sorted(par.read_metrics(), key=key))
    seq_files, par_files = _contents(seq), _contents(par)
    assert seq_files.keys() == par_files.keys() and len(seq_files) > 20
    assert [f for f in seq_files if seq_files[f] != par_files[f]] == []
    for m in methods:  # every phase of every arm reached the parent's hook, in the arm's order
        mine = [h for h in heard if h.startswith(f"round 2 · {m}:")]
        assert mine[0].endswith("reference forward") and mine[-1].endswith("writing tables")


@pytest.mark.slow
def test_run_layout_tables_and_sql(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.run.rounds import iterate

    run = iterate(_cfg(["outcome", "itpo", "iterative_ppo"], model=str(tiny_dir), rounds=1), tmp_path / "r")
    for method in ("outcome", "itpo", "iterative_ppo"):
        assert run.completed_rounds(method) == [0, 1]
        assert (run.checkpoint_dir(method, 1, "policy") / "model.safetensors").is_file()
        assert (run.checkpoint_dir(method, 1, "policy").parent / "logs.parquet").is_file()
    assert (run.checkpoint_dir("itpo", 1, "prm") / "model.safetensors").is_file()
    assert (run.checkpoint_dir("iterative_ppo", 1, "qvalue")).is_dir()
    con = duckdb.connect()
    turns = con.sql(
        f"SELECT method, count(*) n, count(advantage) adv, count(implicit_reward) ir, count(q_value) q "
        f"FROM read_parquet('{run.path}/turns/*/*/*.parquet', hive_partitioning=true) GROUP BY method ORDER BY method"
    ).fetchall()
    by = {r[0]: r[1:] for r in turns}
    assert by["itpo"][0] == by["itpo"][1] == by["itpo"][2] > 0  # advantage and implicit reward on every turn
    assert by["outcome"][1] == by["outcome"][0] and by["outcome"][2] == 0
    assert by["iterative_ppo"][3] == by["iterative_ppo"][0] and by["iterative_ppo"][1] == 0
    metrics = {(r["method"], r["round"]): r for r in run.read_metrics()}
    for key in ("eval/outcome_mean", "eval/greedy_outcome_mean", "policy/kl_pi0", "eval/turns", "eval/words"):
        assert key in metrics[("itpo", 1)]
    assert metrics[("itpo", 0)]["eval/outcome_mean"] == metrics[("outcome", 0)]["eval/outcome_mean"]
    assert metrics[("itpo", 0)]["policy/kl_pi0"] == 0.0  # π_0 against itself
    assert metrics[("itpo", 0)]["eval/greedy_outcome_delta_pi0"] == 0.0  # same cases, same seeds: paired
    assert (
        "eval/outcome_delta_pi0_ci_low" in metrics[("itpo", 1)]
        and "logs/outcome_mean" in metrics[("itpo", 1)]
    )
    assert metrics[("itpo", 1)]["update/steps"] >= 1 and "prm/pair_acc" in metrics[("itpo", 1)]


@pytest.mark.slow
def test_evaluation_schedule(tmp_path: Path, tiny_dir: Path) -> None:
    """Greedy every round, sampled at round 0 and the last round (the defaults), then sampled every round."""
    from itpo_batch.run.rounds import iterate

    def evaluated(run: RunDir, prefix: str) -> list[int]:
        return [r["round"] for r in run.read_metrics() if f"{prefix}outcome_mean" in r]

    cheap = iterate(_cfg(["outcome"], model=str(tiny_dir), rounds=3, workers=1), tmp_path / "cheap")
    assert evaluated(cheap, "eval/greedy_") == [0, 1, 2, 3] and evaluated(cheap, "eval/") == [0, 3]
    rows = {r["round"]: r for r in cheap.read_metrics()}
    assert "eval/greedy_outcome_delta_pi0" in rows[1] and "eval/outcome_delta_pi0" not in rows[1]
    assert "eval/outcome_delta_pi0_ci_low" in rows[3] and "policy/kl_pi0" in rows[2]
    full = iterate(
        _cfg(
            ["outcome"], model=str(tiny_dir), rounds=3, workers=1, eval={**TINY["eval"], "sampled_every": 1}
        ),
        tmp_path / "full",
    )
    assert evaluated(full, "eval/") == [0, 1, 2, 3]
    both = {r["round"]: r for r in full.read_metrics()}
    for r in (0, 3):  # the schedule changes which rounds are evaluated, never what an evaluation gives
        assert _stable([rows[r]]) == _stable([both[r]])


@pytest.mark.slow
def test_env_none_deployment_loop(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.run.rounds import iterate

    seed_run = iterate(_cfg(["outcome"], model=str(tiny_dir), rounds=1, eval={"n": 0}), tmp_path / "sim")
    logs0 = seed_run.path / "checkpoints" / "round0_logs.parquet"
    logs1 = seed_run.checkpoint_dir("outcome", 1, "policy").parent / "logs.parquet"
    run_dir = tmp_path / "deploy"
    runner = CliRunner()
    common = ["iterate", "--run-dir", str(run_dir)]
    first = runner.invoke(app, [*common, "--env", "none", "--logs", str(logs0), "--methods", "itpo_norm",
                                "--model", str(tiny_dir), "--rounds", "3", "--set", "q.epochs=1"])  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "deploy" in first.output and "round=1" in first.output
    run = RunDir(run_dir)
    assert run.completed_rounds("itpo_norm") == [0, 1]
    waiting = runner.invoke(app, [*common, "--resume"])
    assert waiting.exit_code == 2 and "--logs" in waiting.output
    second = runner.invoke(app, [*common, "--resume", "--logs", str(logs1)])
    assert second.exit_code == 0, second.output
    assert run.completed_rounds("itpo_norm") == [0, 1, 2]
    assert "logs/outcome_mean" in run.read_metrics()[-1]


def test_bad_input_is_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["iterate", "--methods", "itpo,nope", "--run-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method 'nope'" in bad.output
    env = runner.invoke(
        app, ["iterate", "--env", "none", "--methods", "itpo,outcome", "--run-dir", str(tmp_path)]
    )
    assert env.exit_code == 2 and "exactly one method" in env.output
    typo = runner.invoke(app, ["iterate", "--set", "update.lrr=1", "--run-dir", str(tmp_path / "y")])
    assert typo.exit_code == 2 and "update.lrr" in typo.output
    for workers in ("0", "many"):
        res = runner.invoke(app, ["iterate", "--workers", workers, "--run-dir", str(tmp_path / "z")])
        assert res.exit_code == 2 and "--workers takes 'auto' or a number >= 1" in res.output, res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    RunDir(tmp_path).append_metrics({"method": "itpo", "round": 0})
    result = CliRunner().invoke(app, ["iterate", "--run-dir", str(tmp_path), "--methods", "itpo"])
    assert result.exit_code == 2 and "--resume" in result.output


def test_config_from_mapping_and_overrides() -> None:
    data = apply_overrides({"rounds": 3, "update": {"lr": 1e-3}}, ["update.lr=3e-4", "method.estimator=grpo"])
    cfg = from_mapping(IterateConfig, data)
    assert cfg.rounds == 3 and cfg.update.lr == pytest.approx(3e-4) and cfg.method.estimator == "grpo"
    assert cfg.prm.label_range == (0.0, 1.0)  # nested defaults kept
    with pytest.raises(ItpoError, match=r"ippo\.samples"):
        from_mapping(IterateConfig, {"ippo": {"samples": 3}})
    with pytest.raises(ItpoError, match="expected a number"):
        from_mapping(IterateConfig, {"update": {"lr": "fast"}})
    with pytest.raises(ItpoError, match="KEY=VALUE"):
        apply_overrides({}, ["update.lr"])
