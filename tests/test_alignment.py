"""Credit alignment metrics against plain-loop references (ties, one class, degenerate signals)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from itpo_batch.credit.alignment import credit_alignment


def avg_ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_loop(x: list[float], y: list[float]) -> float:
    rx, ry = avg_ranks(x), avg_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def auroc_loop(score: list[float], useful: list[bool]) -> float:
    pos = [s for s, u in zip(score, useful, strict=True) if u]
    neg = [s for s, u in zip(score, useful, strict=True) if not u]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    oracle = rng.choice([0.0, 0.0, 0.5, 1.0, -0.2], n)
    signal = np.round(oracle + rng.normal(0, 0.7, n), 1)  # rounding makes ties
    turns = pl.DataFrame({"task": rng.choice(["medical", "math"], n), "oracle_utility": oracle,
                          "implicit_reward": signal, "length_share": rng.integers(1, 4, n) / 4})  # fmt: skip
    got = credit_alignment(turns, ("implicit_reward", "length_share"))
    for row in got.iter_rows(named=True):
        sub = turns.filter(pl.col("task") == row["task"])
        s, o = sub[row["signal"]].to_list(), sub["oracle_utility"].to_list()
        assert row["spearman"] == pytest.approx(spearman_loop(s, o), abs=1e-12)
        assert row["auroc"] == pytest.approx(auroc_loop(s, [v > 0 for v in o]), abs=1e-12)
        assert row["useful"] == sum(v > 0 for v in o)


def test_perfect_and_reversed_signals() -> None:
    turns = pl.DataFrame({"task": ["t"] * 6, "oracle_utility": [0.0, 0.0, 0.1, 0.5, 1.0, 2.0]})
    good = credit_alignment(turns.with_columns(q_value=pl.col("oracle_utility") * 3), ("q_value",))
    bad = credit_alignment(turns.with_columns(q_value=-pl.col("oracle_utility")), ("q_value",))
    assert good["spearman"][0] == pytest.approx(1.0) and good["auroc"][0] == pytest.approx(1.0)
    assert bad["spearman"][0] == pytest.approx(-1.0) and bad["auroc"][0] == pytest.approx(0.0)


def test_degenerate_cells_are_null_and_missing_oracle_is_ignored() -> None:
    turns = pl.DataFrame(
        {
            "task": ["a", "a", "a", "b", "b"],
            "oracle_utility": [1.0, 2.0, None, 1.0, 1.0],
            "implicit_reward": [0.3, 0.3, 0.1, 0.2, 0.4],
        }
    )
    got = credit_alignment(turns, ("implicit_reward",))
    a = got.filter(pl.col("task") == "a").row(0, named=True)
    b = got.filter(pl.col("task") == "b").row(0, named=True)
    assert a["turns"] == 2 and a["spearman"] is None  # constant signal
    assert b["auroc"] is None and b["spearman"] is None  # one class, constant oracle
    assert credit_alignment(turns.with_columns(oracle_utility=None), ("implicit_reward",)).height == 0
