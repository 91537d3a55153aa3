"""``itpo-batch report``: statistics against hand/loop computations, plots, report.md and the CLI.

Fake runs are written with :meth:`RunDir.append_metrics` (no model): methods × rounds 0..3, round 0
identical for every method of a run, as ``iterate`` records it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import MARKER
from itpo_batch.data.store import RunDir
from itpo_batch.run.plots import PLOTS, draw, method_colours
from itpo_batch.run.report import Report, load_runs, render_markdown, write_report
from itpo_batch.run.report_stats import improvement, summarise

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HALF = 0.05  # half-width of every recorded outcome CI
# outcome gain per round: itpo_norm improves clearly, iterative_ppo barely, outcome gets worse
SLOPE = {"itpo_norm": 0.1, "iterative_ppo": 0.005, "outcome": -0.1}


def outcome(method: str, rnd: int, seed: int) -> float:
    """Seed shifts every round of a run (what pairing cancels) and nudges the slope a little."""
    return 0.3 + 0.1 * seed + rnd * SLOPE[method] * (1 + 0.1 * seed)


def line(method: str, rnd: int, seed: int = 0, task: str = "medical", full: bool = True) -> dict:
    o = outcome(method, rnd, seed)
    rec = {"method": method, "round": rnd, "task": task, "seed": seed, "estimator": "rloo"}
    rec |= {"eval/outcome_mean": o, "eval/outcome_ci_low": o - HALF, "eval/outcome_ci_high": o + HALF}
    rec |= {"eval/success": o / 2, "eval/n": 64, "eval/turns": 3.0 + rnd, "eval/words": 40.0 - rnd}
    rec |= {"policy/kl_pi0": 0.01 * rnd, "time/round_s": 1.5}
    if full:
        g = o + 0.05
        rec |= {"eval/greedy_outcome_mean": g, "eval/greedy_outcome_ci_low": g - HALF}
        rec |= {"eval/greedy_outcome_ci_high": g + HALF, "eval/greedy_success": g / 2}
        rec |= {"align/advantage/spearman": 0.2 + 0.1 * rnd, "align/advantage/auroc": 0.6}
    if method == "itpo_norm":  # only the PRM methods have PRM metrics
        rec |= {"prm/pair_acc": 0.6 + 0.05 * rnd, "prm/sign_acc": 0.7}
    return rec


def make_run(root: Path, name: str, seed: int = 0, methods=("itpo_norm", "iterative_ppo"), **kw) -> Path:
    run = RunDir(root / name)
    for m in methods:
        for r in range(4):
            run.append_metrics(line(m, r, seed, **kw))
    return run.path


@pytest.fixture
def one(tmp_path: Path) -> Path:
    return make_run(tmp_path, "quick", methods=("itpo_norm", "iterative_ppo", "outcome"))


@pytest.fixture
def seeds(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path, f"seed{s}", seed=s) for s in range(3)]


def _at(df, method: str, rnd: int, task: str = "medical") -> dict:
    rows = [
        r for r in df.iter_rows(named=True) if (r["method"], r["round"], r["task"]) == (method, rnd, task)
    ]
    assert len(rows) == 1
    return rows[0]


# ---- loading -----------------------------------------------------------------------------------------
def test_load_runs_rows_and_ignores_score_lines(one: Path) -> None:
    RunDir(one).append_metrics({"method": "score", "round": 0, "prm/loss": 0.3})
    df = load_runs([one])
    assert df.height == 3 * 4 and set(df["run"]) == {"quick"}
    assert set(df["method"]) == {"itpo_norm", "iterative_ppo", "outcome"}
    assert "prm/loss" not in df.columns
    assert _at(df, "itpo_norm", 2)["eval/outcome_mean"] == pytest.approx(outcome("itpo_norm", 2, 0))


def test_a_method_run_with_two_estimators_is_reported_per_estimator(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"seed{s}", seed=s) for s in range(2)]
    other = RunDir(tmp_path / "once")
    for r in range(4):  # iterate records round 0 (π_0) without an estimator
        other.append_metrics(line("itpo_norm", r, 0) | {"estimator": "rloo_once" if r else None})
    df = load_runs([*runs, other.path])
    assert df.filter(pl.col("round") == 0, pl.col("run") == "once")["method"].to_list() == [
        "itpo_norm (rloo_once)"
    ]
    assert set(df["method"]) == {"itpo_norm (rloo)", "itpo_norm (rloo_once)", "iterative_ppo"}
    imp = {r["method"]: r["n_runs"] for r in improvement(df).iter_rows(named=True)}
    assert imp == {"itpo_norm (rloo)": 2, "itpo_norm (rloo_once)": 1, "iterative_ppo": 2}
    assert set(load_runs(runs)["method"]) == {"itpo_norm", "iterative_ppo"}  # one estimator: plain names


def test_a_method_run_with_different_settings_is_reported_per_setting(tmp_path: Path) -> None:
    """prm.center differs: the PRM arm is split, outcome (which no PRM setting reaches) is pooled; a
    config that leaves the key out means today's default (False) and pools with an explicit False."""
    configs = {
        "a": {"task": "medical", "seed": 0, "model": "/x/pi0", "prm": {"center": True}},
        "b": {"task": "medical", "seed": 1, "model": "/y/pi0", "prm": {"center": False}},
        "c": {"task": "medical", "seed": 2, "model": "/z/pi0"},
    }
    runs = []
    for s, (name, config) in enumerate(configs.items()):
        runs.append(make_run(tmp_path, name, seed=s, methods=("itpo_norm", "outcome")))
        RunDir(runs[-1]).config_path.write_text(yaml.safe_dump(config))
    imp = {r["method"]: r["n_runs"] for r in improvement(load_runs(runs)).iter_rows(named=True)}
    assert imp == {"itpo_norm [prm.center=True]": 1, "itpo_norm [prm.center=False]": 2, "outcome": 3}
    # the seed, the evaluation seed and the model's path differ by design: one group
    assert set(load_runs(runs[1:])["method"]) == {"itpo_norm", "outcome"}
    # a task setting left out takes the task's default: n_diseases=14 explicit pools with "c"
    RunDir(runs[1]).config_path.write_text(
        yaml.safe_dump(configs["b"] | {"task_settings": {"n_diseases": 14}})
    )
    assert set(load_runs(runs[1:])["method"]) == {"itpo_norm", "outcome"}
    RunDir(runs[1]).config_path.write_text(
        yaml.safe_dump(configs["b"] | {"task_settings": {"n_diseases": 8}})
    )
    assert set(load_runs(runs[1:])["method"]) == {
        "itpo_norm [task_settings.n_diseases=8]",
        "itpo_norm [task_settings.n_diseases=14]",
        "outcome [task_settings.n_diseases=8]",
        "outcome [task_settings.n_diseases=14]",
    }


