"""Small, readable builders of log files for the tests (good ones, and ways to break them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def nested_rows(n: int = 6, group_size: int = 2) -> list[dict[str, Any]]:
    """``n`` conversations with 1-3 assistant turns, groups of ``group_size``, all optional columns."""
    rows = []
    for i in range(n):
        k = 1 + i % 3
        msgs = [
            {"role": "system", "content": "You are a careful doctor."},
            {"role": "user", "content": f"I feel unwell ({i // group_size})."},
        ]
        for t in range(k):
            msgs.append({"role": "assistant", "content": f"Do you have a fever? (turn {t})"})
            if t < k - 1:
                msgs.append({"role": "user", "content": "Yes, since yesterday."})
        rows.append(
            {
                "conversation_id": f"c{i}",
                "group_id": f"g{i // group_size}",
                "task": "medical",
                "messages": msgs,
                "outcome": float(i % 2),
                "behavior_logprobs": [[-0.5 - t, -0.25] for t in range(k)],
                "metadata": json.dumps({"seed": i}),
                "oracle_turn_utility": [0.1 * t for t in range(k)],
            }
        )
    return rows


def long_rows(nested: list[dict[str, Any]], outcome_on_rows: bool = True) -> list[dict[str, Any]]:
    """The same conversations in the long shape (one row per message)."""
    out = []
    for r in nested:
        a = 0
        for j, m in enumerate(r["messages"]):
            row = {
                "conversation_id": r["conversation_id"],
                "turn_index": j,
                "role": m["role"],
                "content": m["content"],
            }
            row["behavior_logprobs"] = r["behavior_logprobs"][a] if m["role"] == "assistant" else None
            a += m["role"] == "assistant"
            for c in ("group_id", "task", "metadata", "oracle_turn_utility") + (
                ("outcome",) if outcome_on_rows else ()
            ):
                row[c] = r[c]
            out.append(row)
    return out


def side_table(nested: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"conversation_id": r["conversation_id"], "outcome": r["outcome"]} for r in nested]


def write(rows: list[dict[str, Any]], path: Path, schema: pa.Schema | None = None) -> Path:
    """Write rows as Parquet or JSON Lines depending on the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".parquet", ".pq"):
        pq.write_table(
            pa.Table.from_pylist(rows, schema=schema), path, row_group_size=max(1, len(rows) // 3 or 1)
        )
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
