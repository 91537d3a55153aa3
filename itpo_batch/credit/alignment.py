"""Credit alignment: does a turn-credit signal agree with the oracle's utility of each turn?

When logs come from the simulated tasks they carry ``oracle_turn_utility`` (never read by the
algorithms). For each task and each credit signal this module reports

* **Spearman** rank correlation between the signal and the oracle utility over all assistant turns;
* **AUROC** of the signal for telling *useful* turns (utility > 0) from *useless* ones (utility ≤ 0):
  the probability that a random useful turn gets more credit than a random useless one (ties count
  half). 0.5 is chance.

Both use average ranks for ties and are computed with polars rank expressions (no loop over turns).
``length_share`` is included as a trivial baseline: credit proportional to how long a turn is.
A cell with fewer than two distinct values on either side is reported as null rather than a number
that means nothing.
"""

from __future__ import annotations

import polars as pl

SIGNALS = ("implicit_reward", "implicit_reward_mean", "itpo_norm_weight", "q_value", "length_share")


def _spearman(x: str, y: str) -> pl.Expr:
    return pl.corr(pl.col(x).rank("average"), pl.col(y).rank("average"))


def _auroc(score: str, positive: pl.Expr) -> pl.Expr:
    rank = pl.col(score).rank("average")
    n_pos = positive.sum().cast(pl.Float64)
    n_neg = (~positive).sum().cast(pl.Float64)
    rank_sum = rank.filter(positive).sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def credit_alignment(turns: pl.DataFrame, signals: tuple[str, ...] = SIGNALS) -> pl.DataFrame:
    """One row per (task, signal): turns, useful turns, Spearman and AUROC against ``oracle_utility``.

    ``turns`` needs ``task``, ``oracle_utility`` and the signal columns; rows without an oracle value
    are ignored. Returns an empty frame when no turn has one.
    """
    have = [s for s in signals if s in turns.columns]
    data = turns.filter(pl.col("oracle_utility").is_not_null() & pl.col("oracle_utility").is_not_nan())
    if data.height == 0 or not have:
        return pl.DataFrame(schema={"task": pl.String, "signal": pl.String, "turns": pl.UInt32,
                                    "useful": pl.UInt32, "spearman": pl.Float64, "auroc": pl.Float64})  # fmt: skip
    data = data.with_columns(pl.col("task").fill_null("(none)"), useful=pl.col("oracle_utility") > 0)
    rows = []
    for signal in have:
        stats = data.group_by("task", maintain_order=True).agg(
            turns=pl.len(),
            useful=pl.col("useful").sum(),
            spearman=_spearman(signal, "oracle_utility"),
            auroc=_auroc(signal, pl.col("useful")),
            distinct=pl.col(signal).n_unique(),
            distinct_oracle=pl.col("oracle_utility").n_unique(),
        )
        rows.append(stats.with_columns(signal=pl.lit(signal)))
    out = pl.concat(rows)
    degenerate = (pl.col("distinct") < 2) | (pl.col("distinct_oracle") < 2)
    one_class = (pl.col("useful") == 0) | (pl.col("useful") == pl.col("turns"))
    return out.select(
        "task",
        "signal",
        "turns",
        pl.col("useful").cast(pl.UInt32),
        spearman=pl.when(degenerate).then(None).otherwise(pl.col("spearman")),
        auroc=pl.when(degenerate | one_class).then(None).otherwise(pl.col("auroc")),
    ).sort("task", "signal", maintain_order=True)