def test_load_runs_names_the_path_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ItpoError, match=r"nope does not exist"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ItpoError, match=r"empty has no metrics.jsonl: run `itpo-batch iterate` first"):
        load_runs([tmp_path / "empty"])
    RunDir(tmp_path / "scored").append_metrics({"method": "score", "round": 0, "prm/loss": 0.3})
    with pytest.raises(ItpoError, match=r"scored has only `score` metrics"):
        load_runs([tmp_path / "scored"])


# ---- summaries ---------------------------------------------------------------------------------------
def test_summarise_one_run_keeps_values_and_its_cis(one: Path) -> None:
    s = summarise(load_runs([one]))
    assert s.height == 12 and set(s["n_runs"]) == {1}
    r = _at(s, "outcome", 3)
    o = outcome("outcome", 3, 0)
    assert r["eval/outcome_mean"] == pytest.approx(o)
    assert (r["eval/outcome_ci_low"], r["eval/outcome_ci_high"]) == pytest.approx((o - HALF, o + HALF))
    assert r["eval/greedy_outcome_ci_high"] == pytest.approx(o + 0.05 + HALF)
    assert r["eval/turns"] == 6.0 and r["prm/pair_acc"] is None


def test_summarise_several_runs_t_interval_matches_a_loop(seeds: list[Path]) -> None:
    s = summarise(load_runs(seeds))
    assert set(s["n_runs"]) == {3}
    for method in ("itpo_norm", "iterative_ppo"):
        for rnd in range(4):
            values = [outcome(method, rnd, seed) for seed in range(3)]
            mean, sd = sum(values) / 3, statistics.stdev(values)
            half = 4.302653 * sd / math.sqrt(3)
            r = _at(s, method, rnd)
            assert r["eval/outcome_mean"] == pytest.approx(mean)
            assert r["eval/outcome_ci_low"] == pytest.approx(mean - half)
            assert r["eval/outcome_ci_high"] == pytest.approx(mean + half)
            assert r["eval/turns"] == pytest.approx(3.0 + rnd)  # plain mean for metrics without a CI


