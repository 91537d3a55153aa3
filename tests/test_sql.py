"""``itpo-batch sql``: views over every partition, every output format, and read-only enforcement.

The read-only layers (parser, read-only transaction, DuckDB's own lock-down) are each tested alone,
then every attack is run through the CLI: exit code 2, a clear message, and no file appears.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.data.schemas import load_schema
from itpo_batch.data.sql import QueryError, ReadOnlyError, RunDatabase, check_read_only
from itpo_batch.data.store import RunDir

runner = CliRunner()
METHODS, ROUNDS, N = ("itpo_norm", "iterative_ppo"), (0, 1), 6


def _turns(method: str, rnd: int) -> pa.Table:
    rng = np.random.default_rng(len(method) * 10 + rnd)
    return pa.table(
        {
            "conversation_id": [f"{method}-{rnd}-c{i // 3}" for i in range(N)],
            "group_id": ["g0"] * N,
            "task": ["medical", "math"] * (N // 2),
            "turn": np.arange(N) % 3,
            "n_tokens": np.full(N, 10 + rnd),
            "outcome": np.ones(N),
            "implicit_reward": rng.normal(size=N),
            "implicit_reward_mean": rng.normal(size=N),
            "itpo_norm_weight": np.full(N, 1 / 3),
            "itpo_norm_reward": np.full(N, 1 / 3),
            "length_share": np.full(N, 1 / 3),
            "q_value": np.full(N, float(rnd)),
            "mc_return": np.ones(N),
            "oracle_utility": rng.normal(size=N),
            "content": [f'turn {i} of {method}, round {rnd}: a, "quoted"\nsecond line' for i in range(N)],
        }
    )


def _messages(method: str, rnd: int) -> pa.Table:
    return pa.table(
        {
            "conversation_id": ["c0", "c0"],
            "turn_index": pa.array([0, 1], pa.int32()),
            "role": ["user", "assistant"],
            "content": ["hi", "hello"],
            "behavior_logprobs": pa.array([None, [-0.5, -0.25]], pa.list_(pa.float64())),
        }
    )


def make_run(path: Path, metrics: bool = True) -> RunDir:
    run = RunDir(path)
    run.write_config({"seed": 0})
    for method in METHODS:
        for rnd in ROUNDS:
            run.write_partition("turns", method, rnd, _turns(method, rnd))
            run.write_partition("messages", method, rnd, _messages(method, rnd))
            if metrics:
                run.append_metrics({"method": method, "round": rnd, "eval/outcome": 0.5 + rnd})
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("sql") / "run")


@pytest.fixture
def cwd(run: RunDir, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory, set beside the run, so a relative path would land next to it."""
    monkeypatch.chdir(run.path.parent)
    return run.path.parent


@pytest.fixture(scope="module")
def parser() -> duckdb.DuckDBPyConnection:
    return duckdb.connect()


