"""The ``itpo-batch`` command line: parses options and calls the library, nothing more.

The code lives in the repository's top-level ``cli/`` folder and is imported as ``itpo_batch.cli``:
``itpo_batch/cli`` is a symlink to it, so the one import path works from the source tree, in the
editable install, and in the wheel (where hatchling stores the files under ``itpo_batch/cli/``).
"""

from __future__ import annotations

import typer

from itpo_batch.cli import (
    iterate_cmd,
    quickstart_cmd,
    report_cmd,
    score_cmd,
    sft_cmd,
    simulate_cmd,
    sql_cmd,
    validate_cmd,
)

app = typer.Typer(
    name="itpo-batch",
    help="Turn-level credit (implicit PRM / ITPO) and batch policy improvement from logged conversations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Turn-level credit (implicit PRM / ITPO) and batch policy improvement from logged conversations."""


app.command("quickstart")(quickstart_cmd.quickstart)
app.command("simulate")(simulate_cmd.simulate)
app.command("validate")(validate_cmd.validate)
app.command("sft")(sft_cmd.sft)
app.command("score")(score_cmd.score)
app.command("sql")(sql_cmd.sql)
app.command("iterate")(iterate_cmd.iterate)
app.command("report")(report_cmd.report)


def main() -> None:
    """Console-script entry point (also ``python -m itpo_batch``)."""
    app(prog_name="itpo-batch")


if __name__ == "__main__":
    main()