# ---- improvement -------------------------------------------------------------------------------------
def test_improvement_one_run_uses_the_two_rounds_cis(one: Path) -> None:
    imp = {r["method"]: r for r in improvement(load_runs([one])).iter_rows(named=True)}
    half = 1.96 * math.sqrt(2 * (HALF / 1.96) ** 2)  # se = HALF / 1.96 at both rounds
    for method, excludes in (("itpo_norm", True), ("iterative_ppo", False), ("outcome", True)):
        r = imp[method]
        delta = outcome(method, 3, 0) - outcome(method, 0, 0)
        assert r["delta"] == pytest.approx(delta) and r["final_round"] == 3 and r["n_runs"] == 1
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((delta - half, delta + half))
        assert r["excludes_zero"] is excludes
    assert imp["outcome"]["delta"] < 0 < imp["itpo_norm"]["delta"]


def test_improvement_one_run_prefers_the_recorded_paired_ci(tmp_path: Path) -> None:
    """iterate records a per-case paired CI of the difference to π_0; with one run it is the headline CI."""
    run = RunDir(tmp_path / "paired")
    for r in range(3):
        rec = line("itpo_norm", r)
        if r:
            d = outcome("itpo_norm", r, 0) - outcome("itpo_norm", 0, 0)
            rec |= {"eval/outcome_delta_pi0_ci_low": d - 0.01, "eval/outcome_delta_pi0_ci_high": d + 0.02}
        run.append_metrics(rec)
    r = improvement(load_runs([run.path])).row(0, named=True)
    d = outcome("itpo_norm", 2, 0) - outcome("itpo_norm", 0, 0)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((d - 0.01, d + 0.02))
    greedy = improvement(load_runs([run.path]), "eval/greedy_outcome_mean").row(0, named=True)
    assert greedy["ci_high"] - greedy["ci_low"] == pytest.approx(2 * 1.96 * math.sqrt(2) * HALF / 1.96)


def test_improvement_several_runs_is_paired(seeds: list[Path]) -> None:
    imp = {r["method"]: r for r in improvement(load_runs(seeds)).iter_rows(named=True)}
    for method in ("itpo_norm", "iterative_ppo"):
        diffs = [outcome(method, 3, s) - outcome(method, 0, s) for s in range(3)]
        own_se = math.sqrt(2) * HALF / 1.959964  # no paired CI recorded: the two rounds' CIs
        mean, half = sum(diffs) / 3, 4.302653 * max(statistics.stdev(diffs), own_se) / math.sqrt(3)
        r = imp[method]
        assert r["n_runs"] == 3 and r["delta"] == pytest.approx(mean)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((mean - half, mean + half))
        # unpaired, the seed offsets (0.1 per seed) would swamp the difference
        ends = [[outcome(method, rnd, s) for s in range(3)] for rnd in (0, 3)]
        unpaired = 4.302653 * math.sqrt(sum(statistics.variance(e) / 3 for e in ends))
        assert half < unpaired / 3
    assert imp["itpo_norm"]["excludes_zero"] is True


def test_equal_deltas_across_runs_keep_their_evaluation_noise(tmp_path: Path) -> None:
    """Three seeds all at Δ = +2/64 (seen in the experiment): a plain t-interval is [Δ, Δ] and 'significant';
    the sd floor (the runs' own paired se) keeps the interval as wide as the evaluation noise."""
    runs, d, p_half = [], 2 / 64, 0.11
    for seed in range(3):
        run = RunDir(tmp_path / f"s{seed}")
        for rnd in (0, 5):
            o = 0.46 + (d if rnd else 0.0) + 0.01 * seed
            rec = {"method": "itpo", "round": rnd, "task": "medical", "seed": seed, "eval/outcome_mean": o}
            rec |= {"eval/outcome_ci_low": o - 0.12, "eval/outcome_ci_high": o + 0.12}
            if rnd:
                rec |= {
                    "eval/outcome_delta_pi0_ci_low": d - p_half,
                    "eval/outcome_delta_pi0_ci_high": d + p_half,
                }
            run.append_metrics(rec)
        runs.append(run.path)
    r = improvement(load_runs(runs)).row(0, named=True)
    half = 4.302653 * (p_half / 1.959964) / math.sqrt(3)
    assert r["delta"] == pytest.approx(d) and (r["ci_low"], r["ci_high"]) == pytest.approx(
        (d - half, d + half)
    )
    assert r["excludes_zero"] is False
    s = _at(summarise(load_runs(runs)), "itpo", 5)  # per-round means: sd 0.01 across runs < own se 0.061
    assert s["eval/outcome_ci_high"] - s["eval/outcome_mean"] == pytest.approx(
        4.302653 * 0.12 / 1.959964 / math.sqrt(3)
    )