def files_under(path: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``path`` with its size and modification time: a new or rewritten file shows."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def sql(*args: str, input: str | None = None):
    return runner.invoke(app, ["sql", *args], input=input)


# ---- views ------------------------------------------------------------------------------------------
def test_views_read_every_partition_with_hive_columns(run: RunDir) -> None:
    with RunDatabase(run) as db:
        assert db.views == {"turns": 4, "conversations": 0, "messages": 4, "rounds": 1}
        counts = db.query("SELECT method, round, count(*) AS n FROM turns GROUP BY ALL ORDER BY ALL")
        assert counts.to_pylist() == [
            {"method": m, "round": r, "n": N} for m in sorted(METHODS) for r in ROUNDS
        ]
        described = db.query("DESCRIBE turns").to_pylist()
        names = [d["column_name"] for d in described]
        assert names == ["method", "round", *load_schema("turns").names]
        assert [d["column_type"] for d in described[:2]] == ["VARCHAR", "INTEGER"]
        q = db.query("SELECT avg(q_value) AS q FROM turns WHERE round = 1 AND method = 'itpo_norm'")
        assert q.column("q").to_pylist() == [1.0]
        rounds = db.query('SELECT method, round, "eval/outcome" FROM rounds ORDER BY ALL').to_pylist()
        assert rounds[0] == {"method": "iterative_ppo", "round": 0, "eval/outcome": 0.5}
        joined = db.query(
            'SELECT count(*) AS n FROM turns t JOIN rounds r USING (method, round) WHERE r."eval/outcome" > 1'
        )
        assert joined.column("n").to_pylist() == [2 * N]
        assert db.query("SELECT count(*) AS n FROM messages").column("n").to_pylist() == [8]


def test_views_without_files_are_empty_with_their_columns(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.write_config({})
    with RunDatabase(run) as db:
        assert db.views == {"turns": 0, "conversations": 0, "messages": 0, "rounds": 0}
        for view, schema in [("turns", "turns"), ("conversations", "scored_conversations")]:
            table = db.query(f"SELECT * FROM {view}")
            assert table.num_rows == 0
            assert table.column_names == ["method", "round", *load_schema(schema).names]
        assert db.query("SELECT * FROM rounds").column_names == ["method", "round"]
        assert db.query("SELECT avg(implicit_reward) AS a FROM turns").column("a").to_pylist() == [None]


def test_a_partition_with_fewer_columns_is_read_by_name(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", metrics=False)
    old = _turns("legacy", 0).drop_columns(["oracle_utility", "task"])
    path = run.partition_path("turns", "legacy", 0)
    path.parent.mkdir(parents=True)
    pq.write_table(old, path)
    (run.metrics_path).write_text("")  # an empty metrics file counts as none
    with RunDatabase(run) as db:
        got = db.query("SELECT count(*) AS n, count(oracle_utility) AS o FROM turns WHERE method = 'legacy'")
        assert got.to_pylist() == [{"n": N, "o": 0}]
        assert db.views["rounds"] == 0


def test_a_broken_partition_file_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", metrics=False)
    run.partition_path("turns", "itpo_norm", 1).write_bytes(b"not parquet")
    res = sql("SELECT 1", "--run", str(run.path))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "cannot create view turns" in res.stderr and "method=itpo_norm/round=1" in res.stderr


def test_run_path_with_a_quote(tmp_path: Path) -> None:
    run = make_run(tmp_path / "it's run", metrics=False)
    with RunDatabase(run) as db:
        assert db.query("SELECT count(*) AS n FROM turns").column("n").to_pylist() == [4 * N]


# ---- the read-only layers, each alone -------------------------------------------------------------
@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1",
        "FROM turns",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "DESCRIBE turns",
        "SHOW TABLES",
        "SUMMARIZE turns",
        "VALUES (1)",
        "EXPLAIN SELECT 1",
        "PIVOT turns ON method IN ('a', 'b') USING avg(q_value)",
        "EXPLAIN ANALYZE SELECT count(*) FROM turns",
        "-- comment\nSELECT 1;",
    ],
)
def test_parser_layer_accepts_reads(parser: duckdb.DuckDBPyConnection, query: str) -> None:
    assert check_read_only(parser, query)


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 1) TO 'x.csv'",
        "EXPORT DATABASE 'x'",
        "ATTACH 'x.db'",
        "CREATE TABLE t (a INT)",
        "INSERT INTO t VALUES (1)",
        "SET threads = 1",
        "PRAGMA show_tables",
        "CALL pragma_version()",
        "INSTALL httpfs",
        "CHECKPOINT",
        "BEGIN",
        "SELECT 1; SELECT 2",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'",
        "EXPLAIN (FORMAT json) COPY (SELECT 1) TO 'x.csv'",
        "EXPLAIN /* c */ ANALYZE COPY (SELECT 1) TO 'x.csv'",
        "UPDATE EXTENSIONS",
    ],
)
def test_parser_layer_refuses_everything_else(parser: duckdb.DuckDBPyConnection, query: str) -> None:
    with pytest.raises(ReadOnlyError, match="read-only"):
        check_read_only(parser, query)


