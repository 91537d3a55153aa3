"""``itpo-batch quickstart``: the main job on the embedded default (simulate → SFT π_0 → iterate → report)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from itpo_batch.cli.common import from_config, out, user_errors
from itpo_batch.cli.iterate_cmd import main_process, phase_progress

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
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds", "-r", help="Rounds per arm (default: the task's recipe: 6 for clarify, 5 otherwise)."
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="clarify (shows learning in minutes), or medical, math, docwrite (demonstration).",
        ),
    ] = from_config(lambda: _quickstart().task),
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = from_config(lambda: _quickstart().seed),
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Reuse finished stages and rounds in --output (a quickstart folder)."),
    ] = False,
) -> None:
    """Simulate logs with the scripted policy, SFT the tiny π_0, run rounds of itpo_norm, itpo, iterative_ppo
    and outcome from it (six on clarify, five on the other tasks), and write the report. The default task, clarify (ask which option
    the user wants, then name it), shows the arms improving on π_0 with paired CIs in a few minutes on 2 CPU
    cores; the collaboration tasks (--task medical, ...) demonstrate every stage without a measurable gain.

    Example: itpo-batch quickstart -o runs/quickstart
    """
    import dataclasses

    from itpo_batch.run.quickstart import quickstart_config, run_quickstart

    cfg = dataclasses.replace(quickstart_config(task, seed), out=output)
    if main_process():  # accelerate launch: rank 0 prints
        out.print(f"quickstart on task [bold]{task}[/bold]: " + _TASK_NOTE.get(task, _TASK_NOTE["medical"]))
    if rounds is not None:
        cfg.iterate = dataclasses.replace(cfg.iterate, rounds=rounds)
    t0 = time.perf_counter()
    with phase_progress() as progress:
        stages = progress.add_task("quickstart", total=None, phase="")
        arms = progress.add_task("arm-rounds", total=cfg.iterate.rounds * len(cfg.iterate.methods), phase="")

        def hook(msg: str) -> None:
            progress.update(stages, phase=msg)

        def sft_step(step: int, total: int, loss: float) -> None:
            progress.update(stages, phase=f"sft step {step}/{total} loss {loss:.3f}")

        def on_round(done: int, total: int) -> None:
            progress.update(arms, completed=done, total=total)

        report = run_quickstart(cfg, hook, sft_step, resume=resume, on_round=on_round)
    if main_process():
        _summary(report, time.perf_counter() - t0)


_TASK_NOTE = {
    "clarify": "the learning sanity task (ask which option the user wants, then name it); π_0 guesses, "
    "the arms should learn to ask",
    "medical": "a demonstration of every stage; at these sizes no method improves measurably on π_0 "
    "(docs/results.md)",
}


def _summary(report: Path, seconds: float) -> None:
    from itpo_batch.cli.report_cmd import _final_table, _improvement_table
    from itpo_batch.run.report import Report

    rep = Report.load([report.parent])
    out.print(_final_table(rep))
    out.print(_improvement_table(rep))
    out.print(
        f"quickstart finished in {seconds / 60:.1f} min; report: [bold]{report}[/bold] (PNGs beside it)"
    )
