"""``itpo-batch sft``: supervised warm start on the assistant turns of logs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    from itpo_batch.model.sft import SFTConfig


def _sft() -> SFTConfig:
    """The defaults (imported on demand: itpo_batch.model.sft imports torch)."""
    from itpo_batch.model.sft import SFTConfig

    return SFTConfig()


@user_errors
def sft(
    files: LogFilesArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the fine-tuned model (a new or empty one).")
    ],
    overwrite: OverwriteOpt = False,
    model: ModelOpt = from_config(lambda: _sft().model),
    epochs: Annotated[int, typer.Option(help="Passes over the logs.")] = from_config(lambda: _sft().epochs),
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = from_config(lambda: _sft().lr),
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimiser step.")] = from_config(
        lambda: _sft().batch_tokens
    ),
    min_outcome: Annotated[
        float | None, typer.Option(help="Imitate only conversations with outcome >= this.")
    ] = from_config(lambda: _sft().min_outcome),
    seed: Annotated[int, typer.Option(help="Seed.")] = from_config(lambda: _sft().seed),
    report_to: ReportToOpt = REPORT_TO_DEFAULT,
) -> None:
    """Fine-tune a model on the assistant turns of logs (loss on assistant tokens only).

    Example: itpo-batch sft logs.parquet --model tiny -o policy/
    """
    import dataclasses

    from itpo_batch.data.io import claim_output
    from itpo_batch.data.trackers import parse_report_to
    from itpo_batch.model.dist import is_main_process  # accelerate launch: rank 0 shows and reports
    from itpo_batch.model.sft import train_sft

    trackers = parse_report_to(report_to)  # a missing tracker package is refused before any output
    logs = read_logs(files)
    claim_output(output, "dir", "sft", overwrite=overwrite)  # refused before the progress bar shows
    cfg = dataclasses.replace(
        _sft(),
        model=model,
        epochs=epochs,
        lr=lr,
        batch_tokens=batch_tokens,
        min_outcome=min_outcome,
        seed=seed,
    )
    columns = (
        TextColumn("sft"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False, disable=not is_main_process()) as progress:
        task = progress.add_task("sft", total=None, loss=float("nan"))

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=loss)

        metrics = train_sft(logs, cfg, output, on_step=on_step, overwrite=overwrite)
    if not is_main_process():
        return
    _report(trackers, output, cfg)
    last = metrics[-1]
    out.print(
        f"saved {output} · {last['sft/conversations']} conversations · final loss {last['sft/loss']:.3f} "
        f"· {last['sft/tokens_per_s']:.0f} tokens/s"
    )


def _report(names: tuple[str, ...], output: Path, cfg: SFTConfig) -> None:
    """Send the epochs of ``output/metrics.jsonl`` to the ``--report-to`` trackers (step: epoch)."""
    from itpo_batch.data.trackers import MetricsForwarder, open_trackers

    with open_trackers(names, output, output.name, cfg) as trackers:
        MetricsForwarder(trackers, output, step_key="epoch", series="sft").sync()
