"""What validation found: rule violations with examples, warnings and a summary of the logs.

Violations are counted in full but only the first ``max_examples`` rows of each rule are kept (as
Python objects); everything else stays in polars frames, so a file with millions of bad rows costs
no more than one with a handful.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from itpo_batch.data.schemas import rule_message

OFFENDER_COLUMNS = ("source_file", "source_row", "conversation_id", "detail")
FILE_RULES = frozenset(
    {
        "wrong-extension",
        "unreadable-file",
        "unknown-shape",
        "missing-column",
        "duplicate-column",
        "column-type",
        "empty-file",
    }
)


@dataclass
class Violation:
    """One offending row: where it is and what is wrong with it."""

    rule: str
    file: str
    row: int | None
    conversation_id: str | None
    detail: str

    def where(self) -> str:
        parts = []
        if self.row is not None:
            unit = "line" if self.file.endswith((".jsonl", ".ndjson")) else "row"
            parts.append(f"{unit} {self.row + 1 if unit == 'line' else self.row}")
        if self.conversation_id is not None:
            parts.append(f"conversation {self.conversation_id!r}")
        return ", ".join(parts)


@dataclass
class RuleHits:
    rule: str
    count: int = 0
    examples: list[Violation] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Outcome of validating one or more log files."""

    files: list[str]
    shapes: dict[str, str] = field(default_factory=dict)
    hits: dict[str, RuleHits] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def ok(self) -> bool:
        return not self.hits

    def add(self, rule: str, offenders: pl.DataFrame) -> None:
        """Record the rows of ``offenders`` (columns :data:`OFFENDER_COLUMNS`) as breaking ``rule``."""
        if offenders.height == 0:
            return
        hits = self.hits.setdefault(rule, RuleHits(rule))
        hits.count += offenders.height
        room = self.max_examples - len(hits.examples)
        if room > 0:
            head = (
                offenders.select(OFFENDER_COLUMNS)
                .head(room)
                .with_columns(pl.col("source_file").cast(pl.String))
            )
            for r in head.iter_rows(named=True):
                hits.examples.append(
                    Violation(rule, r["source_file"], r["source_row"], r["conversation_id"], r["detail"])
                )

    def add_one(
        self, rule: str, file: str, detail: str, row: int | None = None, conversation_id: str | None = None
    ) -> None:
        hits = self.hits.setdefault(rule, RuleHits(rule))
        hits.count += 1
        if len(hits.examples) < self.max_examples:
            hits.examples.append(Violation(rule, file, row, conversation_id, detail))

    def format_errors(self) -> str:
        """Plain-text error listing: file, rule, rows and conversations, up to ``max_examples`` each."""
        by_file: dict[str, list[str]] = {}
        for hits in sorted(self.hits.values(), key=lambda h: h.rule):
            files = list(dict.fromkeys(v.file for v in hits.examples)) or ["?"]
            for f in files:
                lines = by_file.setdefault(f, [])
                total = (
                    "" if hits.rule in FILE_RULES else f" ({hits.count} row{'s' if hits.count != 1 else ''})"
                )
                lines.append(f"  [{hits.rule}] {rule_message(hits.rule)}{total}")
                for v in (v for v in hits.examples if v.file == f):
                    where = v.where()
                    lines.append(f"    {where + ': ' if where else ''}{v.detail}")
                shown = sum(v.file == f for v in hits.examples)
                if len(files) == 1 and hits.count > shown:
                    lines.append(f"    ... and {hits.count - shown} more")
        out = [f"{f}: invalid logs\n" + "\n".join(lines) for f, lines in by_file.items()]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "shapes": self.shapes,
            "errors": [
                {
                    "rule": h.rule,
                    "message": rule_message(h.rule),
                    "count": h.count,
                    "examples": [asdict(v) for v in h.examples],
                }
                for h in sorted(self.hits.values(), key=lambda h: h.rule)
            ],
            "warnings": self.warnings,
            "summary": self.summary,
        }
