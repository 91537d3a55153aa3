"""Typical queries over 1M scored turns through ``itpo_batch.data.sql`` (DuckDB views, read-only lock-down).

Generates N synthetic scored turns (every column of schemas/turns.schema.json, a ~200-character
``content`` of random words, conversations of 2-8 turns, 3 tasks) over METHODS x ROUNDS hive
partitions written with ``RunDir.write_partition``, then times, for each query, the first run on a
fresh connection and the best of 3:

  * ``means``:   per method/round mean of implicit_reward and q_value;
  * ``top20``:   the 20 turns with the highest implicit_reward, with their content;
  * ``corr``:    correlation of implicit_reward with oracle_utility per task and method.

Baselines measured in the same run, on the same files:
  * ``raw_duckdb``: a plain DuckDB connection on ``read_parquet(glob, hive_partitioning)`` with the
    same SQL (no views, no lock-down, no read-only transaction): the overhead of ``itpo_batch.data.sql``;
  * ``naive_polars``: read every partition with all its columns into memory (what a script without
    projection pushdown does), then compute the same result with polars.

Prints one JSON object. Example: python bench/duckdb_turns.py --rows 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from itpo_batch.data.sql import RunDatabase
from itpo_batch.data.store import RunDir

QUERIES = {
    "means": "SELECT method, round, avg(implicit_reward) AS implicit_reward, avg(q_value) AS q_value, "
    "count(*) AS n FROM turns GROUP BY method, round ORDER BY method, round",
    "top20": "SELECT method, round, conversation_id, turn, implicit_reward, content FROM turns "
    "ORDER BY implicit_reward DESC LIMIT 20",
    "corr": "SELECT task, method, corr(implicit_reward, oracle_utility) AS corr, count(*) AS n FROM turns "
    "GROUP BY task, method ORDER BY task, method",
}


def _vocab(rng: np.random.Generator, size: int = 4096) -> pl.Series:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return pl.Series([str("".join(rng.choice(letters, k))) for k in rng.integers(2, 10, size)])


def synthetic_turns(n: int, rng: np.random.Generator, vocab: pl.Series, prefix: str) -> pa.Table:
    """``n`` scored turns in conversations of 2-8 turns, vectorised (no loop over rows)."""
    lengths = rng.integers(2, 9, n // 2 + 1)
    conv = np.repeat(np.arange(len(lengths)), lengths)[:n]
    starts = np.r_[0, np.flatnonzero(np.diff(conv)) + 1]
    turn = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    n_conv = conv[-1] + 1
    outcome = rng.integers(0, 2, n_conv).astype(np.float64)[conv]
    n_tokens = rng.integers(5, 120, n)
    implicit = rng.normal(0, 0.5, n)
    conv_tokens = np.bincount(conv, weights=n_tokens)[conv]
    weight = np.exp(implicit)
    weight = weight / np.bincount(conv, weights=weight)[conv]
    words = vocab.gather(rng.integers(0, len(vocab), n * 36)).reshape((n, 36))
    content = words.arr.join(" ").str.slice(0, 200).to_arrow()
    return pa.table(
        {
            "conversation_id": pa.array(np.char.add(prefix, conv.astype(str))),
            "group_id": pa.array(np.char.add(prefix + "g", (conv // 4).astype(str))),
            "task": pa.array(np.array(["medical", "math", "docwrite"])[conv % 3]),
            "turn": turn.astype(np.int32),
            "n_tokens": n_tokens.astype(np.int32),
            "outcome": outcome,
            "implicit_reward": implicit,
            "implicit_reward_mean": implicit / n_tokens,
            "itpo_norm_weight": weight,
            "itpo_norm_reward": outcome * weight,
            "length_share": n_tokens / conv_tokens,
            "q_value": outcome * 0.8 + rng.normal(0, 0.1, n),
            "mc_return": outcome,
            "advantage": rng.normal(0, 1, n),
            "oracle_utility": implicit * 0.3 + rng.normal(0, 1, n),
            "content": content,
        }
    )


def make_run(path: Path, rows: int, methods: int, rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    vocab = _vocab(rng)
    run = RunDir(path)
    per = rows // (methods * rounds)
    gen = write = 0.0
    for m in range(methods):
        for r in range(rounds):
            t0 = time.perf_counter()
            table = synthetic_turns(per, rng, vocab, f"m{m}r{r}-")
            t1 = time.perf_counter()
            run.write_partition("turns", f"method_{m}", r, table)
            gen, write = gen + t1 - t0, write + time.perf_counter() - t1
            run.append_metrics({"method": f"method_{m}", "round": r})
    size = sum(p.stat().st_size for p in path.rglob("*.parquet"))
    return {
        "rows": per * methods * rounds,
        "partitions": methods * rounds,
        "generate_s": round(gen, 2),
        "write_partition_s": round(write, 2),
        "parquet_mb": round(size / 2**20, 1),
    }


def _time(fn: Callable[[], Any], repeats: int = 3) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": round(times[0], 4), "best_of_3_s": round(min(times), 4)}


def bench_itpo(run: Path, threads: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    RunDatabase(run, threads=threads).close()
    out["open_s"] = round(time.perf_counter() - t0, 4)
    for name, sql in QUERIES.items():
        with RunDatabase(run, threads=threads) as db:  # a fresh connection: "first" is a first run
            out[name] = _time(lambda db=db, sql=sql: db.query(sql))
    return out


def bench_raw(run: Path, threads: int | None) -> dict[str, Any]:
    out = {}
    glob = f"read_parquet('{run}/turns/**/*.parquet', hive_partitioning = true)"
    for name, sql in QUERIES.items():
        con = duckdb.connect()
        if threads:
            con.execute(f"SET threads = {threads}")
        out[name] = _time(
            lambda con=con, sql=sql: con.sql(sql.replace("FROM turns", f"FROM {glob}")).to_arrow_table()
        )
        con.close()
    return out


def bench_naive(run: Path) -> dict[str, Any]:
    def load() -> pl.DataFrame:
        return pl.read_parquet(f"{run}/turns/**/*.parquet", hive_partitioning=True)

    queries = {
        "means": lambda: (
            load()
            .group_by("method", "round")
            .agg(pl.col("implicit_reward").mean(), pl.col("q_value").mean(), pl.len().alias("n"))
            .sort("method", "round")
        ),
        "top20": lambda: (
            load()
            .sort("implicit_reward", descending=True)
            .head(20)
            .select("method", "round", "conversation_id", "turn", "implicit_reward", "content")
        ),
        "corr": lambda: (
            load()
            .group_by("task", "method")
            .agg(pl.corr("implicit_reward", "oracle_utility").alias("corr"), pl.len().alias("n"))
            .sort("task", "method")
        ),
    }
    return {name: _time(fn) for name, fn in queries.items()}


def check_agreement(run: Path) -> bool:
    """The three engines give the same answers (means and correlations to 1e-9, the same top 20)."""
    with RunDatabase(run) as db:
        ours = {name: pl.from_arrow(db.query(sql)) for name, sql in QUERIES.items()}
    naive = pl.read_parquet(f"{run}/turns/**/*.parquet", hive_partitioning=True)
    top = naive.sort("implicit_reward", descending=True).head(20)
    corr = naive.group_by("task", "method").agg(pl.corr("implicit_reward", "oracle_utility").alias("c"))
    corr = corr.sort("task", "method")["c"].to_numpy()
    return bool(
        ours["top20"]["conversation_id"].to_list() == top["conversation_id"].to_list()
        and np.allclose(ours["corr"]["corr"].to_numpy(), corr, atol=1e-9)
        and ours["means"]["n"].sum() == naive.height
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--methods", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: DuckDB's).")
    ap.add_argument("--keep", type=Path, default=None, help="Write the run here and keep it.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp) / "run"
        result: dict[str, Any] = {"data": make_run(run, args.rows, args.methods, args.rounds)}
        result["threads"] = args.threads or duckdb.sql("SELECT current_setting('threads')").fetchall()[0][0]
        result["itpo_batch_sql"] = bench_itpo(run, args.threads)
        result["raw_duckdb"] = bench_raw(run, args.threads)
        result["naive_polars"] = bench_naive(run)
        best = {e: {q: result[e][q]["best_of_3_s"] for q in QUERIES} for e in ("raw_duckdb", "naive_polars")}
        ours = {q: result["itpo_batch_sql"][q]["best_of_3_s"] for q in QUERIES}
        result["overhead_vs_raw_duckdb"] = {q: round(ours[q] / best["raw_duckdb"][q], 2) for q in QUERIES}
        result["speedup_vs_naive_polars"] = {q: round(best["naive_polars"][q] / ours[q], 1) for q in QUERIES}
        result["results_agree"] = check_agreement(run)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
