"""``itpo-batch sft``: supervised warm start on the assistant turns of logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import LogFilesArg, err, out, user_errors
from itpo_batch.data.validate import read_logs

# Defaults shown in --help without importing torch at CLI start-up (itpo_batch.model.sft imports it).
_EPOCHS, _LR, _BATCH_TOKENS = 8, 2e-3, 4096


@user_errors
def sft(
    files: LogFilesArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the fine-tuned model.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="'tiny' or a local HF model directory.")
    ] = "tiny",
    epochs: Annotated[int, typer.Option(help="Passes over the logs.")] = _EPOCHS,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = _LR,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimiser step.")] = _BATCH_TOKENS,
    min_outcome: Annotated[
        float | None, typer.Option(help="Imitate only conversations with outcome >= this.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Fine-tune a model on the assistant turns of logs (loss on assistant tokens only).

    Example: itpo-batch sft logs.parquet --model tiny -o policy/
    """
    from itpo_batch.model.sft import SFTConfig, train_sft

    logs = read_logs(files)
    cfg = SFTConfig(
        model=model, epochs=epochs, lr=lr, batch_tokens=batch_tokens, min_outcome=min_outcome, seed=seed
    )
    columns = (
        TextColumn("sft"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("sft", total=None, loss=float("nan"))

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=loss)

        metrics = train_sft(logs, cfg, output, on_step=on_step)
    last = metrics[-1]
    out.print(
        f"saved {output} · {last['sft/conversations']} conversations · final loss {last['sft/loss']:.3f} "
        f"· {last['sft/tokens_per_s']:.0f} tokens/s"
    )
