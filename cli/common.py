"""Shared CLI plumbing: one error path, consoles, and option aliases reused by every command."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from enum import StrEnum
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


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="'tiny' (the embedded default) or a local HF model directory."),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")]
LogFilesArg = Annotated[
    list[Path],
    typer.Argument(
        help="Log files: Parquet (.parquet/.pq) or JSON Lines (.jsonl/.ndjson), nested or long shape."
    ),
]
