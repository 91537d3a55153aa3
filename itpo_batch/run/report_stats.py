"""The report's statistics: per-round summaries over runs and the paired improvement over π_0.

The design decisions (one run: its own CIs; several runs: a t-interval across runs with the sd floored
at the runs' own standard error; the headline is the paired improvement) are stated in
:mod:`itpo_batch.run.report`.
"""

from __future__ import annotations

import polars as pl

from itpo_batch.run.intervals import Z975, t_quantile_975

KEYS = ("task", "method", "round")
ID_COLUMNS = ("run", "task", "method", "round", "seed", "estimator")
OUTCOME, GREEDY = "eval/outcome_mean", "eval/greedy_outcome_mean"
# A mean with a recorded CI; several runs replace the CI with a t-interval across runs.
# Paired per-case difference to π_0 on the fixed evaluation cases (recorded by iterate): with one run it
# is the improvement's CI (the cases are the same, so the case-to-case spread cancels).
PAIRED = {OUTCOME: "eval/outcome_delta_pi0", GREEDY: "eval/greedy_outcome_delta_pi0"}
CI_COLUMNS = {
    OUTCOME: ("eval/outcome_ci_low", "eval/outcome_ci_high"),
    GREEDY: ("eval/greedy_outcome_ci_low", "eval/greedy_outcome_ci_high"),
}
CONFIG_KEYS = ("task", "model", "policy", "env", "rounds", "methods", "seed", "n")


def metric_columns(df: pl.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ID_COLUMNS and df.schema[c] == pl.Float64]


def _t_interval(mean: str, sd: str, k: str) -> tuple[pl.Expr, pl.Expr]:
    """Expressions for mean ∓ t(k−1)·sd/√k (null when k < 2)."""
    t = pl.col(k).map_elements(lambda n: t_quantile_975(n - 1) if n >= 2 else None, return_dtype=pl.Float64)
    half = t * pl.col(sd) / pl.col(k).cast(pl.Float64).sqrt()
    return pl.col(mean) - half, pl.col(mean) + half


def _se(lo: str, hi: str) -> pl.Expr:
    """A run's standard error from its recorded 95% CI (null when the CI is missing)."""
    return (pl.col(hi) - pl.col(lo)) / (2 * Z975)


def _floored_sd(values: pl.Expr, own_se: pl.Expr) -> pl.Expr:
    """Aggregation: sd across runs floored at the root-mean-square of the runs' own se (module docstring)."""
    return pl.max_horizontal(values.std(), own_se.pow(2).mean().sqrt())


def summarise(df: pl.DataFrame) -> pl.DataFrame:
    """Per (task, method, round): the mean over runs of every metric, ``n_runs``, and outcome CIs.

    An outcome CI is the run's own when one run has the value and the t-interval across runs when
    several do (module docstring).
    """
    metrics = metric_columns(df)
    aggs = [pl.col("run").n_unique().alias("n_runs"), *(pl.col(m).mean() for m in metrics)]
    for m in (m for m in CI_COLUMNS if m in metrics):
        has_ci = set(CI_COLUMNS[m]) <= set(df.columns)
        sd = _floored_sd(pl.col(m), _se(*CI_COLUMNS[m])) if has_ci else pl.col(m).std()
        aggs += [sd.alias(f"{m}:sd"), pl.col(m).count().alias(f"{m}:k")]
    out = df.group_by(KEYS).agg(aggs).sort(KEYS)
    for m, (lo, hi) in CI_COLUMNS.items():
        if m not in metrics:
            continue
        t_lo, t_hi = _t_interval(m, f"{m}:sd", f"{m}:k")
        several = pl.col(f"{m}:k") >= 2
        own_lo = pl.col(lo) if lo in out.columns else pl.lit(None, pl.Float64)
        own_hi = pl.col(hi) if hi in out.columns else pl.lit(None, pl.Float64)
        out = out.with_columns(
            pl.when(several).then(t_lo).otherwise(own_lo).alias(lo),
            pl.when(several).then(t_hi).otherwise(own_hi).alias(hi),
        ).drop(f"{m}:sd", f"{m}:k")
    return out.select(*KEYS, "n_runs", *(c for c in out.columns if c not in (*KEYS, "n_runs")))


