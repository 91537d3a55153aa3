"""The run directory: layout, contract checks on write, atomic metrics and config, resume points."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.schemas import load_schema, run_layout, views_sql
from itpo_batch.data.store import RunDir, StoreError, find_run


def turns_table(n: int = 4, **overrides: object) -> pa.Table:
    cols: dict[str, object] = {
        "conversation_id": [f"c{i // 2}" for i in range(n)],
        "group_id": ["g0"] * n,
        "task": ["medical"] * n,
        "turn": np.arange(n) % 2,  # int64 on purpose: cast to the contract's int32
        "n_tokens": np.full(n, 12),
        "outcome": np.ones(n),
        "implicit_reward": np.linspace(-1, 1, n),
        "implicit_reward_mean": np.linspace(-0.1, 0.1, n),
        "itpo_norm_weight": np.full(n, 0.5),
        "itpo_norm_reward": np.full(n, 0.5),
        "length_share": np.full(n, 0.5),
        "q_value": np.zeros(n),
        "mc_return": np.ones(n),
        "content": [f"turn {i}" for i in range(n)],
    }
    cols.update(overrides)
    return pa.table(cols)


def test_paths_follow_the_layout(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    assert (
        run.partition_path("turns", "itpo_norm", 3)
        == tmp_path / "r/turns/method=itpo_norm/round=3/part-0.parquet"
    )
    assert run.partition_path("conversations", "a", 0).parent == tmp_path / "r/conversations/method=a/round=0"
    assert run.checkpoint_dir("a", 1, "prm") == tmp_path / "r/checkpoints/method=a/round=1/prm"
    assert (run.config_path.name, run.metrics_path.name, run.report_path.name) == (
        "config.yaml",
        "metrics.jsonl",
        "report.md",
    )
    assert not (tmp_path / "r").exists()  # computing paths creates nothing


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.partition_path("turns", "a/b", 0), "method"),
        (lambda r: r.partition_path("turns", "x=1", 0), "method"),
        (lambda r: r.partition_path("turns", ".hidden", 0), "method"),
        (lambda r: r.partition_path("turns", "a", -1), "round"),
        (lambda r: r.partition_path("turns", "a", True), "round"),
        (lambda r: r.partition_path("scores", "a", 0), "unknown run table"),
        (lambda r: r.checkpoint_dir("a", 0, "optimizer"), "checkpoint kind"),
    ],
)
def test_bad_partitions_are_refused(tmp_path: Path, call, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        call(RunDir(tmp_path))


def test_write_partition_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    data = (
        turns_table().append_column("method", pa.array(["m"] * 4)).append_column("round", pa.array([2] * 4))
    )
    path = run.write_partition("turns", "m", 2, data)
    stored = pq.read_table(path, partitioning=None)
    assert stored.column_names == load_schema("turns").names  # schema order, no partition columns
    assert stored.schema.field("turn").type == pa.int32()
    assert stored.column("advantage").null_count == 4  # optional, absent: written as nulls
    assert stored.column("content").to_pylist() == [f"turn {i}" for i in range(4)]
    assert run.read_partition("turns", "m", 2).equals(stored)
    assert run.partitions("turns") == [("m", 2)]
    run.write_partition("turns", "m", 2, turns_table(2))  # a re-run round replaces its partition
    assert run.read_partition("turns", "m", 2).num_rows == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]  # no temp files left


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (turns_table(extra=[1, 2, 3, 4]), "not in schemas/turns.schema.json: extra"),
        (turns_table().drop_columns(["outcome"]), "missing required columns: outcome"),
        (turns_table(turn=["a", "b", "c", "d"]), "turns.turn: type string"),
        (turns_table(outcome=[1.0, None, 1.0, 1.0]), "turns.outcome: 1 null values"),
        (turns_table(implicit_reward=[0.0, float("nan"), 1.0, float("inf")]), "2 NaN or infinite"),
        (turns_table(turn=np.array([0, 2**40, 0, 1])), "turns.turn: cannot cast"),
        (turns_table().append_column("round", pa.array([1, 1, 2, 2])), "column round holds"),
    ],
)
def test_write_partition_enforces_the_contract(tmp_path: Path, data: pa.Table, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        RunDir(tmp_path).write_partition("turns", "m", 1, data)
    assert not list(tmp_path.rglob("*.parquet"))


def test_conversations_extend_the_canonical_columns_and_check_values(tmp_path: Path) -> None:
    schema = load_schema("scored_conversations")
    assert schema.names[: len(load_schema("conversations").names)] == load_schema("conversations").names
    assert schema.names[-3:] == ["implicit_reward_total", "n_tokens", "split"]
    conv = pa.table(
        {
            "conversation_id": ["c0", "c1"],
            "group_id": ["g", "g"],
            "outcome": [1.0, 0.0],
            "n_messages": pa.array([4, 4], pa.int32()),
            "n_assistant_turns": pa.array([2, 2], pa.int32()),
            "source_file": ["logs.parquet"] * 2,
            "source_row": [0, 1],
            "implicit_reward_total": [0.3, -0.2],
            "n_tokens": [20, 30],
            "split": ["train", "holdout"],
        }
    )
    run = RunDir(tmp_path)
    assert pq.read_schema(run.write_partition("conversations", "a", 0, conv)).names == schema.names
    bad = conv.set_column(conv.column_names.index("split"), "split", pa.array(["train", "test"]))
    with pytest.raises(StoreError, match=r"values \['test'\] not in \['train', 'holdout'\]"):
        run.write_partition("conversations", "a", 1, bad)


def test_messages_partition_takes_canonical_types(tmp_path: Path) -> None:
    msgs = pa.table(
        {
            "conversation_id": ["c0", "c0"],
            "turn_index": pa.array([0, 1], pa.int32()),
            "role": ["user", "assistant"],
            "content": ["hi", "hello"],
            "assistant_turn": pa.array([None, 0], pa.int32()),
            "behavior_logprobs": pa.array([None, [-0.5, -0.1]], pa.list_(pa.float64())),
        }
    )
    path = RunDir(tmp_path).write_partition("messages", "a", 0, msgs)
    assert pq.read_table(path).column("behavior_logprobs").to_pylist() == [None, [-0.5, -0.1]]


def test_metrics_lines_commit_rounds(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    assert run.completed_rounds("a") == [] and run.read_metrics() == []
    run.append_metrics({"method": "a", "round": 0, "prm/loss": np.float32(0.5), "corr": float("nan")})
    run.append_metrics({"method": "b", "round": 0, "prm/loss": 0.4})
    run.append_metrics({"method": "a", "round": 1, "nested": {"x": [1, float("inf")]}})
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("{") and line.endswith("}") for line in lines)
    assert run.read_metrics()[0] == {"method": "a", "round": 0, "prm/loss": 0.5, "corr": None}
    assert run.read_metrics()[2]["nested"] == {"x": [1, None]}
    assert run.completed_rounds("a") == [0, 1] and run.completed_rounds("b") == [0]
    with pytest.raises(StoreError, match="already recorded"):
        run.append_metrics({"method": "a", "round": 1})
    with pytest.raises(StoreError, match="method"):
        run.append_metrics({"round": 2})
    with pytest.raises(StoreError, match="round"):
        run.append_metrics({"method": "a", "round": "2"})
    assert len(run.metrics_path.read_text().splitlines()) == 3


def test_a_crash_while_appending_keeps_the_old_file_whole(tmp_path: Path, monkeypatch) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"method": "a", "round": 0})
    before = run.metrics_path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(ItpoError, match=r"metrics\.jsonl: disk full"):  # an OutputError: exit 2, no traceback
        run.append_metrics({"method": "a", "round": 1, "text": "x" * 100_000})
    assert run.metrics_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_concurrent_appends_lose_no_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    threads = [
        threading.Thread(target=run.append_metrics, args=({"method": f"m{i % 4}", "round": i // 4},))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(run.read_metrics()) == 16
    assert [run.completed_rounds(f"m{i}") for i in range(4)] == [[0, 1, 2, 3]] * 4


def test_a_broken_metrics_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"method": "a", "round": 0}\n{"method": "a", "ro\n')
    with pytest.raises(StoreError, match=r"metrics\.jsonl:2: not JSON"):
        RunDir(tmp_path).completed_rounds("a")


class Algo(Enum):
    itpo = "itpo"


@dataclass
class Inner:
    beta: float = 0.05


@dataclass
class Config:
    out: Path = Path("runs/x")
    algo: Algo = Algo.itpo
    methods: tuple[str, ...] = ("itpo", "rloo")
    inner: Inner = field(default_factory=Inner)


def test_write_config_as_yaml(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    path = run.write_config(Config())
    assert path == tmp_path / "config.yaml"
    assert "!!" not in path.read_text()  # plain YAML, no Python tags
    assert run.read_config() == {
        "out": "runs/x",
        "algo": "itpo",
        "methods": ["itpo", "rloo"],
        "inner": {"beta": 0.05},
    }
    run.write_config({"seed": 1})
    assert run.read_config() == {"seed": 1}
    with pytest.raises(StoreError, match="dataclass or a mapping"):
        run.write_config(["not", "a", "config"])


def test_find_run(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        find_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a run directory"):
        find_run(tmp_path / "empty")
    with pytest.raises(StoreError, match="no --run given"):
        find_run(None, root=tmp_path / "runs")
    old, new = RunDir(tmp_path / "runs/old"), RunDir(tmp_path / "runs/new")
    old.write_config({})
    new.write_config({})
    os.utime(old.path, (1, 1))
    assert find_run(None, root=tmp_path / "runs") == new
    assert find_run(old.path) == old


def test_layout_views_and_schemas_agree() -> None:
    layout = run_layout()
    sql = views_sql()
    for table in layout["tables"].values():
        # the partition file itself: a **/*.parquet glob would also read a killed writer's temporary file
        assert f"{{run}}/{table['directory']}/method=*/round=*/{layout['partition_file']}" in sql
        load_schema(table["schema"])
    assert f"{{run}}/{layout['files']['metrics']}" in sql
    assert [c["name"] for c in layout["partition_columns"]] == ["method", "round"]
    for view, schema in layout["views"].items():
        if view != "description":
            assert f"CREATE VIEW {view} AS" in sql
            load_schema(schema)
