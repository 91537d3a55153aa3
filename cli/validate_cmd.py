"""``itpo-batch validate``: check logs against the data contract and summarise them."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from itpo_batch.cli.common import (
    Format,
    LogFilesArg,
    OptionalModelOpt,
    err,
    format_option,
    from_config,
    out,
    user_errors,
)
from itpo_batch.core.errors import LogValidationError
from itpo_batch.data.validate import ValidateConfig, read_logs, validate_logs

if TYPE_CHECKING:
    from itpo_batch.model.render import RenderConfig


class Overflow(StrEnum):
    drop = "drop"
    truncate = "truncate"


def _render() -> RenderConfig:
    """The rendering defaults (imported on demand: itpo_batch.model.render imports transformers)."""
    from itpo_batch.model.render import RenderConfig

    return RenderConfig()


def _parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter("expected LO,HI, e.g. 0,1") from None
    return lo, hi


@user_errors
def validate(
    files: LogFilesArg,
    outcomes: Annotated[Path | None, typer.Option(help="Side table of outcomes for long-shape logs.")] = None,
    model: OptionalModelOpt = None,
    fmt: Annotated[
        Format,
        format_option(Format.table, Format.json, help="What stdout gets (json: the summary or the errors)."),
    ] = Format.table,
    max_errors: Annotated[int, typer.Option(help="Offending rows listed per broken rule.")] = from_config(
        lambda: ValidateConfig().max_examples
    ),
    outcome_range: Annotated[
        str | None, typer.Option(help="Accepted outcome range LO,HI (default from schemas/validation.json).")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Context length for token counts (default: the model's).")
    ] = None,
    overflow: Annotated[
        Overflow,
        typer.Option(help="Conversations longer than the context: drop, or truncate to whole turns."),
    ] = from_config(lambda: Overflow(_render().overflow)),
) -> None:
    """Check logs and print a summary; exit 2 with the file, conversation and rule when they are bad.

    With --model, the summary adds token counts under that model's tokenizer and chat template.

    Example: itpo-batch validate logs.parquet --model tiny --format json
    """
    cfg = ValidateConfig(max_examples=max_errors, outcomes=outcomes)
    if (rng := _parse_range(outcome_range)) is not None:
        cfg.outcome_range = rng
    if model is None:
        report = validate_logs(files, cfg)
        if not report.ok:
            _emit_failure(report.to_dict(), report.format_errors(), fmt)
        summary = report.summary
        warnings = report.warnings
    else:
        from itpo_batch.model.loading import load_tokenizer
        from itpo_batch.model.render import RenderConfig, token_summary

        try:
            logs = read_logs(files, cfg)
        except LogValidationError as e:
            _emit_failure(e.report.to_dict(), str(e), fmt)
            raise
        summary = dict(logs.report.summary)
        summary["tokens"] = token_summary(
            logs, load_tokenizer(model), RenderConfig(max_length=max_length, overflow=overflow.value)
        )
        warnings = logs.report.warnings
    if fmt is Format.json:
        out.print_json(
            json.dumps(
                {"ok": True, "files": [str(f) for f in files], "warnings": warnings, "summary": summary}
            )
        )
    else:
        for w in warnings:
            err.print(Text("warning: ", style="yellow") + Text(w), highlight=False)
        out.print(_summary_table(summary, files))


def _emit_failure(payload: dict[str, Any], text: str, fmt: Format) -> None:
    if fmt is Format.json:
        out.print_json(json.dumps(payload))
        raise typer.Exit(2)
    raise LogValidationError(text)


def _fmt_stats(d: dict[str, Any]) -> str:
    if not d or not d.get("count", 1):
        return "-"
    keys = [k for k in ("mean", "std", "min", "p50", "max") if k in d]
    return "  ".join(f"{k} {d[k]:g}" for k in keys)


def _summary_table(s: dict[str, Any], files: list[Path]) -> Table:
    t = Table(
        title=f"valid logs: {', '.join(str(f) for f in files)}", show_header=False, title_justify="left"
    )
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("conversations", f"{s['conversations']:,}")
    t.add_row("messages", f"{s['messages']:,}  ({', '.join(f'{k} {v:,}' for k, v in s['roles'].items())})")
    t.add_row("assistant turns / conv", _fmt_stats(s["assistant_turns_per_conversation"]))
    t.add_row("  histogram", "  ".join(f"{k}:{v}" for k, v in s["assistant_turns_histogram"].items()))
    t.add_row("outcome", _fmt_stats(s["outcome"]))
    if "outcome_values" in s:
        t.add_row("  values", "  ".join(f"{k}: {v}" for k, v in s["outcome_values"].items()))
    if "groups" in s:
        g = s["groups"]
        t.add_row("groups", f"{g['groups']:,} groups; size {_fmt_stats(g)}; {g['singletons']} of size one")
    if "tasks" in s:
        t.add_row("tasks", "  ".join(f"{k}: {v}" for k, v in s["tasks"].items()))
    t.add_row("optional columns", ", ".join(k for k, v in s["optional_columns"].items() if v) or "none")
    if "tokens" in s:
        tok = s["tokens"]
        t.add_row("tokens / conv", _fmt_stats(tok["tokens_per_conversation"]))
        t.add_row("assistant tokens / conv", _fmt_stats(tok["assistant_tokens_per_conversation"]))
        limit = (
            "no limit (the model states no context)"
            if tok["max_length"] is None
            else f"{tok['max_length']} tokens"
        )
        t.add_row(
            "context",
            f"{limit}; overflow={tok['overflow']}: {tok['dropped']} dropped, {tok['truncated']} truncated",
        )
    return t
