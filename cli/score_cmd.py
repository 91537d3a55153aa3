"""``itpo-batch score``: implicit turn rewards (PRM) and turn Q-values for logged conversations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from itpo_batch.cli.common import (
    REPORT_TO_DEFAULT,
    LogFilesArg,
    ModelOpt,
    OverwriteOpt,
    ReportToOpt,
    err,
    from_config,
    out,
    user_errors,
)
from itpo_batch.data.validate import read_logs

if TYPE_CHECKING:
    from itpo_batch.credit.score import ScoreConfig


def _score() -> ScoreConfig:
    """The defaults (imported on demand: itpo_batch.credit.score imports torch)."""
    from itpo_batch.credit.score import ScoreConfig

    return ScoreConfig()


@user_errors
def score(
    files: LogFilesArg,
    model: ModelOpt = from_config(lambda: _score().model),
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run directory to write (a new or empty folder).")
    ] = Path("runs/score"),
    overwrite: OverwriteOpt = False,
    prm_epochs: Annotated[
        int, typer.Option(help="Passes of the implicit PRM over the training split.")
    ] = from_config(lambda: _score().prm.epochs),
    beta: Annotated[float, typer.Option(help="Implicit PRM beta (PRIME: 0.05).")] = from_config(
        lambda: _score().prm.beta
    ),
    center: Annotated[
        bool,
        typer.Option(
            "--center",
            help="Subtract the batch's mean token reward before the turn sums (not official; docs/method.md §2.2).",
        ),
    ] = from_config(lambda: _score().prm.center),
    q_epochs: Annotated[
        int, typer.Option(help="Passes of the Q-model over the training split.")
    ] = from_config(lambda: _score().q.epochs),
    gamma: Annotated[
        float, typer.Option(help="Discount over assistant turns for the Q targets.")
    ] = from_config(lambda: _score().q.gamma),
    holdout: Annotated[
        float, typer.Option(help="Fraction of conversations held out to evaluate both models.")
    ] = from_config(lambda: _score().q.holdout),
    seed: Annotated[int, typer.Option(help="Seed (split, shuffling, initialisation).")] = from_config(
        lambda: _score().seed
    ),
    report_to: ReportToOpt = REPORT_TO_DEFAULT,
) -> None:
    """Fit the implicit PRM and the turn Q-model on logs and write scored turns to a run directory.

    Example: itpo-batch score logs.parquet --model policy/ -o runs/medical
    """
    from dataclasses import replace

    from itpo_batch.credit.score import run_score, top_turns
    from itpo_batch.data.trackers import parse_report_to
    from itpo_batch.model.dist import is_main_process  # accelerate launch: rank 0 shows and reports

    trackers = parse_report_to(report_to)  # a missing tracker package is refused before any output
    logs = read_logs(files)
    base = _score()
    cfg = replace(
        base,
        model=model,
        seed=seed,
        prm=replace(base.prm, beta=beta, epochs=prm_epochs, center=center),
        q=replace(base.q, gamma=gamma, epochs=q_epochs, holdout=holdout),
    )
    columns = (TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, disable=not is_main_process()) as progress:
        tasks: dict[str, int] = {}

        def on_step(phase: str, step: int, total: int, loss: float) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total, loss=loss)
            progress.update(tasks[phase], completed=step, total=total, loss=loss)

        result = run_score(logs, cfg, output, progress=on_step, overwrite=overwrite)
    if not is_main_process():
        return
    _report(trackers, output, cfg)
    m = result.metrics
    n_all, n_scored = logs.conversations.height, result.conversations.height
    dropped = f" ({n_all - n_scored} of {n_all} dropped for length)" if n_scored < n_all else ""
    out.print(f"[bold]scored[/] {m['score/turns']} turns of {n_scored} conversations{dropped} → {output}")
    if dropped:
        warning = Text("warning: ", style="yellow") + Text(_dropped_note(logs, result, cfg))
        err.print(warning, highlight=False, soft_wrap=True)
    out.print(_diagnostics(m))
    if result.alignment.height:
        out.print(_alignment_table(result))
    best, worst = top_turns(result.turns)
    out.print(_turn_table("highest implicit reward", best))
    out.print(_turn_table("lowest implicit reward", worst))
    out.print(
        f'query them: itpo-batch sql "SELECT * FROM turns ORDER BY implicit_reward DESC LIMIT 10" --run {output}'
    )


def _report(names: tuple[str, ...], output: Path, cfg: ScoreConfig) -> None:
    """Send the run's metrics.jsonl line to the ``--report-to`` trackers (series ``score``, step 0)."""
    from itpo_batch.data.trackers import MetricsForwarder, open_trackers

    with open_trackers(names, output, output.name, cfg) as trackers:
        MetricsForwarder(trackers, output, step_key="round", series="score").sync()


def _dropped_note(logs, result, cfg: ScoreConfig) -> str:
    """Which conversations got no credit because they do not fit the PRM's context, and why (stderr)."""
    from itpo_batch.model.loading import load_tokenizer
    from itpo_batch.model.render import RenderConfig, resolve_max_length

    kept = set(result.conversations["conversation_id"].to_list())
    ids = [c for c in logs.conversations["conversation_id"].to_list() if c not in kept]
    context = resolve_max_length(RenderConfig(max_length=cfg.prm.max_length), load_tokenizer(cfg.model))
    why = (
        f"longer than the {context}-token context (overflow=drop)"
        if cfg.prm.overflow == "drop"
        else f"not even the first assistant turn fits in the {context}-token context (overflow=truncate "
        "keeps whole leading turns)"
    )
    shown = ", ".join(repr(c) for c in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return (
        f"{len(ids)} of {logs.conversations.height} conversations dropped, not scored: {why}: {shown}. "
        "They have no turns and no conversation row in the run."
    )


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _metric_text(key: str, m: dict) -> str:
    """A diagnostic's value; a pair accuracy over no pair (NaN: undefined) reads ``n/a (0 pairs)``."""
    if key.endswith(("/pair_acc", "/pair_acc_weighted")) and m.get(key.rsplit("/", 1)[0] + "/n_pairs") == 0:
        return "n/a (0 pairs)"
    return _fmt(m[key])


def _diagnostics(m: dict) -> Table:
    t = Table(title="diagnostics", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    keys = [k for k in m if k.startswith(("prm/", "q/")) and not k.endswith("_seconds")]
    for k in keys:
        t.add_row(k, _metric_text(k, m))
    return t


def _alignment_table(result) -> Table:
    t = Table(title="credit alignment with the oracle utility (Spearman / AUROC)", title_justify="left")
    for c in ("task", "signal", "turns", "spearman", "auroc"):
        t.add_column(c, justify="left" if c in ("task", "signal") else "right")
    for row in result.alignment.iter_rows(named=True):
        t.add_row(row["task"], row["signal"], str(row["turns"]), _fmt(row["spearman"]), _fmt(row["auroc"]))
    return t


def _turn_table(title: str, rows) -> Table:
    t = Table(title=title, title_justify="left", expand=True)
    t.add_column("conversation", no_wrap=True, max_width=28)
    t.add_column("turn", justify="right")
    t.add_column("outcome", justify="right")
    t.add_column("implicit reward", justify="right")
    t.add_column("Q", justify="right")
    t.add_column("text", min_width=32, ratio=1)
    for r in rows.iter_rows(named=True):
        text = (r["content"] or "")[:200]
        t.add_row(
            r["conversation_id"],
            str(r["turn"]),
            _fmt(r["outcome"]),
            _fmt(r["implicit_reward"]),
            _fmt(r["q_value"]),
            text,
        )
    return t
