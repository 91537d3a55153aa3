"""Compare iterate runs: per-round tables, the headline improvement over π_0, PNG plots and ``report.md``.

Input is only ``metrics.jsonl`` (one line per (method, round), round 0 = π_0 recorded identically for
every method) and, optionally, ``config.yaml`` for a one-line description of each run.

Design decisions:

* **Missing is normal.** Any metric may be absent or ``null`` in a line (no PRM for ``iterative_ppo``,
  no greedy evaluation in a quick run). Metrics are read as Float64 with nulls; aggregations skip nulls,
  tables print ``–`` and plots leave gaps. Non-numeric values of metric keys are dropped, lines without
  ``method`` or ``round`` are skipped, and lines of ``score`` runs (``method=score``) are ignored.
* **Evaluation schedule.** ``iterate`` may evaluate some rounds only (greedy every round, sampled at
  round 0 and the last round by default). The Runs section lists, per run, the rounds that have each
  kind of evaluation (read from the metrics, so it is true of old runs too); table rows where no method
  has a value are left out, and the headline pairs round 0 with the last round that has the metric.
* **One run: its own CIs.** With a single run per (task, method) the evaluation CIs recorded by the run
  (over its evaluation conversations) are shown as they are.
* **Several runs (seeds): a t-interval across runs.** Seeds are the unit of replication: the spread of
  a method's score across seeds includes what one run's evaluation CI cannot see (the training data
  drawn, the PRM fit, the update's randomness). With a handful of seeds the normal 1.96 is too
  narrow, so the interval is mean ± t₀.₉₇₅,ₙ₋₁·sd/√n, with n the runs that have the value. The t
  quantiles come from a table (df 1–30) and a Cornish–Fisher expansion beyond (→ 1.96), since scipy is
  not a dependency. Only the outcome CIs are replaced this way (``eval/outcome_ci_*``,
  ``eval/greedy_outcome_ci_*``); other metrics are averaged.
* **The sd across runs is floored at the runs' own standard error** (deviation from a plain t-interval):
  sd = max(sd across runs, root-mean-square of each run's se), se = (ci_high − ci_low) / (2·1.96) of the
  run's recorded CI. Each run's value carries at least its own evaluation noise, but with three runs and
  a discrete outcome the runs can agree exactly by chance: three seeds each at Δ = +2/64 gave sd = 0 and
  a zero-width "significant" interval. The floor keeps such an interval as wide as the evaluation noise.
* **Pooled only when alike** (:mod:`itpo_batch.run.report_split`): a method that the runs ran with
  different estimators or settings gets one row per variant (``itpo [prm.center=True]``), never an
  average across them.
* **Headline = paired improvement.** Δ = final-round outcome − round-0 outcome *within each run*, then
  averaged over runs. Pairing cancels what a run's seed does to both ends (round 0 is shared by all
  methods of a run), so the CI is that of the per-run differences (t across runs). With one run there
  is nothing to pair across, and the two rounds are evaluated on independent conversations, so
  Δ ± 1.96·√(se₀² + se_R²) with se = (ci_high − ci_low) / (2·1.96) from each round's recorded CI.
* **Outputs are atomic** (:mod:`itpo_batch.data.io`): ``report.md`` and every PNG appear whole or not at all.
  The folder must be new, empty, or one itpo-batch wrote (a run directory included); a ``report.md`` or
  PNG in it is replaced only when it is exactly what ``report`` wrote there last (its hash is in the
  folder's marker) or with ``overwrite``. Every file is checked before the first is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import Claim, OutputError, claim_output
from itpo_batch.data.store import RunDir
from itpo_batch.run.report_split import flatten, split_methods
from itpo_batch.run.report_stats import (
    CI_COLUMNS,
    CONFIG_KEYS,
    GREEDY,
    ID_COLUMNS,
    OUTCOME,
    improvement,
    summarise,
)


# ---- loading -----------------------------------------------------------------------------------------
def load_runs(paths: Sequence[Path | str]) -> pl.DataFrame:
    """One row per (run, method, round) of every run's ``metrics.jsonl``; ``run`` is the directory name.

    Raises :class:`ItpoError` naming the path when it is not a directory or has no iterate metrics.
    """
    if not paths:
        raise ItpoError("no run given; pass one or more run directories, e.g. runs/quickstart")
    names = _run_names([Path(p) for p in paths])
    configs = {name: _config(RunDir(p)) for p, name in zip(paths, names, strict=True)}  # each read once
    rows = [
        row for p, name in zip(paths, names, strict=True) for row in _run_rows(Path(p), name, configs[name])
    ]
    metrics = sorted({k for r in rows for k in r if k not in ID_COLUMNS})
    data: dict[str, Any] = {
        "run": [r["run"] for r in rows],
        "task": [r["task"] for r in rows],
        "method": [r["method"] for r in rows],
        "round": [r["round"] for r in rows],
        "seed": [r.get("seed") for r in rows],
        "estimator": [r.get("estimator") for r in rows],
    }
    schema = {"run": pl.String, "task": pl.String, "method": pl.String, "round": pl.Int64}
    schema |= {"seed": pl.Int64, "estimator": pl.String} | dict.fromkeys(metrics, pl.Float64)
    data |= {m: [r.get(m) for r in rows] for m in metrics}
    flat = {name: flatten(config) for name, config in configs.items()}
    return split_methods(pl.DataFrame(data, schema=schema), flat).sort("run", "task", "method", "round")


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, or the full paths when two runs share a name."""
    names = [p.resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _run_rows(path: Path, name: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ItpoError(f"run directory {path} {what}")
    run = RunDir(path)
    lines = [r for r in run.read_metrics() if isinstance(r, dict) and r.get("method") != "score"]
    rows = [row for r in lines if (row := _row(r, name, config.get("task"))) is not None]
    if not rows:
        had = "has only `score` metrics" if run.metrics_path.is_file() else "has no metrics.jsonl"
        raise ItpoError(f"{path} {had}: run `itpo-batch iterate` first")
    return rows


def _row(record: dict[str, Any], run: str, default_task: Any) -> dict[str, Any] | None:
    """A clean row: ids typed, metrics as floats (None when missing or not a number)."""
    method, rnd = record.get("method"), record.get("round")
    if not isinstance(method, str) or isinstance(rnd, bool) or not isinstance(rnd, int):
        return None
    task = record.get("task") or default_task
    seed = record.get("seed")
    row: dict[str, Any] = {"run": run, "method": method, "round": rnd, "task": str(task or "unknown")}
    row["seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    row["estimator"] = str(record["estimator"]) if record.get("estimator") is not None else None
    for key, value in record.items():
        if key not in ID_COLUMNS and isinstance(value, int | float) and not isinstance(value, bool):
            row[key] = float(value) if math.isfinite(value) else None
    return row


def _config(run: RunDir) -> dict[str, Any]:
    """``config.yaml`` as a mapping; {} when absent or unreadable (it is only used for a description)."""
    try:
        config = yaml.safe_load(run.config_path.read_text()) if run.config_path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def config_line(path: Path | str) -> str:
    """``task=medical, model=tiny, rounds=3, …`` from the run's config.yaml ('' without one)."""
    config = _config(RunDir(path))
    parts = []
    for key in CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if value is not None and not isinstance(value, dict):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


# ---- formatting --------------------------------------------------------------------------------------
def fmt(value: Any, decimals: int = 3) -> str:
    """A number with ``decimals`` decimals; ``–`` for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if not isinstance(value, float):
        return str(value)
    return f"{0.0 if abs(value) < 0.5 * 10**-decimals else value:.{decimals}f}"  # no "-0.000"


def fmt_ci(mean: Any, lo: Any, hi: Any) -> str:
    """``0.412 [0.380, 0.444]``; the bracket is left out when the CI is missing."""
    if fmt(lo) == "–" or fmt(hi) == "–" or fmt(mean) == "–":
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def verdict(excludes_zero: bool | None, delta: float | None) -> str:
    """``yes (+)`` / ``yes (−)`` when the CI excludes 0, ``no`` when it does not, ``–`` without a CI."""
    if excludes_zero is None:
        return "–"
    return ("yes (+)" if (delta or 0) > 0 else "yes (−)") if excludes_zero else "no"


# ---- report.md ---------------------------------------------------------------------------------------
# (title, metric) of the per-task tables; the outcome table also shows the CI.
TABLES = (
    ("Outcome (sampled), mean [95% CI]", OUTCOME),
    ("Outcome (greedy), mean [95% CI]", GREEDY),
    ("Success (greedy)", "eval/greedy_success"),
    ("Success (sampled)", "eval/success"),
    ("Assistant turns per conversation", "eval/turns"),
    ("Assistant words per conversation", "eval/words"),
    ("KL to π_0 (nats per token)", "policy/kl_pi0"),
    ("Implicit PRM pair accuracy", "prm/pair_acc"),
    ("Credit alignment (Spearman of the advantage vs oracle utility)", "align/advantage/spearman"),
    ("Credit alignment (Spearman of the turn reward vs oracle utility)", "align/turn_reward/spearman"),
    ("Implicit PRM pair accuracy on held-out conversations", "prm/holdout/pair_acc"),
    ("Logged conversations consumed", "budget/conversations"),
)


@dataclass
class Report:
    """Everything a report shows, computed once from the runs."""

    paths: list[Path]
    runs: pl.DataFrame
    summary: pl.DataFrame
    improvement: pl.DataFrame
    greedy_improvement: pl.DataFrame
    plots: list[Path] = field(default_factory=list)

    @classmethod
    def load(cls, paths: Sequence[Path | str]) -> Report:
        runs = load_runs(paths)
        return cls(
            [Path(p) for p in paths], runs, summarise(runs), improvement(runs), improvement(runs, GREEDY)
        )


def default_out(paths: Sequence[Path | str], out_dir: Path | str | None) -> Path:
    """``out_dir``, or the run's own directory when there is exactly one run."""
    if out_dir is not None:
        return Path(out_dir)
    if len(paths) != 1:
        raise ItpoError(f"{len(paths)} runs given: pass --output DIR for the combined report")
    return Path(paths[0])


def claim_report(out_dir: Path, files: Sequence[Path], overwrite: bool = False) -> tuple[Claim, Claim]:
    """Check that ``report`` may write ``report.md`` and ``files`` into ``out_dir``; nothing is created.

    Returns the claims of the folder and of ``report.md``; all are checked before anything is written.
    """
    run = RunDir(out_dir)
    folder = claim_output(out_dir, "workdir", "report", resume=True, known=run.is_run())
    md = claim_output(run.report_path, "file", "report", overwrite=overwrite, record=True)
    for path in files:
        claim_output(path, "file", "report", overwrite=overwrite, record=True)
    return folder, md


def save_report(report: Report, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the PNGs and ``report.md`` (atomically) into ``out_dir``; returns the report's path."""
    from itpo_batch.run.plots import plot_paths, write_plots  # matplotlib is slow to import; only here

    out_dir = Path(out_dir)
    folder, md = claim_report(out_dir, plot_paths(report.summary, out_dir), overwrite)
    folder.create()
    report.plots = write_plots(report.summary, out_dir, overwrite)
    with md.atomic() as tmp:
        tmp.write_text(render_markdown(report))
    return md.path


def write_report(
    paths: Sequence[Path | str], out_dir: Path | str | None = None, overwrite: bool = False
) -> Path:
    """Load the runs, write ``report.md`` and the PNGs to ``out_dir`` (default: the single run's dir)."""
    dest = default_out(paths, out_dir)
    return save_report(Report.load(paths), dest, overwrite)


def check_report(run_dir: Path) -> None:
    """Before resuming a run: refuse now, not after its last round, a report it could not write at the end
    (a ``report.md`` or PNG in it that ``report`` did not write, or that was edited since)."""
    from itpo_batch.run.plots import PLOTS

    run_dir = Path(run_dir)
    if not RunDir(run_dir).is_run():
        return  # a new run, or not a run at all: the run's own claim speaks for it
    try:
        claim_report(run_dir, [run_dir / f"{p.name}.png" for p in PLOTS])
    except OutputError as e:
        raise OutputError(
            f"{e}. The run rewrites its report when it ends: move that file away first, or replace it "
            f"now with `itpo-batch report {run_dir} --overwrite`"
        ) from None


def render_markdown(report: Report) -> str:
    """The whole ``report.md``."""
    names = report.runs["run"].unique(maintain_order=True).to_list()
    lines = [f"# itpo-batch report: {', '.join(names)}", "", "## Runs", ""]
    for path, name in zip(report.paths, _run_names(report.paths), strict=True):
        rounds = report.runs.filter(pl.col("run") == name)
        methods = ", ".join(rounds["method"].unique(maintain_order=True).to_list())
        desc = config_line(path) or "no config.yaml"
        evaluated = evaluation_schedule(rounds)
        lines.append(f"- `{path}`: {desc}; methods {methods}; rounds 0–{rounds['round'].max()}{evaluated}")
    lines += ["", *_headline(report.improvement, "sampled outcome")]
    if report.greedy_improvement.height:
        lines += ["", *_headline(report.greedy_improvement, "greedy outcome")]
    if report.plots:
        lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in report.plots)]
    for task in report.summary["task"].unique(maintain_order=True).to_list():
        lines += ["", *_task_section(report.summary.filter(pl.col("task") == task), task)]
    return "\n".join(lines) + "\n"


def _headline(imp: pl.DataFrame, what: str) -> list[str]:
    lines = [
        f"## Does each method improve on π_0? (Δ {what}, final round − round 0)",
        "",
        "Paired per run. 95% CI: with several runs, t across runs (sd floored at each run's own se); with one"
        " run, its per-case paired CI when recorded, else from the two rounds' CIs.",
        "",
        "| method | task | runs | round 0 | final round | final | Δ | 95% CI | CI excludes 0 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in imp.sort("task", "method").iter_rows(named=True):
        ci = f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r["ci_low"] is not None else "–"
        lines.append(
            f"| {r['method']} | {_md(r['task'])} | {r['n_runs']} | {fmt(r['start'])} | {r['final_round']} | "
            f"{fmt(r['final'])} | {_signed(r['delta'])} | {ci} | {verdict(r['excludes_zero'], r['delta'])} |"
        )
    if not imp.height:
        lines.append("| – | – | – | – | – | – | – | – | – |")
    return lines


def _task_section(summary: pl.DataFrame, task: str) -> list[str]:
    methods = summary["method"].unique(maintain_order=True).to_list()
    lines = [f"## Task: {_md(task)}"]
    for title, metric in TABLES:
        if metric not in summary.columns or summary[metric].null_count() == summary.height:
            continue
        lines += ["", f"### {title}", "", f"| round | {' | '.join(methods)} |"]
        lines.append("| ---: |" + " ---: |" * len(methods))
        for rnd in sorted(summary["round"].unique().to_list()):
            at = {r["method"]: r for r in summary.filter(pl.col("round") == rnd).iter_rows(named=True)}
            cells = [_cell(at.get(m), metric) for m in methods]
            if any(c != "–" for c in cells):  # a round no method has a value for (not evaluated) is left out
                lines.append(f"| {rnd} | {' | '.join(cells)} |")
    return lines


def round_ranges(rounds: Sequence[int]) -> str:
    """``0–3, 5``: sorted rounds with consecutive ones joined; ``none`` when empty."""
    spans: list[list[int]] = []
    for r in sorted(set(rounds)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans) or "none"


def evaluation_schedule(rows: pl.DataFrame) -> str:
    """``; greedy evaluation at rounds 0–5; sampled evaluation at rounds 0, 5`` from one run's rows ('' when
    it has no evaluation)."""
    parts = [
        f"; {kind} evaluation at rounds {round_ranges(rows.filter(pl.col(metric).is_not_null())['round'].to_list())}"
        for kind, metric in (("greedy", GREEDY), ("sampled", OUTCOME))
        if metric in rows.columns and rows[metric].is_not_null().any()
    ]
    return "".join(parts)


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return "–"
    if metric in CI_COLUMNS:
        lo, hi = CI_COLUMNS[metric]
        return fmt_ci(row.get(metric), row.get(lo), row.get(hi))
    return fmt(row.get(metric))


def _signed(value: float | None) -> str:
    text = fmt(value)
    return text if text == "–" or text.startswith("-") else "+" + text


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")
