"""Which rows of a report may be pooled: a method is averaged across runs only when they ran it alike.

Runs given to ``report`` together are treated as seeds of one experiment, and a method's rows are
averaged across them. That is right only when the runs differ in their seed alone. Two kinds of
difference are made visible instead of averaged:

* **Estimator**: a method run with different estimators is reported as ``method (estimator)``, e.g.
  ``itpo_norm (rloo_once)``; round 0 (π_0's evaluation, recorded without an estimator) takes its arm's
  estimator from the run's other rounds.
* **Settings**: a method whose runs differ in a setting that can change its results (read from each
  run's ``config.yaml``) is reported as ``method [key=value, …]`` with the keys that differ, e.g.
  ``itpo [prm.center=True]`` beside ``itpo [prm.center=False]``.

Design decisions:

* **Only settings that reach the method count.** ``prm.*`` reaches the PRM arms (``itpo``, ``itpo_norm``,
  ``prime``), ``q.*`` and ``ippo.*`` only ``iterative_ppo``, ``update.*`` every other arm, ``critic.*``
  only arms run with ``ppo``; task, sizes, evaluation and the ``method.*`` coefficients reach all. So a
  second run with ``prm.center`` does not split ``outcome``.
* **Not settings:** what differs between seeds by design or does not change results: ``seed``,
  ``eval.seed`` (each seed its own evaluation draw), ``rounds`` (the headline pairs round 0 with each
  run's last round), ``methods``, ``workers``, paths (``model``, ``logs``, ``q.model``, ``q.warm_start``:
  one recipe at two paths is common and a path says nothing of content), micro-batch and chunk sizes
  (``*batch_tokens``, ``*chunk_size``, ``*batch_size``, ``rollout_batch``: memory, not results), and
  ``*.progress``. The estimator keys are left to the estimator split.
* **A key missing from a run's config takes today's default** (:class:`IterateConfig`, and the task's
  config class for ``task_settings.*``): a run written before a setting existed ran what is now its
  default, since new options default to the old behaviour. A key that has no default either (a user
  task that no longer imports) does not split, and a run without ``config.yaml`` is never split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import polars as pl

from itpo_batch.core.errors import ItpoError

IGNORED = {"seed", "eval.seed", "rounds", "methods", "workers", "model", "logs", "q.model", "q.warm_start"}
IGNORED |= {"rollout_batch", "method.estimator", "ippo.estimator"}
IGNORED_SUFFIXES = ("batch_tokens", "chunk_size", "batch_size", ".progress")
PRM_ARMS = {"itpo", "itpo_norm", "prime"}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"prm": {"center": True}}`` → ``{"prm.center": True}``; lists become tuples (hashable)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


@functools.lru_cache(maxsize=8)
def defaults(task: str) -> dict[str, Any]:
    """Today's defaults, flattened: :class:`IterateConfig` and ``task``'s settings ({} for a task that does
    not import). Imported here, and only when runs' configs differ in their keys: ``report`` (and the
    CLI) start without torch."""
    from itpo_batch.core.config import to_mapping
    from itpo_batch.run.config import IterateConfig
    from itpo_batch.sim.envs import load_task

    out = flatten(to_mapping(IterateConfig()))
    try:
        out |= flatten({"task_settings": dataclasses.asdict(load_task(task).config)})
    except ItpoError:
        pass  # a user task that does not import: its settings are compared only where both runs name them
    return out


def reaches(key: str, method: str, estimator: str | None) -> bool:
    """Whether setting ``key`` can change the results of ``method`` run with ``estimator``."""
    if key in IGNORED or key.endswith(IGNORED_SUFFIXES):
        return False
    section = key.split(".", 1)[0]
    if section == "prm":
        return method in PRM_ARMS
    if section in ("q", "ippo"):
        return method == "iterative_ppo"
    if section == "update":
        return method != "iterative_ppo"
    if section == "critic":
        return estimator == "ppo"
    return True


def split_methods(df: pl.DataFrame, configs: dict[str, dict[str, Any]]) -> pl.DataFrame:
    """Relabel ``method`` by estimator, then by differing settings (module docstring); ``configs`` maps
    each run name to its flattened ``config.yaml`` ({} without one)."""
    df = _split_estimators(df)
    arms = df.group_by("run", "task", "method", maintain_order=True).agg(
        pl.col("estimator").drop_nulls().first()
    )
    labels: dict[tuple[str, str, str], str] = {}
    for (task, method), group in arms.group_by(["task", "method"], maintain_order=True):
        rows = list(group.iter_rows(named=True))
        wanted = [
            {k: v for k, v in configs.get(r["run"], {}).items() if reaches(k, _base(method), r["estimator"])}
            for r in rows
        ]
        union = set().union(*wanted)
        for w in wanted:  # a key a run's config lacks takes today's default (module docstring)
            if w and (missing := union - set(w)):
                w |= {k: v for k, v in defaults(str(task)).items() if k in missing}
        shared = set.intersection(*(set(w) for w in wanted)) if wanted else set()
        differ = sorted(k for k in shared if len({repr(w[k]) for w in wanted}) > 1)
        for r, w in zip(rows, wanted, strict=True):
            if differ:
                settings = ", ".join(f"{k}={w[k]}" for k in differ)
                labels[(r["run"], str(task), str(method))] = f"{method} [{settings}]"
    if not labels:
        return df
    keys = pl.DataFrame(
        [{"run": r, "task": t, "method": m, "label": lab} for (r, t, m), lab in labels.items()],
        schema={"run": pl.String, "task": pl.String, "method": pl.String, "label": pl.String},
    )
    df = df.join(keys, on=["run", "task", "method"], how="left")
    return df.with_columns(pl.coalesce("label", "method").alias("method")).drop("label")


def _base(method: str) -> str:
    """The arm's name without the estimator label."""
    return method.split(" (", 1)[0]


def _split_estimators(df: pl.DataFrame) -> pl.DataFrame:
    """``method (estimator)`` for a method the runs ran with several estimators (module docstring)."""
    arm = pl.col("estimator").drop_nulls().first().over("run", "task", "method")
    df = df.with_columns(pl.coalesce("estimator", arm).alias("estimator"))
    several = pl.col("estimator").drop_nulls().n_unique().over("task", "method") > 1
    label = pl.format("{} ({})", "method", pl.col("estimator").fill_null("unknown estimator"))
    return df.with_columns(pl.when(several).then(label).otherwise(pl.col("method")).alias("method"))