def test_transaction_layer_refuses_a_write_hidden_in_a_select(run: RunDir) -> None:
    with RunDatabase(run) as db:
        db.con.execute("CREATE TABLE t (a INT)")  # only possible through the raw connection
        with pytest.raises(ReadOnlyError, match="read-only"):
            db.query("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x")
        assert db.con.sql("SELECT count(*) FROM t").fetchall() == [(0,)]


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO '{run}/x.csv'",
        "COPY (SELECT 1) TO 'x.csv'",
        "COPY (SELECT 1) TO '{run}/turns/method=itpo_norm/round=0/x.parquet'",
        "ATTACH '{run}/x.db'",
        "EXPORT DATABASE '{run}/export'",
        "COPY (SELECT 1) TO '{run}/turns/method=itpo_norm/round=0/part-0.parquet'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('{run}/config.yaml')",
        "SELECT * FROM glob('{run}/*')",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "SET allowed_paths = ['/']",
    ],
)
def test_engine_layer_refuses_files_and_settings(run: RunDir, cwd: Path, statement: str) -> None:
    before = files_under(cwd)
    with RunDatabase(run) as db, pytest.raises(duckdb.Error):
        db.con.execute(statement.replace("{run}", str(run.path)))  # bypasses layers 1 and 2
    assert files_under(cwd) == before


def test_engine_layer_takes_back_the_working_directorys_tmp(run: RunDir, cwd: Path) -> None:
    """DuckDB allows ``./.tmp/`` (its default temp_directory) even with external access off."""
    (cwd / ".tmp").mkdir()
    try:
        with RunDatabase(run) as db, pytest.raises(duckdb.PermissionException):
            db.con.execute("COPY (SELECT 1) TO '.tmp/x.csv'")
        assert not list((cwd / ".tmp").iterdir())
    finally:
        (cwd / ".tmp").rmdir()


# ---- the CLI --------------------------------------------------------------------------------------
def test_table_output(run: RunDir) -> None:
    res = sql(
        "SELECT method, round, count(*) AS n FROM turns GROUP BY ALL ORDER BY ALL", "--run", str(run.path)
    )
    assert res.exit_code == 0, res.output
    assert "itpo_norm" in res.stdout and "iterative_ppo" in res.stdout and "4 rows" in res.stdout
    res = sql("SELECT content FROM turns", "--run", str(run.path), "--max-rows", "3", "--max-width", "12")
    assert "3 of 24 rows" in res.stdout and "turn 0 of i…" in res.stdout and "second line" not in res.stdout


