"""PNG plots of a :func:`itpo_batch.run.report.summarise` table: one file per quantity, x = conversations consumed.

Design decisions:

* **No display, no global state.** Figures are built with :class:`matplotlib.figure.Figure` and the Agg
  canvas directly instead of pyplot, so nothing depends on (or changes) the process-wide backend, no
  window can open, and no figure is left registered after an error.
* **One colour per method everywhere.** Methods are sorted once and given the next colour of the
  ``tab10`` cycle, so ``itpo_norm`` has the same colour in every file and every task's subplot.
* **One subplot per task** in the same figure (at most three per row), each titled with its task, and
  one legend below them all (methods by colour; for two lines per method, the styles in grey).
* **Absent is skipped, missing is left out.** A plot whose metrics are entirely absent is not written.
  A round without a value (null: e.g. a round the evaluation schedule skips, see
  :class:`itpo_batch.run.evaluate.EvalConfig`) is left out of its line, never drawn as zero: the line
  joins the rounds that have a value and a marker shows each of them, so a sampled outcome evaluated at
  rounds 0 and 5 only is one segment with two markers.
* **Atomic, and never over a file it did not write.** Each PNG is claimed (:func:`itpo_batch.data.io.claim_output`,
  its hash recorded in the folder's marker), saved to a temporary name and moved into place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from itpo_batch.data.io import claim_output


@dataclass(frozen=True)
class Line:
    metric: str
    label: str = ""  # legend entry for the line style when a plot has several lines
    style: str = "-"


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    band: tuple[str, str] | None = None  # CI columns drawn as a shaded band around the first line


BUDGET = "budget/conversations"

PLOTS = (
    Plot(
        "outcome",
        "Outcome (sampled, temperature 1), mean and 95% CI",
        "outcome",
        (Line("eval/outcome_mean"),),
        ("eval/outcome_ci_low", "eval/outcome_ci_high"),
    ),
    Plot(
        "greedy_outcome",
        "Outcome (greedy), mean and 95% CI",
        "outcome",
        (Line("eval/greedy_outcome_mean"),),
        ("eval/greedy_outcome_ci_low", "eval/greedy_outcome_ci_high"),
    ),
    Plot(
        "success",
        "Success rate",
        "success",
        (Line("eval/success", "sampled"), Line("eval/greedy_success", "greedy", "--")),
    ),
    Plot("turns", "Assistant turns per conversation", "turns", (Line("eval/turns"),)),
    Plot("kl", "KL to π_0 (nats per token)", "KL(π ‖ π_0)", (Line("policy/kl_pi0"),)),
    Plot(
        "alignment",
        "Credit alignment: Spearman with the oracle turn utility",
        "Spearman",
        (
            Line("align/advantage/spearman", "advantage"),
            Line("align/turn_reward/spearman", "turn reward", "--"),
        ),
    ),
)


def method_colours(methods: list[str]) -> dict[str, str]:
    """A fixed colour per method (sorted names over the tab10 cycle)."""
    cycle = matplotlib.colormaps["tab10"].colors
    return {m: matplotlib.colors.to_hex(cycle[i % len(cycle)]) for i, m in enumerate(sorted(set(methods)))}


def has_data(summary: pl.DataFrame, plot: Plot) -> bool:
    """Whether any of the plot's metrics has at least one value."""
    present = [ln.metric for ln in plot.lines if ln.metric in summary.columns]
    return any(summary[m].null_count() < summary.height for m in present)


def plot_paths(summary: pl.DataFrame, out_dir: Path) -> list[Path]:
    """``out_dir/NAME.png`` of every plot that has data, in PLOTS order (what :func:`write_plots` writes)."""
    return [Path(out_dir) / f"{plot.name}.png" for plot in PLOTS if has_data(summary, plot)]


def write_plots(summary: pl.DataFrame, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write every plot that has data as ``out_dir/NAME.png``; returns the paths written, in PLOTS order.

    A PNG that exists is replaced only when it is the one report wrote there last (or ``overwrite``).
    """
    colours = method_colours(summary["method"].unique().to_list())
    written = []
    for plot in PLOTS:
        if not has_data(summary, plot):
            continue
        dest = Path(out_dir) / f"{plot.name}.png"
        claim = claim_output(dest, "file", "report", overwrite=overwrite, record=True)
        fig = draw(summary, plot, colours)
        with claim.atomic() as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        written.append(dest)
    return written


def draw(summary: pl.DataFrame, plot: Plot, colours: dict[str, str]) -> Figure:
    """The figure of one plot: a subplot per task, a line per method, one legend below."""
    tasks = summary["task"].unique(maintain_order=True).to_list()
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = Figure(figsize=(max(6.4, 4.8 * ncols), 1.2 + 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks, strict=False):
        _draw_task(ax, summary.filter(pl.col("task") == task), plot, colours)
        ax.set_title(f"task: {task}")
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    methods = sorted(summary["method"].unique().to_list())
    handles = [Line2D([], [], color=colours[m], marker="o", ms=4, label=m) for m in methods]
    if len(plot.lines) > 1:  # line styles are explained once, in grey
        handles += [Line2D([], [], color="grey", ls=ln.style, label=ln.label) for ln in plot.lines]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    fig.suptitle(plot.title)
    return fig


def _draw_task(ax: Axes, rows: pl.DataFrame, plot: Plot, colours: dict[str, str]) -> None:
    for method in sorted(rows["method"].unique().to_list()):
        part = rows.filter(pl.col("method") == method).sort("round")
        for i, line in enumerate(plot.lines):
            if line.metric not in part.columns:
                continue
            have = part.filter(pl.col(line.metric).is_not_null())  # rounds with a value (module docstring)
            x, y = _values(have, x_column(rows)), _values(have, line.metric)
            ax.plot(x, y, line.style, marker="o", ms=4, color=colours[method], label=method)
            if i == 0 and plot.band is not None and all(c in have.columns for c in plot.band):
                lo, hi = (_values(have, c) for c in plot.band)
                ax.fill_between(x, lo, hi, color=colours[method], alpha=0.15, linewidth=0)
    ax.set_xlabel("conversations consumed" if x_column(rows) == BUDGET else "round")
    ax.set_ylabel(plot.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def x_column(rows: pl.DataFrame) -> str:
    """The x-axis: logged conversations consumed (sample efficiency can be read off) when every row has
    it, else the round (runs written before ``budget/conversations`` existed)."""
    return BUDGET if BUDGET in rows.columns and rows[BUDGET].null_count() == 0 else "round"


def _values(part: pl.DataFrame, column: str) -> np.ndarray:
    return part[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()
