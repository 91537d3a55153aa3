"""Validate logs against the data contract and build the canonical tables.

Every command that reads logs goes through :func:`read_logs` (or :func:`validate_logs`, which keeps no
message text), so the rules of ``schemas/validation.json`` guard all of them. A file with any broken
rule raises :class:`~itpo_batch.core.errors.LogValidationError` whose message names the file, the rule,
the rows and the conversations; nothing is written before validation has passed.

Memory: files are read batch by batch (:mod:`itpo_batch.data.raw`, :mod:`itpo_batch.data.logs`). Row rules are checked per batch;
cross-row rules run at the end on compact columns (ids, turn indices, roles, outcomes, a 32-byte hash
of non-assistant messages), never on message text. So ``validate`` on a file larger than memory needs
memory for roughly 100 bytes per message, not for the file.

Groups: without a ``group_id`` column, conversations with identical messages before the first
assistant message share a group (``auto-`` + md5 prefix); a warning says so and how many groups formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl

from itpo_batch.core.errors import LogValidationError
from itpo_batch.data.logs import CONVERSATION_LEVEL, canonical_batch, check_columns, detect_shape
from itpo_batch.data.raw import FileProblem, detect_format, iter_raw_batches
from itpo_batch.data.schemas import canonical_cast, load_schema, validation_rules
from itpo_batch.data.summary import summarize
from itpo_batch.data.validation_report import OFFENDER_COLUMNS, ValidationReport

_RULES = validation_rules()


@dataclass
class ValidateConfig:
    """Limits for validation (defaults from ``schemas/validation.json``)."""

    outcome_range: tuple[float, float] = tuple(_RULES["outcome_range"])  # type: ignore[assignment]
    "Inclusive range every outcome must lie in."
    max_content_chars: int = _RULES["max_content_chars"]
    "Longest message content accepted, in characters."
    max_examples: int = 5
    "Offending rows listed per broken rule."
    batch_size: int = 8192
    "Rows read per batch (bounds memory while streaming)."
    outcomes: Path | None = None
    "Side table (conversation_id, outcome, ...) for long-shape logs without an outcome column."
    roles: tuple[str, ...] = field(default_factory=lambda: tuple(_RULES["roles"]))
    "Accepted message roles."


@dataclass
class Logs:
    """Validated logs in canonical form (``schemas/conversations``, ``schemas/messages``)."""

    conversations: pl.DataFrame
    messages: pl.DataFrame
    report: ValidationReport

    def chats(self) -> list[list[dict[str, str]]]:
        """Messages of each conversation (in ``conversations`` order) as HF chat dicts, for rendering."""
        grouped = self.messages.group_by("conversation_id", maintain_order=True).agg(
            pl.struct("role", "content").alias("chat")
        )
        order = self.conversations.select("conversation_id").join(grouped, on="conversation_id", how="left")
        return order["chat"].to_list()


def validate_logs(paths: Sequence[Path | str], cfg: ValidateConfig | None = None) -> ValidationReport:
    """Check files without keeping message text; the report lists every broken rule."""
    return _scan([Path(p) for p in paths], cfg or ValidateConfig(), keep_text=False)[0]


def read_logs(paths: Sequence[Path | str], cfg: ValidateConfig | None = None) -> Logs:
    """Validate and load logs into canonical tables; raise :class:`LogValidationError` if any rule breaks."""
    report, conv, msgs = _scan([Path(p) for p in paths], cfg or ValidateConfig(), keep_text=True)
    if not report.ok:
        raise LogValidationError(report.format_errors(), report)
    conv = canonical_cast(conv, load_schema("conversations"))
    return Logs(conv, canonical_cast(msgs, load_schema("messages")), report)


def _scan(
    paths: list[Path], cfg: ValidateConfig, keep_text: bool
) -> tuple[ValidationReport, pl.DataFrame, pl.DataFrame]:
    report = ValidationReport([str(p) for p in paths], max_examples=cfg.max_examples)
    convs, msgs = [], []
    for path in paths:
        try:
            shape, conv, msg = _scan_file(path, cfg, report, keep_text)
        except FileProblem as p:
            report.add_one(p.rule, str(path), p.detail, p.row)
            continue
        report.shapes[str(path)] = shape
        if shape == "long":
            msg, conv = _long_conversations(msg, cfg, report, keep_text)
        convs.append(conv)
        msgs.append(msg)
    if not convs:
        return report, pl.DataFrame(), pl.DataFrame()
    conv = pl.concat(convs, how="diagonal_relaxed", rechunk=True)
    msg = pl.concat(msgs, how="diagonal_relaxed", rechunk=True)
    _conversation_checks(conv, cfg, report)
    conv = _assign_groups(conv, msg, report)
    report.summary = summarize(conv, msg)
    return report, conv, msg


def _scan_file(path: Path, cfg: ValidateConfig, report: ValidationReport, keep_text: bool):
    shape, convs, msgs = None, [], []
    fmt = detect_format(path)
    for rows, batch in iter_raw_batches(path, cfg.batch_size):
        if shape is None:
            shape = detect_shape(batch.schema.names)
            check_columns(batch.schema, load_schema(f"logs.{shape}"))
        elif fmt == "jsonl":
            check_columns(batch.schema, load_schema(f"logs.{shape}"), batch=True)
        cb = canonical_batch(batch, shape, rows, str(path))
        _row_checks(cb.messages, cfg, report, shape)
        if cb.conversations is not None:
            convs.append(cb.conversations)
        msgs.append(_compact(cb.messages, keep_text))
    if shape is None:
        raise FileProblem("empty-file", "the file holds no rows")
    conv = pl.concat(convs, how="diagonal_relaxed", rechunk=True) if convs else None
    return shape, conv, pl.concat(msgs, how="diagonal_relaxed", rechunk=True)


def _compact(msgs: pl.DataFrame, keep_text: bool) -> pl.DataFrame:
    msgs = msgs.with_columns(
        n_chars=pl.col("content").str.len_chars().cast(pl.Int32),
        msg_hash=pl.when(pl.col("role") == "assistant").then(None).otherwise(pl.col("msg_hash")),
        has_behavior=pl.col("behavior_logprobs").is_not_null(),
    )
    return msgs if keep_text else msgs.drop("content", "behavior_logprobs", strict=False)


def _offenders(df: pl.DataFrame, mask: pl.Expr, detail: pl.Expr) -> pl.DataFrame:
    return df.filter(mask).select(
        pl.col("source_file").cast(pl.String), "source_row", "conversation_id", detail.alias("detail")
    )


def _row_checks(msgs: pl.DataFrame, cfg: ValidateConfig, report: ValidationReport, shape: str) -> None:
    """Rules that one message row breaks on its own (vectorised over the batch)."""
    where = pl.format("message {}", "turn_index")
    for col in ("conversation_id", "role", "content") + (("turn_index",) if shape == "long" else ()):
        report.add(
            "null-value",
            _offenders(msgs, pl.col(col).is_null(), pl.format("{}: {} is null", where, pl.lit(col))),
        )
    role = pl.col("role")
    bad_role = role.is_not_null() & ~role.is_in(list(cfg.roles))
    report.add("unknown-role", _offenders(msgs, bad_role, pl.format("{}: role '{}'", where, role)))
    text = pl.col("content")
    empty = text.is_not_null() & (text.str.strip_chars().str.len_chars() == 0)
    report.add("empty-content", _offenders(msgs, empty, pl.format("{}: {} content is empty", where, role)))
    n = text.str.len_chars()
    big = n > cfg.max_content_chars
    report.add(
        "oversized-content",
        _offenders(msgs, big, pl.format("{}: {} characters > {}", where, n, pl.lit(cfg.max_content_chars))),
    )
    if shape == "long":
        stray = pl.col("behavior_logprobs").is_not_null() & (role != "assistant")
        report.add(
            "behavior-logprobs-count",
            _offenders(msgs, stray, pl.format("{}: behavior_logprobs on a {} row", where, role)),
        )


def _long_conversations(msgs: pl.DataFrame, cfg: ValidateConfig, report: ValidationReport, keep_text: bool):
    """Cross-row rules of long logs, then one conversation row per conversation (first-seen order).

    One ``group_by`` pass computes both the rule statistics and the conversation rows; the messages are
    sorted only when their text is kept (``read_logs``), since validation alone does not need order.
    """
    msgs = msgs.filter(pl.col("conversation_id").is_not_null() & pl.col("turn_index").is_not_null())
    dup = msgs.group_by("conversation_id", "turn_index").agg(
        n=pl.len(), source_row=pl.col("source_row").min(), source_file=pl.col("source_file").first()
    )
    dup = dup.filter(pl.col("n") > 1).sort("source_row")
    detail = pl.format("turn_index {} appears {} times", "turn_index", "n")
    report.add("duplicate-turn-index", dup.select(*OFFENDER_COLUMNS[:3], detail.alias("detail")))
    stats = msgs.group_by("conversation_id", maintain_order=True).agg(
        source_file=pl.col("source_file").first(),
        source_row=pl.col("source_row").min(),
        n_messages=pl.len().cast(pl.Int32),
        n_assistant_turns=(pl.col("role") == "assistant").sum().cast(pl.Int32),
        lo=pl.col("turn_index").min(),
        hi=pl.col("turn_index").max(),
        n_unique=pl.col("turn_index").n_unique(),
        **{f"k_{c}": pl.col(c).drop_nulls().n_unique() for c in CONVERSATION_LEVEL},
        **{c: pl.col(c).drop_nulls().first() for c in CONVERSATION_LEVEL},
    )
    gap = (pl.col("lo") != 0) | (pl.col("hi") != pl.col("n_unique") - 1)
    gap_detail = pl.format("turn indices run {}..{} over {} distinct values", "lo", "hi", "n_unique")
    report.add("turn-index-gap", _offenders(stats, gap, gap_detail))
    mixed = pl.col("k_outcome") > 1
    report.add("mixed-outcome", _offenders(stats, mixed, pl.format("{} different outcomes", "k_outcome")))
    for c in CONVERSATION_LEVEL[1:]:
        detail = pl.format("{} different values of {}", f"k_{c}", pl.lit(c))
        report.add("mixed-conversation-field", _offenders(stats, pl.col(f"k_{c}") > 1, detail))
    conv = stats.drop("lo", "hi", "n_unique", *[f"k_{c}" for c in CONVERSATION_LEVEL])
    if keep_text:
        msgs = msgs.sort(["conversation_id", "turn_index"], maintain_order=True)
        is_asst = pl.col("role") == "assistant"
        turn = is_asst.cast(pl.Int32).cum_sum().over("conversation_id") - 1
        msgs = msgs.with_columns(assistant_turn=pl.when(is_asst).then(turn))
    if cfg.outcomes is not None:
        conv = _join_side_table(conv, cfg, report)
    return msgs, conv.with_columns(n_behavior=pl.lit(None, dtype=pl.UInt32))


def _join_side_table(conv: pl.DataFrame, cfg: ValidateConfig, report: ValidationReport) -> pl.DataFrame:
    path = Path(cfg.outcomes)  # type: ignore[arg-type]
    table = load_schema("outcomes")
    parts = []
    try:
        for rows, batch in iter_raw_batches(path, cfg.batch_size):
            check_columns(batch.schema, table)
            own = batch.select([n for n in batch.schema.names if n in table.names])  # not role, content, ...
            parts.append(canonical_batch(own, "long", rows, str(path)).messages)
        if not parts:
            raise FileProblem("empty-file", "the outcomes table holds no rows")
    except FileProblem as p:
        report.add_one(p.rule, str(path), p.detail, p.row)
        return conv
    side = pl.concat(parts, how="diagonal_relaxed", rechunk=True)
    report.add(
        "duplicate-conversation-id",
        side.filter(pl.len().over("conversation_id") > 1).select(
            "source_file",
            "source_row",
            "conversation_id",
            detail=pl.lit("conversation listed twice in the outcomes table"),
        ),
    )
    side = side.unique("conversation_id", keep="first").select(
        "conversation_id", *[pl.col(c).alias(f"side_{c}") for c in CONVERSATION_LEVEL]
    )
    conv = conv.join(side, on="conversation_id", how="left")
    return conv.with_columns([pl.coalesce(c, f"side_{c}").alias(c) for c in CONVERSATION_LEVEL]).drop(
        [f"side_{c}" for c in CONVERSATION_LEVEL]
    )


def _conversation_checks(conv: pl.DataFrame, cfg: ValidateConfig, report: ValidationReport) -> None:
    """Rules on whole conversations (both shapes, all files together)."""
    cid = pl.col("conversation_id")
    dup = cid.is_not_null() & (pl.len().over("conversation_id") > 1)
    report.add(
        "duplicate-conversation-id", _offenders(conv, dup, pl.format("id also used at another row or file"))
    )
    report.add("null-value", _offenders(conv, cid.is_null(), pl.lit("conversation_id is null")))
    report.add(
        "no-assistant-turn",
        _offenders(
            conv,
            pl.col("n_assistant_turns") == 0,
            pl.format("{} messages, none from the assistant", "n_messages"),
        ),
    )
    out = pl.col("outcome")
    report.add("missing-outcome", _offenders(conv, out.is_null(), _missing_outcome_detail(cfg, report)))
    report.add(
        "outcome-not-finite",
        _offenders(conv, out.is_nan() | out.is_infinite(), pl.format("outcome is {}", out)),
    )
    lo, hi = cfg.outcome_range
    bad = out.is_finite() & ((out < lo) | (out > hi))
    report.add(
        "outcome-out-of-range",
        _offenders(conv, bad, pl.format("outcome {} outside [{}, {}]", out, pl.lit(lo), pl.lit(hi))),
    )
    n_turns = pl.col("n_assistant_turns")
    n_oracle = pl.col("oracle_turn_utility").list.len()
    report.add(
        "oracle-utility-count",
        _offenders(
            conv,
            n_oracle.is_not_null() & (n_oracle != n_turns),
            pl.format("{} utilities for {} assistant turns", n_oracle, n_turns),
        ),
    )
    n_lp = pl.col("n_behavior")
    report.add(
        "behavior-logprobs-count",
        _offenders(
            conv,
            n_lp.is_not_null() & (n_lp != n_turns),
            pl.format("{} behavior_logprobs lists for {} assistant turns", n_lp, n_turns),
        ),
    )


def _missing_outcome_detail(cfg: ValidateConfig, report: ValidationReport) -> pl.Expr:
    """What a missing outcome means in the conversation's own shape (a null value, or absent rows)."""
    long_files = [f for f, shape in report.shapes.items() if shape == "long"]
    side = f" and the side table {cfg.outcomes} has no row for it" if cfg.outcomes is not None else ""
    absent = "no row of the conversation has an outcome" + (
        side or " and no side table of outcomes was given"
    )
    is_long = pl.col("source_file").cast(pl.String).is_in(long_files)
    return pl.when(is_long).then(pl.lit(absent)).otherwise(pl.lit("outcome is null"))