def test_csv_json_jsonl_to_stdout(run: RunDir) -> None:
    q = "SELECT method, round, turn, content FROM turns ORDER BY method, round, conversation_id, turn"
    res = sql(q, "--run", str(run.path), "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 24 and rows[0]["content"] == _turns("iterative_ppo", 0)["content"][0].as_py()
    res = sql(q, "--run", str(run.path), "--format", "json")
    data = json.loads(res.stdout)
    assert len(data) == 24 and data[0]["round"] == 0 and data[-1]["method"] == "itpo_norm"
    res = sql(q, "--run", str(run.path), "--format", "jsonl")
    assert [json.loads(line) for line in res.stdout.splitlines()] == data


def _markdown_reference(header: list[str], rows: list[dict]) -> str:
    """The markdown table of ``rows``, one cell at a time (the slow reference for ``-f markdown``)."""

    def cell(v: object) -> str:
        text = "" if v is None else json.dumps(v) if isinstance(v, list | dict) else str(v)
        return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")

    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if isinstance(rows[0][h], int) else "---" for h in header) + "|")
    lines += ["| " + " | ".join(cell(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def test_markdown_matches_a_cell_by_cell_reference(run: RunDir) -> None:
    q = "SELECT method, round, turn, content FROM turns ORDER BY method, round, conversation_id, turn"
    data = json.loads(sql(q, "--run", str(run.path), "-f", "json").stdout)
    assert any("\n" in r["content"] for r in data)  # the fixture has multi-line turns: they must stay one row
    res = sql(q, "--run", str(run.path), "-f", "markdown")
    assert res.exit_code == 0, res.output
    assert res.stdout == _markdown_reference(["method", "round", "turn", "content"], data)
    assert len(res.stdout.splitlines()) == 2 + 24


def test_markdown_escapes_nulls_nested_and_empty(run: RunDir, tmp_path: Path) -> None:
    q = "SELECT 1 AS a, 'x|y' AS \"b|c\", NULL AS c, [1, 2] AS l, 'p' || chr(10) || 'q' AS t, 2.5 AS f"
    res = sql(q, "--run", str(run.path), "-f", "markdown")
    assert res.exit_code == 0, res.output
    assert (
        res.stdout
        == "| a | b\\|c | c | l | t | f |\n|---:|---|---|---|---|---:|\n| 1 | x\\|y |  | [1, 2] | p<br>q | 2.5 |\n"
    )
    res = sql("SELECT 1 AS n WHERE false", "--run", str(run.path), "-f", "markdown")
    assert res.stdout == "| n |\n|---:|\n"
    res = sql("SELECT 1 AS n", "--run", str(run.path), "-o", str(tmp_path / "out.md"))
    assert res.exit_code == 0 and (tmp_path / "out.md").read_text() == "| n |\n|---:|\n| 1 |\n"


def test_nested_columns_and_empty_results(run: RunDir) -> None:
    q = "SELECT behavior_logprobs FROM messages WHERE role = 'assistant' LIMIT 1"
    res = sql(q, "--run", str(run.path), "-f", "csv")
    assert res.stdout.splitlines() == ["behavior_logprobs", '"[-0.5, -0.25]"']
    res = sql("SELECT turn, content FROM turns WHERE false", "--run", str(run.path), "-f", "csv")
    assert res.exit_code == 0 and res.stdout == "turn,content\n"
    assert json.loads(sql("SELECT 1 WHERE false", "--run", str(run.path), "-f", "json").stdout) == []


def test_output_files_by_suffix_and_format(run: RunDir, tmp_path: Path) -> None:
    q = "SELECT * FROM turns ORDER BY ALL"
    for name in ("out.parquet", "out.csv", "out.json", "out.jsonl"):
        res = sql(q, "--run", str(run.path), "-o", str(tmp_path / name))
        assert res.exit_code == 0, res.output
        assert "wrote 24 rows" in res.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 24 and table.column_names[:3] == ["method", "round", "conversation_id"]
    assert len(json.loads((tmp_path / "out.json").read_text())) == 24
    res = sql(q, "--run", str(run.path), "-f", "parquet", "-o", str(tmp_path / "named.bin"))
    assert res.exit_code == 0 and pq.read_table(tmp_path / "named.bin").equals(table)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "parquet"], "needs -o FILE"),
        (["-o", "out.txt"], "cannot tell the format"),
        (["-f", "table", "-o", "out.csv"], "for the terminal"),
    ],
)
def test_format_mistakes(run: RunDir, args: list[str], message: str) -> None:
    res = sql("SELECT 1", "--run", str(run.path), *args)
    assert res.exit_code == 2 and message in res.stderr


def test_query_from_stdin(run: RunDir) -> None:
    res = sql("-", "--run", str(run.path), "-f", "json", input="SELECT count(*) AS n FROM turns\n")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"n": 24}]


def test_default_run_is_the_latest_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "runs" / "demo", metrics=False)
    monkeypatch.chdir(tmp_path)
    res = sql("SELECT count(*) AS n FROM turns", "-f", "csv")
    assert res.exit_code == 0, res.output
    assert res.stdout == "n\n24\n" and "runs/demo" in res.stderr


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELEC 1", "Parser Error"),
        ("SELECT no_such_column FROM turns", 'Referenced column "no_such_column" not found'),
        ("SELECT * FROM no_such_view", "no_such_view"),
        ("SELECT CAST(content AS INTEGER) FROM turns", "Conversion Error"),  # fails while streaming
        ("", "empty query"),
    ],
)
def test_bad_query_prints_duckdbs_message(run: RunDir, query: str, message: str) -> None:
    res = sql(query, "--run", str(run.path), "-f", "csv")
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output