def test_improvement_without_cis_or_round_0(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    for rnd, value in enumerate([0.2, 0.5]):
        run.append_metrics({"method": "itpo", "round": rnd, "task": "math", "eval/outcome_mean": value})
    run.append_metrics({"method": "late", "round": 2, "task": "math", "eval/outcome_mean": 0.9})
    imp = improvement(load_runs([run.path]))
    assert imp["method"].to_list() == ["itpo"]
    r = imp.row(0, named=True)
    assert r["delta"] == pytest.approx(0.3) and r["ci_low"] is None and r["excludes_zero"] is None


# ---- missing metrics ---------------------------------------------------------------------------------
def test_missing_and_odd_metrics_do_not_crash(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "sparse")
    run.append_metrics({"method": "iterative_ppo", "round": 0, "eval/outcome_mean": 0.4})
    run.append_metrics({"method": "iterative_ppo", "round": 1, "eval/outcome_mean": None, "note": "x"})
    run.append_metrics({"method": "iterative_ppo", "round": 2, "policy/kl_pi0": float("nan")})
    run.append_metrics({"method": "itpo_norm", "round": 0, "eval/outcome_mean": 0.4, "prm/pair_acc": 0.5})
    df = load_runs([run.path])
    assert "note" not in df.columns and set(df["task"]) == {"unknown"}
    s = summarise(df)
    assert _at(s, "iterative_ppo", 1, "unknown")["eval/outcome_mean"] is None
    assert _at(s, "iterative_ppo", 0, "unknown")["prm/pair_acc"] is None
    md = write_report([run.path]).read_text()
    assert "iterative_ppo" in md and "itpo_norm" in md and "–" in md
    # outcome has values, so its plot is drawn; every other plotted metric is absent or all null: skipped
    assert sorted(p.name for p in run.path.glob("*.png")) == ["outcome.png"]
    assert (run.path / "outcome.png").read_bytes()[:8] == PNG_MAGIC


# ---- plots -------------------------------------------------------------------------------------------
def test_plots_are_pngs_and_absent_metrics_are_skipped(tmp_path: Path) -> None:
    full = make_run(tmp_path, "full")
    write_report([full])
    for plot in PLOTS:
        assert (full / f"{plot.name}.png").read_bytes()[:8] == PNG_MAGIC, plot.name
    bare = make_run(tmp_path, "bare", full=False)
    rep = Report.load([bare])
    write_report([bare])
    assert not (bare / "greedy_outcome.png").exists() and not (bare / "alignment.png").exists()
    assert (bare / "success.png").read_bytes()[:8] == PNG_MAGIC  # sampled success alone is enough
    assert "greedy_outcome.png" not in render_markdown(rep)
    temporary = [p for p in bare.iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert not temporary  # no temporary files left (the marker records what report wrote)


def test_one_subplot_per_task_and_one_colour_per_method(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, task, task=task) for task in ("medical", "math")]
    s = summarise(load_runs(runs))
    colours = method_colours(s["method"].to_list())
    fig = draw(s, PLOTS[0], colours)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in axes) == ["task: math", "task: medical"]
    for ax in axes:
        assert sorted(ln.get_label() for ln in ax.get_lines()) == ["iterative_ppo", "itpo_norm"]
        for ln in ax.get_lines():
            assert ln.get_color() == colours[ln.get_label()]
    assert len(set(colours.values())) == 2