def improvement(df: pl.DataFrame, metric: str = OUTCOME) -> pl.DataFrame:
    """Per (task, method): final-round ``metric`` − round-0 ``metric``, paired per run, with a 95% CI.

    Columns: task, method, n_runs, final_round, start, final, delta, ci_low, ci_high, excludes_zero
    (null when there is no CI). Each run pairs its round 0 with its own last round that has the
    metric (``final_round`` is the latest of these); runs without both are left out. With one run the CI
    is the recorded per-case paired CI (:data:`PAIRED`) when there is one, else from the two rounds' CIs;
    with several, the t-interval of the per-run Δ with its sd floored at the runs' own se (docstring).
    """
    lo, hi = CI_COLUMNS.get(metric, (f"{metric}:lo", f"{metric}:hi"))
    cols = [c for c in (metric, lo, hi) if c in df.columns]
    if metric not in df.columns:
        return pl.DataFrame(schema=_IMPROVEMENT_SCHEMA)
    paired = [f"{PAIRED[metric]}_ci_low", f"{PAIRED[metric]}_ci_high"] if metric in PAIRED else []
    rows = df.filter(pl.col(metric).is_not_null()).select(
        "run", *KEYS, *cols, *(c for c in paired if c in df.columns)
    )
    for c in (lo, hi, "p_lo", "p_hi"):
        if c not in rows.columns:
            rows = rows.with_columns(pl.lit(None, pl.Float64).alias(c))
    if paired and paired[0] in rows.columns:
        rows = rows.drop("p_lo", "p_hi").rename({paired[0]: "p_lo", paired[1]: "p_hi"})
    first = rows.filter(pl.col("round") == 0).drop("round", "p_lo", "p_hi")
    last = rows.filter(pl.col("round") == pl.col("round").max().over("run", "task", "method"))
    last = last.filter(pl.col("round") > 0)
    pairs = first.join(last, on=["run", "task", "method"], suffix="_R")
    se0, se_r = _se(lo, hi), _se(f"{lo}_R", f"{hi}_R")
    delta = (pl.col(f"{metric}_R") - pl.col(metric)).alias("delta")
    pairs = pairs.with_columns(delta, (se0**2 + se_r**2).sqrt().alias("se"))
    # the run's own se of Δ (module docstring): from its paired CI when recorded, else from the two rounds'
    pairs = pairs.with_columns(pl.coalesce(_se("p_lo", "p_hi"), pl.col("se")).alias("own_se"))
    out = pairs.group_by("task", "method").agg(
        pl.len().alias("n_runs"),
        pl.col("round").max().alias("final_round"),
        pl.col(metric).mean().alias("start"),
        pl.col(f"{metric}_R").mean().alias("final"),
        pl.col("delta").mean(),
        _floored_sd(pl.col("delta"), pl.col("own_se")).alias("sd"),
        pl.col("se").first(),
        pl.col("p_lo").first(),
        pl.col("p_hi").first(),
    )
    t_lo, t_hi = _t_interval("delta", "sd", "n_runs")
    one = pl.col("n_runs") == 1
    out = out.with_columns(
        pl.when(one & pl.col("p_lo").is_not_null())
        .then(pl.col("p_lo"))
        .when(one)
        .then(pl.col("delta") - Z975 * pl.col("se"))
        .otherwise(t_lo)
        .alias("ci_low"),
        pl.when(one & pl.col("p_hi").is_not_null())
        .then(pl.col("p_hi"))
        .when(one)
        .then(pl.col("delta") + Z975 * pl.col("se"))
        .otherwise(t_hi)
        .alias("ci_high"),
    )
    out = out.with_columns(((pl.col("ci_low") > 0) | (pl.col("ci_high") < 0)).alias("excludes_zero"))
    return out.select(*_IMPROVEMENT_SCHEMA).cast(_IMPROVEMENT_SCHEMA).sort("task", "method")


_IMPROVEMENT_SCHEMA = {
    "task": pl.String, "method": pl.String, "n_runs": pl.Int64, "final_round": pl.Int64,
    "start": pl.Float64, "final": pl.Float64, "delta": pl.Float64,
    "ci_low": pl.Float64, "ci_high": pl.Float64, "excludes_zero": pl.Boolean,
}  # fmt: skip


def final_rounds(summary: pl.DataFrame) -> pl.DataFrame:
    """The last round's row of every (task, method) of a :func:`summarise` table."""
    last = pl.col("round") == pl.col("round").max().over("task", "method")
    return summary.filter(last).sort("task", "method")
