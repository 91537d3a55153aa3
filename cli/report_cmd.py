"""``itpo-batch report``: compare the methods of iterate runs (see :mod:`itpo_batch.run.report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
from rich.table import Table
from rich.text import Text

from itpo_batch.cli.common import Format, OverwriteOpt, err, format_option, out, user_errors
from itpo_batch.run.report import Report, default_out, fmt, fmt_ci, save_report, verdict
from itpo_batch.run.report_stats import CI_COLUMNS, OUTCOME, final_rounds

# (header, metric) of the final-round table; outcome also shows its CI.
COLUMNS = (
    ("outcome [95% CI]", OUTCOME),
    ("greedy succ", "eval/greedy_success"),
    ("turns", "eval/turns"),
    ("KL π0", "policy/kl_pi0"),
    ("PRM acc", "prm/pair_acc"),
    ("align", "align/advantage/spearman"),
)
_LABELS = {
    "task": "task",
    "method": "method",
    "round": "round",
    "n_runs": "runs",
    "final_round": "final round",
}
_STYLE = {"show_edge": False, "header_style": "bold", "pad_edge": False}


@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `itpo-batch iterate`.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Where report.md and the PNGs go (default: the single run's dir)."
        ),
    ] = None,
    fmt_: Annotated[
        Format,
        format_option(
            Format.table, Format.json, Format.markdown, help="What stdout gets (json: the summary rows)."
        ),
    ] = Format.table,
    overwrite: OverwriteOpt = False,
) -> None:
    """Compare methods per round: tables, PNG plots and report.md; headline = improvement over π_0.

    The headline is final-round minus round-0 outcome, paired per run, with a 95% CI (a t-interval
    across runs when several seeds are given). Several runs need --output.

    Example: itpo-batch report runs/quickstart
    """
    dest = default_out(runs, output)
    rep = Report.load(runs)
    path = save_report(rep, dest, overwrite)
    if fmt_ is Format.json:
        out.print_json(json.dumps(_json(rep, path), allow_nan=False))
    elif fmt_ is Format.markdown:
        typer.echo(path.read_text(), nl=False)  # verbatim: no rich markup or emoji codes
    else:
        out.print(_final_table(rep))
        out.print(_improvement_table(rep))
    plots = ", ".join(p.name for p in rep.plots) or "none"
    err.print(Text(f"wrote {path} and plots in {dest}: {plots}", style="dim"), highlight=False)


def _final_table(rep: Report) -> Table:
    """Final round per (task, method); task, round and run count go to the title when they are uniform."""
    last = final_rounds(rep.summary)
    uniform = [c for c in ("task", "round", "n_runs") if last[c].n_unique() == 1]
    title = ", ".join(f"{_LABELS[c]} {last[c][0]}" for c in uniform)
    table = Table(title=f"Final round per method ({title})" if title else "Final round per method", **_STYLE)
    keys = [c for c in ("task", "method", "round", "n_runs") if c not in uniform]
    for c in keys:
        table.add_column(_LABELS[c], justify="left" if c in ("task", "method") else "right", no_wrap=True)
    for header, metric in COLUMNS:
        table.add_column(header, justify="right", no_wrap=metric in CI_COLUMNS)
    for r in last.iter_rows(named=True):
        cells = [fmt_ci(r.get(m), *(r.get(c) for c in CI_COLUMNS[m])) if m in CI_COLUMNS else fmt(r.get(m))
                 for _, m in COLUMNS]  # fmt: skip
        table.add_row(*(str(r[c]) for c in keys), *cells)
    return table


def _improvement_table(rep: Report) -> Table:
    imp = rep.improvement
    uniform = [c for c in ("task", "n_runs", "final_round") if imp.height and imp[c].n_unique() == 1]
    title = "".join(f", {_LABELS[c]} {imp[c][0]}" for c in uniform)
    table = Table(title=f"Improvement over π_0 (Δ = final round − round 0, paired per run{title})", **_STYLE)
    keys = [c for c in ("task", "method", "n_runs", "final_round") if c not in uniform]
    for c in keys:
        table.add_column(_LABELS[c], justify="left" if c in ("task", "method") else "right", no_wrap=True)
    for name in ("round 0", "final", "Δ outcome", "95% CI", "CI excludes 0"):
        table.add_column(name, justify="right", no_wrap=name == "95% CI")
    for r in imp.iter_rows(named=True):
        ci = f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r["ci_low"] is not None else "–"
        table.add_row(
            *(str(r[c]) for c in keys), fmt(r["start"]), fmt(r["final"]), fmt(r["delta"]), ci,
            verdict(r["excludes_zero"], r["delta"]),
        )  # fmt: skip
    return table


def _json(rep: Report, path: Path) -> dict[str, Any]:
    return {
        "summary": _rows(rep.summary),
        "improvement": _rows(rep.improvement),
        "greedy_improvement": _rows(rep.greedy_improvement),
        "report": str(path),
        "plots": [str(p) for p in rep.plots],
    }


def _rows(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, non-finite floats as null (JSON has no NaN)."""
    return [{k: _finite(v) for k, v in row.items()} for row in df.to_dicts()]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