def test_an_evaluation_schedule_is_stated_and_never_drawn_as_zero(tmp_path: Path) -> None:
    """Greedy every round, sampled at rounds 0 and 3 only (iterate's default schedule)."""
    run = RunDir(tmp_path / "cheap")
    sampled = ("eval/outcome_mean", "eval/outcome_ci_low", "eval/outcome_ci_high", "eval/success")
    for m in ("itpo_norm", "iterative_ppo"):
        for r in range(4):
            rec = line(m, r)
            run.append_metrics(rec if r in (0, 3) else {k: v for k, v in rec.items() if k not in sampled})
    md = write_report([run.path]).read_text()
    assert "greedy evaluation at rounds 0–3; sampled evaluation at rounds 0, 3" in md
    table = md.split("### Outcome (sampled), mean [95% CI]")[1].split("###")[0]
    shown = [row.split(" | ")[0] for row in table.splitlines() if row[2:3].isdigit()]
    assert shown == ["| 0", "| 3"]  # rounds without a sampled evaluation are left out, not shown as –
    s = summarise(load_runs([run.path]))
    fig = draw(s, PLOTS[0], method_colours(s["method"].to_list()))
    for ln in fig.axes[0].get_lines():  # one segment from round 0 to round 3, no point at rounds 1-2
        assert list(ln.get_xdata()) == [0, 3] and 0.0 not in list(ln.get_ydata())
    assert "eval/outcome_mean" in s.columns and _at(s, "itpo_norm", 1)["eval/outcome_mean"] is None


# ---- report.md ---------------------------------------------------------------------------------------
def test_report_md_has_every_method_the_headline_and_plot_links(one: Path) -> None:
    path = write_report([one])
    assert path == one / "report.md"
    md = path.read_text()
    for method in ("itpo_norm", "iterative_ppo", "outcome"):
        assert f"| {method} | medical | 1 |" in md  # headline row
    assert "Does each method improve on π_0?" in md and "yes (+)" in md and "yes (−)" in md and "| no |" in md
    assert "![outcome](outcome.png)" in md and (one / "outcome.png").is_file()
    assert "### Implicit PRM pair accuracy" in md and "| 3 | – | 0.750 | – |" in md
    assert f"| {outcome('itpo_norm', 3, 0):.3f} [0.550, 0.650] |" in md


def test_several_runs_need_output_and_report_n_runs(seeds: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ItpoError, match="--output"):
        write_report(seeds)
    md = write_report(seeds, tmp_path / "cmp").read_text()
    assert "| itpo_norm | medical | 3 |" in md and all(f"seed{s}" in md for s in range(3))


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_table_json_and_markdown(one: Path) -> None:
    res = runner.invoke(app, ["report", str(one)])
    assert res.exit_code == 0, res.output
    assert "itpo_norm" in res.stdout and "iterative_ppo" in res.stdout and "Improvement" in res.stdout
    assert "report.md" in res.stderr
    res = runner.invoke(app, ["report", str(one), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {r["method"] for r in data["improvement"]} == {"itpo_norm", "iterative_ppo", "outcome"}
    assert len(data["summary"]) == 12 and data["report"].endswith("report.md")
    res = runner.invoke(app, ["report", str(one), "-f", "markdown"])
    assert res.exit_code == 0 and "# itpo-batch report" in res.stdout


def test_cli_errors_exit_2_naming_the_path(tmp_path: Path, seeds: list[Path]) -> None:
    (tmp_path / "notarun").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "notarun")])
    assert res.exit_code == 2 and "notarun" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["report", *map(str, seeds)])
    assert res.exit_code == 2 and "--output" in res.stderr
    res = runner.invoke(app, ["report", *map(str, seeds), "-o", str(tmp_path / "cmp")])
    assert res.exit_code == 0 and (tmp_path / "cmp" / "report.md").is_file()


def test_help_has_an_example() -> None:
    res = runner.invoke(app, ["report", "--help"])
    assert (
        res.exit_code == 0 and "Example" in res.stdout and "itpo-batch report runs/quickstart" in res.stdout
    )


def test_the_report_knows_which_arms_a_setting_reaches_as_the_method_registry_does() -> None:
    """report_split names the PRM arms and the Q/fresh-sample arm itself (importing the registry would pull
    torch into `report`'s start-up); this keeps its copy equal to the registry."""
    from itpo_batch.rl.methods import METHODS
    from itpo_batch.run.report_split import PRM_ARMS, reaches

    assert {n for n, s in METHODS.items() if s.prm} == PRM_ARMS
    for name, spec in METHODS.items():
        assert reaches("q.lr", name, "rloo") == spec.q
        assert reaches("ippo.kl_coef", name, "rloo") == spec.fresh_samples
        assert reaches("update.lr", name, "rloo") == (not spec.fresh_samples)
