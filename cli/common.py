"""Shared CLI plumbing: one error path, consoles, and the options every command spells the same way.

Design decisions:

- **One dialect** (sqlite-utils' shared output options are the model): ``-o/--output`` is the file or
  folder a command writes, ``--run`` a run directory it reads, ``--run-dir`` one it writes (``iterate``),
  ``-r`` is ``--rounds``, ``-m/--model`` the model and ``-f/--format`` one shared :class:`Format` enum,
  of which each command accepts its subset (:func:`format_option`). ``--overwrite`` (:data:`OverwriteOpt`)
  is the one way to replace an existing output (``score``, ``sft``, ``simulate``, ``sql``, ``report``);
  ``iterate`` and ``quickstart`` write in place and continue with ``--resume`` instead (rules:
  :mod:`itpo_batch.data.io`). ``tests/test_cli_options.py`` walks every command and fails when a spelling
  drifts.
- **Defaults live in the config dataclasses.** An option whose value ends up in a config takes its default
  from there through :func:`from_config`, never as a copied literal. The config modules import torch
  (seconds), so the default is read only when it is needed: when the command runs without the option,
  or when its ``--help`` is printed. ``itpo-batch --help``, ``sql``, ``report`` and ``validate`` stay fast.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from itpo_batch.core.errors import ItpoError

# Nothing in this tool may reach the hub; make that true for every library it calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Our own progress bars say what is happening; the hub/transformers ones (loading, saving shards) are noise.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn :class:`ItpoError` into a message on stderr and its exit code (2), with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ItpoError as e:
            err.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper  # type: ignore[return-value]


class FromConfig:
    """An option's default, read from a config dataclass when it is needed.

    click calls a callable default when the option is not given; typer prints ``str()`` of a callable
    that is not a plain function in ``--help`` (a plain function would show as "(dynamic)"), so the help
    shows the config's value without the CLI importing the config module to start.
    """

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read

    def __call__(self) -> Any:
        return self.read()

    def __str__(self) -> str:
        value = self.read()
        if value is None:
            return ""  # as for a plain None default: no "[default: ...]"
        return str(value.value if isinstance(value, Enum) else value)

    def __repr__(self) -> str:
        return f"FromConfig({self})"


def from_config(read: Callable[[], Any]) -> Any:
    """Default of an option: ``read()`` (e.g. ``lambda: _sft().epochs``), called lazily; see :class:`FromConfig`."""
    return FromConfig(read)


class Format(StrEnum):
    """Every output format of the CLI; each command accepts a subset (:func:`format_option`)."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    markdown = "markdown"
    parquet = "parquet"


def format_option(*accepted: Format, help: str) -> Any:
    """``-f/--format`` with the shared :class:`Format` choices; a format outside ``accepted`` exits 2."""
    values = [f.value for f in Format if f in accepted]  # in the enum's order, as --help lists the choices
    names = " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)

    def check(ctx: typer.Context, value: Format | None) -> Format | None:
        if value is not None and value not in accepted:
            raise typer.BadParameter(f"{ctx.info_name} writes only {names}, not {value.value}")
        return value

    return typer.Option("--format", "-f", callback=check, help=f"{help} Accepted here: {names}.")


_MODEL = typer.Option(
    "--model", "-m", help="'tiny' (the embedded model), 'smollm2' (smol extra) or a local HF model directory."
)
ModelOpt = Annotated[str, _MODEL]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output file, or an output folder itpo-batch wrote (never one it did not); "
        "the old one goes only once the new one is complete.",
    ),
]
OptionalModelOpt = Annotated[str | None, _MODEL]
LogFilesArg = Annotated[
    list[Path],
    typer.Argument(
        help="Log files: Parquet (.parquet/.pq) or JSON Lines (.jsonl/.ndjson), nested or long shape."
    ),
]


def _report_to_default() -> str:
    """``--report-to``'s default (imported on demand, like the other config defaults)."""
    from itpo_batch.data.trackers import TrackerConfig

    return TrackerConfig().report_to


ReportToOpt = Annotated[
    str,
    typer.Option(
        "--report-to",
        help="Experiment trackers that also get every metrics.jsonl line: none, or tensorboard, wandb, "
        "trackio, comma-separated (offline/local files under the output folder; each needs the itpo-batch "
        "extra of its name).",
    ),
]
REPORT_TO_DEFAULT: Any = from_config(_report_to_default)