def _assign_groups(conv: pl.DataFrame, msgs: pl.DataFrame, report: ValidationReport) -> pl.DataFrame:
    """Fill missing ``group_id`` from the md5 of the opening messages, and warn."""
    missing = conv.filter(pl.col("group_id").is_null())
    if missing.height == 0:
        return conv
    first_asst = pl.col("turn_index").filter(pl.col("role") == "assistant").min().over("conversation_id")
    opening = (
        msgs.filter(pl.col("turn_index") < first_asst)
        .sort("conversation_id", "turn_index")
        .group_by("conversation_id")
        .agg(opening=pl.col("msg_hash").cast(pl.String).str.join("-"))
    )
    keyed = (
        missing.select("conversation_id")
        .join(opening, on="conversation_id", how="left")
        .with_columns(pl.col("opening").fill_null(""))
    )
    con = duckdb.connect()
    try:
        con.register("keyed", keyed.to_arrow())
        auto = pl.from_arrow(
            con.sql(
                "SELECT conversation_id, 'auto-' || substr(md5(opening), 1, 16) AS auto_group FROM keyed"
            ).to_arrow_table()
        )
    finally:
        con.close()
    conv = (
        conv.join(auto, on="conversation_id", how="left")
        .with_columns(pl.coalesce("group_id", "auto_group").alias("group_id"))
        .drop("auto_group")
    )
    n_groups = auto["auto_group"].n_unique()
    report.warnings.append(
        f"{missing.height} conversations have no group_id: grouped by identical opening messages "
        f"(messages before the first assistant turn) into {n_groups} groups. Give group_id explicitly "
        "if conversations share a start state that their text does not show."
    )
    return conv