def test_missing_or_wrong_run_dir(tmp_path: Path) -> None:
    res = sql("SELECT 1", "--run", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = sql("SELECT 1", "--run", str(tmp_path))
    assert res.exit_code == 2 and "not a run directory" in res.stderr


ATTACKS = [
    ("COPY (SELECT 1) TO 'x.csv'", "COPY statements are refused"),
    ("COPY (SELECT 1) TO '{run}/x.csv'", "COPY statements are refused"),
    ("COPY turns TO '{run}/turns/method=itpo_norm/round=0/part-0.parquet'", "COPY statements are refused"),
    (
        "COPY (SELECT 1) TO '{run}/turns/method=itpo_norm/round=0/part-0.parquet' (USE_TMP_FILE false)",
        "COPY statements are refused",
    ),
    ("PIVOT turns ON method USING avg(q_value)", "PIVOT without IN"),
    ("EXPORT DATABASE 'exported'", "EXPORT statements are refused"),
    ("ATTACH 'x.db'", "ATTACH statements are refused"),
    ("ATTACH '{run}/x.db' AS x; CREATE TABLE x.t AS SELECT 1", "one statement per query"),
    ("CREATE TABLE t AS SELECT * FROM turns", "CREATE statements are refused"),
    ("CREATE OR REPLACE VIEW turns AS SELECT 1", "CREATE statements are refused"),
    ("DROP VIEW turns", "DROP statements are refused"),
    ("INSERT INTO turns VALUES (1)", "INSERT statements are refused"),
    ("UPDATE turns SET q_value = 0", "UPDATE statements are refused"),
    ("DELETE FROM turns", "DELETE statements are refused"),
    ("INSTALL httpfs", "LOAD statements are refused"),
    ("LOAD httpfs", "LOAD statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("RESET lock_configuration", "SET statements are refused"),
    ("PRAGMA enable_profiling", "PRAGMA statements are refused"),
    ("CALL pragma_version()", "CALL statements are refused"),
    ("SELECT 1; COPY (SELECT 1) TO 'x.csv'", "one statement per query"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "EXPLAIN is allowed only of a SELECT"),
    ("SELECT * FROM read_csv('/etc/passwd')", 'Cannot access file "/etc/passwd"'),
    ("SELECT * FROM read_text('{run}/config.yaml')", "config.yaml"),
    ("SELECT * FROM read_text('{run}/turns/../config.yaml')", "disabled by configuration"),
    ("SELECT * FROM glob('/etc/*')", "disabled by configuration"),
    ("SELECT * FROM query('COPY (SELECT 1) TO ''x.csv''')", "single SELECT"),
    ("WITH x AS (DELETE FROM turns RETURNING *) SELECT * FROM x", "Can only delete from base table"),
]


@pytest.mark.parametrize(("attack", "message"), ATTACKS)
def test_attacks_are_refused_and_leave_no_file(run: RunDir, cwd: Path, attack: str, message: str) -> None:
    before = files_under(cwd)
    res = sql(attack.replace("{run}", str(run.path)), "--run", str(run.path), "-f", "csv")
    assert files_under(cwd) == before
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output


def test_what_a_select_may_create_stays_in_memory(run: RunDir, cwd: Path) -> None:
    """CSV ``store_rejects`` makes temporary tables: in memory, gone with the one-query connection."""
    before = files_under(cwd)
    q = f"SELECT count(*) AS n FROM read_csv('{run.path}/metrics.jsonl', store_rejects = true)"
    assert sql(q, "--run", str(run.path), "-f", "csv").exit_code == 0
    assert files_under(cwd) == before
    with RunDatabase(run) as db:
        assert db.query("SELECT count(*) AS n FROM duckdb_tables()").column("n").to_pylist() == [0]


def test_errors_are_typed_for_the_library() -> None:
    assert issubclass(ReadOnlyError, QueryError)
    with pytest.raises(QueryError, match="Parser Error"):
        check_read_only(duckdb.connect(), "SELEC 1")


def test_help_has_an_example() -> None:
    res = runner.invoke(app, ["sql", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
