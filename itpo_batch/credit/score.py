"""``score``: annotate every assistant turn of logs with implicit turn rewards and fitted turn Q-values.

Pipeline (one module per stage does the work; this one only wires them and writes the run):
validate (:mod:`itpo_batch.data.validate`) → split by conversation (the Q-model's stable hash split, so
the PRM and the Q-model hold out the *same* conversations) → fit the implicit PRM on the training split
and score both splits (:mod:`itpo_batch.credit.prm`) → fit the turn Q-model and predict every turn
(:mod:`itpo_batch.credit.qvalue`) → scored-turns and conversations tables, credit alignment when the logs carry
``oracle_turn_utility`` (:mod:`itpo_batch.credit.alignment`) → one run directory written atomically.

Decisions:

* The output folder is claimed (:func:`itpo_batch.data.io.claim_output`) before the model is loaded: an
  existing non-empty folder is refused unless it is an itpo-batch output and ``overwrite`` is set. The
  whole run directory is built under a temporary name and renamed at the end: a failure at any stage
  leaves no run, or the previous run of that name untouched.
* ``method = "score"`` and ``round = 0`` are the partition values, so ``itpo-batch sql`` reads a scored
  run and ``iterate`` runs with the same views.
* **Several processes** (``accelerate launch … -m itpo_batch score``): every rank validates and renders the
  whole logs; the PRM, the Q-model and their forwards share the work (:mod:`itpo_batch.model.dist`), so
  every rank ends with the same tables, equal to one process's; only rank 0 writes the run, the others
  wait for it.
* **Memory** (:mod:`itpo_batch.credit.memory`, the budget): the stages run in turn, and each frees what
  the next does not need: the PRM's datasets, optimiser, gradients and π_ref before the Q-model loads,
  the Q-model's gradients after its fit, freed heap pages between stages (:func:`~itpo_batch.credit.memory.trim_heap`).
* Conversations that do not fit the context are dropped or truncated by the PRM's ``overflow`` policy
  and counted in the metrics; dropped ones get no turns and no conversation row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.alignment import credit_alignment
from itpo_batch.credit.memory import trim_heap
from itpo_batch.credit.prm import ImplicitPRM, PRMConfig
from itpo_batch.credit.prm_data import PRMScores
from itpo_batch.credit.qfit import QResult, fit_q, save
from itpo_batch.credit.qvalue import QConfig, holdout_mask
from itpo_batch.data.io import Claim, claim_output
from itpo_batch.data.schemas import canonical_cast, load_schema
from itpo_batch.data.store import RunDir
from itpo_batch.data.validate import Logs
from itpo_batch.model import dist
from itpo_batch.model.loading import DEFAULT_MODEL
from itpo_batch.model.train import release

METHOD, ROUND = "score", 0
Progress = Callable[[str, int, int, float], None]


@dataclass
class ScoreConfig:
    """Everything ``score`` needs; saved as the run's ``config.yaml``."""

    model: str = DEFAULT_MODEL
    "Policy checkpoint the PRM and its reference start from (and the Q-model's backbone)."
    prm: PRMConfig = field(default_factory=lambda: PRMConfig(epochs=3, shuffle=True))
    "Implicit PRM settings; one fit on the whole logs, so 3 shuffled passes (``iterate`` fits 1 per round)."
    q: QConfig = field(default_factory=QConfig)
    "Turn Q-model settings (its holdout fraction defines the split for both models)."
    seed: int = 0
    "Seed of the hold-out split (a hash of it and each conversation id), the PRM's shuffles and the Q fit."


@dataclass
class ScoreResult:
    turns: pl.DataFrame
    conversations: pl.DataFrame
    metrics: dict[str, Any]
    alignment: pl.DataFrame


