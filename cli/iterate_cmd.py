"""``itpo-batch iterate``: rounds of ITPO (and baselines) vs Iterative PPO, then the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from itpo_batch.cli.common import REPORT_TO_DEFAULT, ModelOpt, ReportToOpt, err, from_config, out, user_errors
from itpo_batch.core.errors import ItpoError

if TYPE_CHECKING:
    from itpo_batch.run.config import IterateConfig

METHODS_HELP = "Comma-separated arms: itpo_norm, itpo, iterative_ppo, outcome, prime."


def _iterate() -> IterateConfig:
    """The defaults (imported on demand: itpo_batch.run.config imports torch)."""
    from itpo_batch.run.config import IterateConfig

    return IterateConfig()


def main_process() -> bool:
    """Whether this process shows progress, prints and writes the report (rank 0 under ``accelerate launch``)."""
    from itpo_batch.model.dist import is_main_process  # imports torch: on demand

    return is_main_process()


def phase_progress() -> Progress:
    """Bar of finished steps plus a text column with the current phase (``fields["phase"]``); shown by
    rank 0 alone under ``accelerate launch``."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[phase]}"))  # fmt: skip
    return Progress(*columns, console=err, transient=False, disable=not main_process())


def run_with_progress(
    cfg,
    run_dir: Path,
    resume: bool,
    new_logs: Path | None = None,
    on_round: Callable[[], object] | None = None,
):
    """Run :func:`itpo_batch.run.rounds.iterate` under a live progress bar (arm-rounds done, current phase);
    ``on_round()`` after each finished arm-round (``--report-to``)."""
    from itpo_batch.run.rounds import iterate

    with phase_progress() as progress:
        job = progress.add_task("iterate", total=cfg.rounds * len(cfg.methods), phase="starting")

        def round_done(done: int, total: int) -> None:
            progress.update(job, completed=done, total=total)
            if on_round is not None:
                on_round()

        return iterate(
            cfg, run_dir, resume=resume, new_logs=new_logs,
            hook=lambda msg: progress.update(job, phase=msg), on_round=round_done,
        )  # fmt: skip


def resolve_config(
    config: Path | None, run_dir: Path, resume: bool, flags: dict[str, object], overrides: list[str]
):
    """Defaults < the run's config.yaml (on --resume) or --config YAML < flags given < --set overrides."""
    from itpo_batch.core.config import apply_overrides, from_mapping, load_yaml
    from itpo_batch.data.store import RunDir
    from itpo_batch.run.config import IterateConfig

    run = RunDir(run_dir)
    if resume and run.config_path.is_file():
        base = run.read_config()
        # a resumed run keeps its settings (the workers change no result)
        flags = {k: v for k, v in flags.items() if k in ("rounds", "workers")}
    else:
        base = load_yaml(config) if config is not None else {}
    return from_mapping(IterateConfig, apply_overrides(base | flags, overrides))


