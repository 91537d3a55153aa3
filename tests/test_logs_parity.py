"""The same conversations give the same canonical tables whatever the shape, format or batch size."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from itpo_batch.data.schemas import load_schema
from itpo_batch.data.validate import ValidateConfig, read_logs
from tests.logs_factory import long_rows, nested_rows, side_table, write

SOURCE = ["source_file", "source_row"]


def _canon(paths: list[Path], **cfg) -> tuple[pl.DataFrame, pl.DataFrame]:
    logs = read_logs(paths, ValidateConfig(**cfg))
    conv = logs.conversations.drop(SOURCE).sort("conversation_id")
    msgs = logs.messages.sort("conversation_id", "turn_index")
    return conv, msgs


def test_nested_long_jsonl_parity(tmp_path: Path) -> None:
    rows = nested_rows(9, group_size=3)
    variants = {
        "nested.parquet": ([write(rows, tmp_path / "nested.parquet")], {}),
        "nested.jsonl": ([write(rows, tmp_path / "nested.jsonl")], {}),
        "long.parquet": ([write(long_rows(rows), tmp_path / "long.parquet")], {}),
        "long.jsonl": ([write(long_rows(rows), tmp_path / "long.jsonl")], {}),
        "long+side": (
            [write(long_rows(rows, outcome_on_rows=False), tmp_path / "long_no_outcome.parquet")],
            {"outcomes": write(side_table(rows), tmp_path / "side.parquet")},
        ),
    }
    ref_conv, ref_msgs = _canon(*variants.pop("nested.parquet")[:1], **{})
    assert ref_conv.columns == [c for c in load_schema("conversations").names if c not in SOURCE]
    assert ref_msgs.columns == load_schema("messages").names
    assert ref_msgs.height == sum(len(r["messages"]) for r in rows)
    for name, (paths, cfg) in variants.items():
        conv, msgs = _canon(paths, **cfg)
        assert conv.equals(ref_conv), name
        assert msgs.equals(ref_msgs), name


def test_several_files_concatenate_and_keep_their_source(tmp_path: Path) -> None:
    rows = nested_rows(6)
    a = write(rows[:4], tmp_path / "a.parquet")
    b = write(long_rows(rows[4:]), tmp_path / "b.jsonl")
    logs = read_logs([a, b])
    assert logs.conversations.height == 6
    assert logs.report.shapes == {str(a): "nested", str(b): "long"}
    src = dict(zip(logs.conversations["conversation_id"], logs.conversations["source_file"], strict=True))
    assert src["c0"] == str(a) and src["c5"] == str(b)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 12), batch=st.integers(1, 7), group=st.integers(1, 4))
def test_batch_size_does_not_change_the_result(tmp_path: Path, n: int, batch: int, group: int) -> None:
    rows = nested_rows(n, group_size=group)
    nested = write(rows, tmp_path / f"n{n}_{group}.parquet")
    long = write(long_rows(rows), tmp_path / f"l{n}_{group}.jsonl")
    for path in (nested, long):
        full = _canon([path])
        small = _canon([path], batch_size=batch)
        assert full[0].equals(small[0]) and full[1].equals(small[1])


def test_chats_match_input_messages(tmp_path: Path) -> None:
    rows = nested_rows(5)
    logs = read_logs([write(long_rows(rows), tmp_path / "long.parquet")])
    by_id = {r["conversation_id"]: r["messages"] for r in rows}
    for cid, chat in zip(logs.conversations["conversation_id"], logs.chats(), strict=True):
        assert chat == by_id[cid]


@pytest.mark.parametrize("shape", ["nested", "long"])
def test_assistant_turn_numbering(tmp_path: Path, shape: str) -> None:
    rows = nested_rows(3)
    data = rows if shape == "nested" else long_rows(rows)
    msgs = read_logs([write(data, tmp_path / f"{shape}.parquet")]).messages
    c2 = msgs.filter(pl.col("conversation_id") == "c2")
    assert c2["assistant_turn"].to_list() == [None, None, 0, None, 1, None, 2]
    assert c2["behavior_logprobs"].to_list()[2::2] == [[-0.5, -0.25], [-1.5, -0.25], [-2.5, -0.25]]