def subset(logs: Logs, keep: np.ndarray) -> Logs:
    """The conversations where ``keep`` is true (and their messages), same order."""
    conv = logs.conversations.filter(pl.Series(keep))
    msgs = logs.messages.filter(pl.col("conversation_id").is_in(conv["conversation_id"].implode()))
    return Logs(conv, msgs, logs.report)


def _prm_frames(scores: PRMScores, split: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    turns = scores.turns.drop("conv_index").with_columns(pl.lit(split).alias("split"))
    conv = scores.conversations.select("conversation_id", "implicit_reward_total", "n_tokens").with_columns(
        split=pl.lit(split)
    )
    return turns, conv


def turns_table(logs: Logs, prm_turns: pl.DataFrame, q_pred: pl.DataFrame | None) -> pl.DataFrame:
    """One row per scored assistant turn with ids, credit signals, Q, return, oracle utility and text.

    ``prm_turns`` (keyed by conversation_id, turn) may carry any further columns, ``advantage`` included
    (left as it is; null when absent); ``q_pred`` adds q_value and mc_return when given.
    """
    conv = logs.conversations.select("conversation_id", "group_id", "task", "outcome", "oracle_turn_utility")
    text = logs.messages.filter(pl.col("role") == "assistant").select(
        "conversation_id", pl.col("assistant_turn").alias("turn"), "content"
    )
    oracle = (
        conv.select("conversation_id", "oracle_turn_utility")
        .filter(pl.col("oracle_turn_utility").is_not_null())
        .explode("oracle_turn_utility")
        .with_columns(turn=pl.int_range(pl.len(), dtype=pl.Int32).over("conversation_id"))
        .rename({"oracle_turn_utility": "oracle_utility"})
    )
    out = prm_turns.with_columns(pl.col("turn").cast(pl.Int32)).join(
        conv.drop("oracle_turn_utility"), on="conversation_id", how="left"
    )
    if q_pred is not None:
        q = q_pred.select("conversation_id", pl.col("turn").cast(pl.Int32), "q_value", "mc_return")
        out = out.join(q, on=["conversation_id", "turn"], how="left")
    out = out.join(
        text.with_columns(pl.col("turn").cast(pl.Int32)), on=["conversation_id", "turn"], how="left"
    ).join(oracle, on=["conversation_id", "turn"], how="left")
    if "advantage" not in out.columns:
        out = out.with_columns(advantage=pl.lit(None, dtype=pl.Float64))
    return out.sort("conversation_id", "turn")


def run_score(
    logs: Logs, cfg: ScoreConfig, out_dir: Path, progress: Progress | None = None, overwrite: bool = False
) -> ScoreResult:
    """Fit PRM and Q on ``logs``, write the run to ``out_dir`` atomically, return the tables and metrics.

    ``overwrite``: replace an earlier itpo-batch output at ``out_dir`` (never a folder it did not write).
    """
    claim = claim_output(out_dir, "dir", "score", overwrite=overwrite)
    dist.init()  # under a launcher: this rank's device before any model is loaded
    ids = logs.conversations["conversation_id"].to_list()
    held = holdout_mask(ids, cfg.q.holdout, cfg.seed)
    if bool(held.all()):
        raise ItpoError(
            f"all {len(ids)} conversations fell in the hold-out split (holdout={cfg.q.holdout}, seed={cfg.seed}), "
            "so nothing is left to fit on; give more conversations, a smaller --holdout or another --seed"
        )
    train_logs, hold_logs = subset(logs, ~held), subset(logs, held)

    def hook(phase: str) -> Callable[[int, int, float], None] | None:
        return None if progress is None else (lambda s, t, loss: progress(phase, s, t, loss))

    prm = ImplicitPRM.load(cfg.model, cfg.prm)
    train = prm.prepare_logs(train_logs)
    hold = prm.prepare_logs(hold_logs) if hold_logs.conversations.height else None
    trim_heap()  # the reference forward's transient buffers
    prm_fit = prm.fit(train, holdout=hold, on_step=hook("prm"), seed=cfg.seed)
    frames = [_prm_frames(prm.score(train), "train")]
    if hold is not None:
        frames.append(_prm_frames(prm.score(hold), "holdout"))
    dropped = len(train.dropped) + (len(hold.dropped) if hold is not None else 0)
    del train, hold  # the Q phase needs neither dataset nor π_φ's training state (credit/memory.py)
    _keep_weights_only(prm)
    q_cfg = dataclasses.replace(cfg.q, model=cfg.q.model or cfg.model)
    q = fit_q(logs, q_cfg, on_step=hook("qvalue"), seed=cfg.seed)
    trim_heap()
    turns = turns_table(logs, pl.concat([f[0] for f in frames]), q.predictions)
    conv = logs.conversations.join(pl.concat([f[1] for f in frames]), on="conversation_id", how="inner")
    alignment = credit_alignment(turns)
    metrics = _metrics(prm_fit, q.metrics, alignment, logs, turns, dropped)
    if dist.is_main_process():
        _write_run(claim, cfg, logs, turns, conv, metrics, prm, q, q_cfg)
    dist.wait()
    return ScoreResult(turns, conv, metrics, alignment)


def _keep_weights_only(prm: ImplicitPRM) -> None:
    """Free what only the PRM fit needed before the Q phase: the optimiser (AdamW moments, 8 bytes per
    parameter), the gradients (4), π_ref (4) and freed heap pages; π_φ's weights stay for the write."""
    if prm.optimizer is not None:
        release(prm.trained, prm.optimizer)
    prm.optimizer, prm.trained, prm.reference = None, prm.model, None  # type: ignore[assignment]
    prm.model.zero_grad(set_to_none=True)
    trim_heap()


def _metrics(
    prm_fit: dict, q_metrics: dict, alignment: pl.DataFrame, logs: Logs, turns: pl.DataFrame, dropped: int
) -> dict:
    out: dict[str, Any] = {"method": METHOD, "round": ROUND}
    out.update(prm_fit["metrics"])
    out.update(q_metrics)
    out["score/conversations"] = logs.conversations.height
    out["score/turns"] = turns.height
    out["score/prm_dropped_overlength"] = dropped
    for row in alignment.iter_rows(named=True):
        for stat in ("spearman", "auroc"):
            out[f"align/{row['task']}/{row['signal']}/{stat}"] = row[stat]
    return out


def _write_run(claim: Claim, cfg: ScoreConfig, logs: Logs, turns: pl.DataFrame, conv: pl.DataFrame,
               metrics: dict, prm: ImplicitPRM, q: QResult, q_cfg: QConfig) -> None:  # fmt: skip
    with claim.atomic() as tmp:
        run = RunDir(tmp)
        run.write_config(cfg)
        turn_cols = [f.name for f in load_schema("turns").fields]
        run.write_partition("turns", METHOD, ROUND, turns.select(turn_cols).to_arrow())
        conv_schema = load_schema("scored_conversations")
        run.write_partition("conversations", METHOD, ROUND, conv.select(conv_schema.names).to_arrow())
        run.write_partition(
            "messages", METHOD, ROUND, canonical_cast(logs.messages, load_schema("messages")).to_arrow()
        )
        prm.save(run.checkpoint_dir(METHOD, ROUND, "prm"))
        save(q.model, q.tokenizer, q_cfg, run.checkpoint_dir(METHOD, ROUND, "qvalue"), q.metrics)
        run.append_metrics(metrics)


def top_turns(
    turns: pl.DataFrame, signal: str = "implicit_reward", k: int = 3
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``k`` highest- and lowest-credit turns by ``signal`` (with their text), for the summary."""
    cols = ["conversation_id", "turn", "outcome", signal, "q_value", "content"]
    ranked = turns.sort(signal, descending=True).select(cols)
    return ranked.head(k), ranked.tail(k).reverse()
