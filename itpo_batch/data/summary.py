"""Summary statistics of validated logs (what ``itpo-batch validate`` prints).

Pure polars aggregations over the canonical frames; token counts are added by the CLI when a model is
given (they need rendering, see :mod:`itpo_batch.model.render`).
"""

from __future__ import annotations

from typing import Any

import polars as pl


def describe(s: pl.Series) -> dict[str, float | int | None]:
    s = s.drop_nulls()
    if s.len() == 0:
        return {"count": 0}
    return {
        "count": s.len(),
        "mean": round(float(s.mean()), 4),  # type: ignore[arg-type]
        "std": round(float(s.std() or 0.0), 4),
        "min": float(s.min()),  # type: ignore[arg-type]
        "p50": float(s.median()),  # type: ignore[arg-type]
        "max": float(s.max()),  # type: ignore[arg-type]
    }


def _counts(s: pl.Series, limit: int = 12) -> dict[str, int]:
    vc = s.value_counts(sort=True).head(limit)
    return {str(k): int(v) for k, v in zip(vc[:, 0].to_list(), vc[:, 1].to_list(), strict=True)}


def summarize(conv: pl.DataFrame, msgs: pl.DataFrame) -> dict[str, Any]:
    """Counts, turns per conversation, outcome distribution, group sizes, tasks and roles."""
    conv = conv.filter(pl.col("conversation_id").is_not_null())
    out: dict[str, Any] = {
        "conversations": conv.height,
        "messages": msgs.height,
        "assistant_turns": int(conv["n_assistant_turns"].sum()),
        "assistant_turns_per_conversation": describe(conv["n_assistant_turns"]),
        "assistant_turns_histogram": dict(
            sorted(_counts(conv["n_assistant_turns"], 64).items(), key=lambda kv: int(kv[0]))
        ),
        "messages_per_conversation": describe(conv["n_messages"]),
        "outcome": describe(conv["outcome"]),
        "roles": _counts(msgs["role"].drop_nulls()),
        "content_chars": describe(msgs["n_chars"]) if "n_chars" in msgs.columns else {},
    }
    outcome = conv["outcome"].drop_nulls()
    if 0 < outcome.n_unique() <= 10:
        out["outcome_values"] = _counts(outcome)
    if "group_id" in conv.columns and conv["group_id"].null_count() < conv.height:
        sizes = conv.group_by("group_id").len()["len"]
        out["groups"] = {**describe(sizes), "groups": sizes.len(), "singletons": int((sizes == 1).sum())}
        out["groups"].pop("count", None)
    if conv["task"].null_count() < conv.height:
        out["tasks"] = _counts(conv["task"].fill_null("(none)"))
    out["optional_columns"] = {
        "behavior_logprobs": bool(msgs["has_behavior"].any()),
        "oracle_turn_utility": conv["oracle_turn_utility"].null_count() < conv.height,
        "metadata": conv["metadata"].null_count() < conv.height,
    }
    return out
