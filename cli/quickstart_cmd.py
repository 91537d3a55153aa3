"""``itpo-batch quickstart``: the main job on the embedded default (simulate → SFT π_0 → iterate → report)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from itpo_batch.cli.common import from_config, out, user_errors
from itpo_batch.cli.iterate_cmd import phase_progress

if TYPE_CHECKING:
    from itpo_batch.run.quickstart import QuickstartConfig


def _quickstart() -> QuickstartConfig:
    """The defaults (imported on demand: itpo_batch.run.quickstart imports torch)."""
    from itpo_batch.run.quickstart import QuickstartConfig

    return QuickstartConfig()


@user_errors
def quickstart(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where everything goes.")] = from_config(
        lambda: _quickstart().out
    ),
    rounds: Annotated[int, typer.Option("--rounds", "-r", help="Rounds per arm.")] = from_config(
        lambda: _quickstart().iterate.rounds
    ),
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = from_config(lambda: _quickstart().seed),
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Reuse finished stages and rounds in --output (a quickstart folder)."),
    ] = False,
) -> None:
    """Simulate medical logs with the scripted policy, SFT the tiny π_0, run 5 rounds of itpo_norm, itpo,
    iterative_ppo and outcome from it, and write the report (3.6 minutes measured on this 2-core CPU).

    Example: itpo-batch quickstart -o runs/quickstart
    """
    import dataclasses

    from itpo_batch.run.quickstart import run_quickstart

    cfg = dataclasses.replace(_quickstart(), out=output, seed=seed)
    cfg.iterate = dataclasses.replace(cfg.iterate, rounds=rounds)
    t0 = time.perf_counter()
    with phase_progress() as progress:
        stages = progress.add_task("quickstart", total=None, phase="")
        arms = progress.add_task("arm-rounds", total=rounds * len(cfg.iterate.methods), phase="")

        def hook(msg: str) -> None:
            progress.update(stages, phase=msg)

        def sft_step(step: int, total: int, loss: float) -> None:
            progress.update(stages, phase=f"sft step {step}/{total} loss {loss:.3f}")

        def on_round(done: int, total: int) -> None:
            progress.update(arms, completed=done, total=total)

        report = run_quickstart(cfg, hook, sft_step, resume=resume, on_round=on_round)
    _summary(report, time.perf_counter() - t0)


def _summary(report: Path, seconds: float) -> None:
    from itpo_batch.cli.report_cmd import _final_table, _improvement_table
    from itpo_batch.run.report import Report

    rep = Report.load([report.parent])
    out.print(_final_table(rep))
    out.print(_improvement_table(rep))
    out.print(
        f"quickstart finished in {seconds / 60:.1f} min; report: [bold]{report}[/bold] (PNGs beside it)"
    )