@user_errors
def iterate(
    ctx: typer.Context,
    rounds: Annotated[int, typer.Option("--rounds", "-r", help="Rounds per arm.")] = from_config(
        lambda: _iterate().rounds
    ),
    logs: Annotated[
        Path | None,
        typer.Option(
            "--logs",
            help="Round-0 logs (default: π_0 collects them; with --resume, recorded in the run's config "
            "if round 0 has not read its logs yet); with --env none and --resume: the deployed checkpoint's logs.",
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="medical | math | docwrite | clarify | module:Class.")
    ] = from_config(lambda: _iterate().task),
    env: Annotated[str | None, typer.Option("--env", help="'none': deployment loop, no simulator.")] = None,
    methods: Annotated[str, typer.Option("--methods", help=METHODS_HELP)] = from_config(
        lambda: ",".join(_iterate().methods)
    ),
    estimator: Annotated[
        str, typer.Option("--estimator", help="rloo | rloo_once | grpo | ppo.")
    ] = from_config(lambda: _iterate().method.estimator),
    model: ModelOpt = from_config(lambda: _iterate().model),
    n: Annotated[int, typer.Option("--n", help="Conversations per round and arm.")] = from_config(
        lambda: _iterate().n
    ),
    seed: Annotated[int, typer.Option("--seed", help="Seed of everything.")] = from_config(
        lambda: _iterate().seed
    ),
    workers: Annotated[
        str,
        typer.Option(
            "--workers",
            help="Processes for the arms: 'auto' (one per core, at most one per arm) or a number; 1 runs "
            "them in this process. The results do not depend on it. Under accelerate launch always 1: "
            "each rank runs the arms in turn, the ranks share each arm-round.",
        ),
    ] = from_config(lambda: str(_iterate().workers)),
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory to write.")] = Path(
        "runs/iterate"
    ),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the last completed round.")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (flags override it).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. update.lr=3e-4.")
    ] = None,
    report_to: ReportToOpt = REPORT_TO_DEFAULT,
) -> None:
    """Rounds of ITPO / Norm-ITPO / outcome / PRIME updates vs Iterative PPO, each arm from the same π_0.

    Each round of each arm fits its signals on its logs (implicit PRM, or turn Q), updates the policy,
    collects the next logs with it (same budget for every arm) and evaluates it; then the report is written.
    Options not given come from --config (or, on --resume, the run's config.yaml), else the defaults shown.

    Example: itpo-batch iterate --rounds 5 --task medical --methods itpo_norm,itpo,iterative_ppo,outcome
    --model runs/pi0 --run-dir runs/medical

    Several GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml -m itpo_batch iterate ...
    (the same run as one process; rank 0 writes it).
    """

    def given(name: str) -> bool:  # on the command line, not the shown default
        return ctx.get_parameter_source(name).name == "COMMANDLINE"

    from itpo_batch.data.trackers import parse_report_to

    trackers = parse_report_to(report_to)  # a missing tracker package is refused before any output
    if env not in (None, "none"):
        raise ItpoError(
            f"--env takes only 'none' (the deployment loop), not {env!r}; use --task for a simulator"
        )
    values: dict[str, object] = {"rounds": rounds, "model": model, "n": n, "seed": seed,
                                 "workers": int(workers) if workers.strip().isdigit() else workers.strip()}  # fmt: skip
    flags = {k: v for k, v in values.items() if given(k)}
    if given("task") or env == "none":
        flags["task"] = None if env == "none" else task
    if given("methods"):
        flags["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    overrides = list(set_ or [])
    if given("estimator"):
        overrides.append(f"method.estimator={estimator}")
    if logs is not None and not resume:
        flags["logs"] = str(logs)
    cfg = resolve_config(config, run_dir, resume, flags, overrides)
    if resume:  # the report written at the end must be writable: refuse now, not after the last round
        from itpo_batch.run.report import check_report

        check_report(run_dir)
    t0 = time.perf_counter()
    run = _run_reporting(trackers, cfg, run_dir, resume, logs if resume else None)
    _finish(cfg, run, time.perf_counter() - t0)


def _run_reporting(names: tuple[str, ...], cfg, run_dir: Path, resume: bool, new_logs: Path | None):
    """:func:`run_with_progress`, sending each new metrics.jsonl line to the ``--report-to`` trackers
    (step: round; one series per arm) after every arm-round and at the end. The arms may run in worker
    processes, so the lines are read back from the run's metrics.jsonl, here."""
    from itpo_batch.data.trackers import MetricsForwarder, open_trackers

    with open_trackers(names, run_dir, Path(run_dir).resolve().name, cfg) as trackers:
        forward = MetricsForwarder(trackers, run_dir, step_key="round", series=cfg.methods[0])
        try:
            run = run_with_progress(cfg, run_dir, resume, new_logs, on_round=forward.sync)
        except BaseException:
            forward.sync(new_only=True)  # what this call committed before it failed
            raise
        forward.sync()  # round 0 of a run of one round, a round of --env none
        return run


def _finish(cfg, run, seconds: float) -> None:
    from itpo_batch.run.report import write_report

    if not main_process():  # accelerate launch: rank 0 reports
        return
    method = cfg.methods[0]
    done = run.completed_rounds(method)
    if cfg.task is None and done and 1 <= max(done) < cfg.rounds:
        policy = run.checkpoint_dir(method, max(done), "policy")
        out.print(f"round {max(done)} done: deploy [bold]{policy}[/bold], log its conversations, then run\n"
                  f"  itpo-batch iterate --resume --run-dir {run.path} --logs NEW.parquet")  # fmt: skip
    report = write_report([run.path], run.path)
    out.print(f"{len(cfg.methods)} arm(s) × {cfg.rounds} rounds in {seconds:.0f} s; report: {report}")
