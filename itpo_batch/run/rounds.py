"""``iterate``: rounds of batch policy improvement, one arm per method, all from the same π_0 and round-0 logs.

Round ``k ≥ 1`` of an arm (docs/method.md §8.1): load the arm's state after round ``k−1`` from disk (policy, PRM, Q,
critic, and the logs its policy collected) → fit PRM and/or Q on those logs → score → update the policy
(:mod:`itpo_batch.run.arm_step`) → save checkpoints → collect the next logs with the new policy (simulated
task; the *same* cases and user seeds for every arm in a round, so arms are compared on paired data) →
evaluate → write the round's tables → append its metrics line (the commit point).

Decisions:

- **Round 0 is π_0.** It is evaluated once (sampled and greedy on the fixed evaluation cases, which every
  later round and arm replays, so improvements are paired per case) and recorded for every arm, so every
  curve starts at the same point. ``--logs`` gives round-0 logs from a file (e.g. the scripted policy's); without it π_0
  collects them.
- **What a round's partition holds.** ``turns``/``conversations``/``messages`` at ``round=k`` are the logs
  the round-``k`` update *consumed* (collected by π_{k−1}), scored with the arm's signals and the advantage
  the update used. ``eval/…`` metrics at round ``k`` describe π_k. The logs π_k collected are
  ``checkpoints/method=M/round=k/logs.parquet`` (round ``k+1``'s input).
- **Exact resume.** Every round re-reads its inputs from disk, seeds everything from (seed, round) or
  (seed, method, round), and builds fresh optimisers, so a round is a pure function of what the previous
  round saved: ``--resume`` after a crash (even SIGKILL mid-round) re-runs the incomplete round and ends
  with the same metrics as an uninterrupted run. Files are written atomically; a round without its metrics
  line is simply redone.
- **``--env none``** (deployment loop, one method): after updating, the round's policy checkpoint is the
  deliverable; the command stops and prints where it is. ``--resume --logs NEW.parquet`` continues with the
  logs of the deployed checkpoint.
- **Device.** CUDA when present (models in float32 master weights, forwards under bf16 autocast), else CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.core.seeds import derived_seed
from itpo_batch.credit.alignment import credit_alignment
from itpo_batch.data.io import write_parquet
from itpo_batch.data.store import RunDir
from itpo_batch.data.validate import Logs, read_logs
from itpo_batch.run.arm_state import ArmState, logs_table_from, nested_table, save_round, write_round_tables
from itpo_batch.run.arm_step import ArmSeeds
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.context import Context, Hook, make_context
from itpo_batch.run.evaluate import eval_rollout, kl_to_reference, logs_stats
from itpo_batch.run.intervals import mean_ci
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, rollout


def _rollout(ctx: Context, policy: torch.nn.Module, round_: int) -> Any:
    """``cfg.n`` sampled conversations of π on round ``round_``'s cases (the same for every arm)."""
    cfg = ctx.cfg
    rcfg = RolloutConfig(
        n=cfg.n, group_size=cfg.group_size, seed=derived_seed(cfg.seed, "rollout", round_), temperature=1.0,
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rollout_batch,
    )  # fmt: skip
    return rollout(ctx.task, HFPolicy(policy, ctx.tokenizer, rcfg), rcfg, progress=False)


def _eval_rollouts(ctx: Context, policy: torch.nn.Module) -> dict[str, Any]:
    """Sampled (T=1) and greedy rollouts of π on the fixed evaluation cases, keyed by metric prefix."""
    out = {}
    for prefix, temperature in (("eval/", 1.0), ("eval/greedy_", 0.0)):
        ctx.hook("evaluating (sampled)" if temperature else "evaluating (greedy)")
        out[prefix] = eval_rollout(policy, ctx.tokenizer, ctx.task, ctx.cfg.eval, temperature)
    return out


def _paired_delta(table: Any, reference: Any, prefix: str) -> dict[str, float]:
    """Mean per-case outcome difference to π_0 on the same evaluation cases, with its 95% t-interval."""
    mine = pl.from_arrow(table.select(["conversation_id", "outcome"]))
    ref = pl.from_arrow(reference.select(["conversation_id", "outcome"]))
    diff = mine.join(ref, on="conversation_id", suffix="_pi0").select(
        pl.col("outcome") - pl.col("outcome_pi0")
    )
    mean, lo, hi = mean_ci(diff.to_series().to_numpy())
    key = f"{prefix}outcome_delta_pi0"
    return {key: mean, f"{key}_ci_low": lo, f"{key}_ci_high": hi}


def evaluate(ctx: Context, policy: torch.nn.Module, logs: Logs, table: Any) -> dict[str, Any]:
    """Metrics of π: ``eval/…`` sampled and ``eval/greedy_…`` greedy on the fixed evaluation cases (with the
    per-case paired difference to π_0), ``logs/…`` of the conversations it collected, ``policy/kl_pi0``.

    The collected logs change cases every round (they are training data), so round-to-round comparisons
    of their outcome mix policy and case difficulty; the evaluation cases are the same for every round
    and arm (same seeds), which makes the comparison paired.
    """
    out: dict[str, Any] = logs_stats(table, "logs/")
    out |= kl_to_reference(policy, ctx.pi0, ctx.tokenizer, logs.chats())
    if ctx.task is None or ctx.cfg.eval.n <= 0:
        return out
    reference_dir = ctx.run.path / "checkpoints"
    for prefix, eval_table in _eval_rollouts(ctx, policy).items():
        out |= logs_stats(eval_table, prefix)
        ref_path = reference_dir / f"pi0_{prefix.strip('/').replace('/', '_')}.parquet"
        if not ref_path.is_file():  # round 0: π_0's own evaluation is the reference
            write_parquet(eval_table, ref_path)
        out |= _paired_delta(eval_table, logs_table_from(ref_path), prefix)
    return out


def round_zero(ctx: Context) -> Path:
    """Round-0 logs (from ``--logs`` or collected by π_0) and π_0's metrics for every arm; returns the logs."""
    cfg, run = ctx.cfg, ctx.run
    shared = run.path / "checkpoints" / "round0_logs.parquet"
    if not shared.is_file():
        ctx.hook("round 0: collecting π_0 logs" if cfg.logs is None else "round 0: reading logs")
        table = nested_table(read_logs([cfg.logs])) if cfg.logs is not None else _rollout(ctx, ctx.pi0, 0)
        write_parquet(table, shared)
    todo = [m for m in cfg.methods if 0 not in run.completed_rounds(m)]
    if todo:
        metrics = evaluate(ctx, ctx.pi0, read_logs([shared]), logs_table_from(shared))
        for m in todo:
            run.append_metrics({"method": m, "round": 0, "task": cfg.task, "seed": cfg.seed, **metrics})
    return shared


def arm_round(ctx: Context, method: str, round_: int, round0_logs: Path) -> dict[str, Any] | None:
    """Run round ``round_`` of ``method``; returns its metrics (None: stopped for ``--env none``)."""
    cfg, t0 = ctx.cfg, time.perf_counter()
    state = ArmState.load(ctx, method, round_ - 1, round0_logs)
    logs = read_logs([state.logs_path])
    seeds = ArmSeeds.of(cfg.seed, method, round_)
    torch.manual_seed(seeds.torch)
    ctx.hook(f"round {round_} · {method}: fit + update")
    step = state.step(logs, seeds)
    save_round(ctx, method, round_, state, step)
    metrics: dict[str, Any] = {"method": method, "round": round_, "task": cfg.task, "seed": cfg.seed,
                               "estimator": cfg.estimator_of(method), **step.metrics}  # fmt: skip
    if ctx.task is None:
        return _deployment_stop(ctx, method, round_, logs, step, metrics)
    ctx.hook(f"round {round_} · {method}: collecting logs")
    table = _rollout(ctx, state.policy, round_)
    new_logs_path = ctx.run.checkpoint_dir(method, round_, "policy").parent / "logs.parquet"
    write_parquet(table, new_logs_path)
    metrics |= evaluate(ctx, state.policy, read_logs([new_logs_path]), table)
    metrics |= _alignment(write_round_tables(ctx, method, round_, logs, step))
    metrics["time/round_s"] = time.perf_counter() - t0
    ctx.run.append_metrics(metrics)
    return metrics


def _alignment(turns: pl.DataFrame) -> dict[str, Any]:
    signals = ("advantage", "turn_reward", "implicit_reward", "itpo_norm_weight", "q_value", "length_share")
    out: dict[str, Any] = {}
    for row in credit_alignment(turns, signals).iter_rows(named=True):
        out[f"align/{row['signal']}/spearman"] = row["spearman"]
        out[f"align/{row['signal']}/auroc"] = row["auroc"]
    return out


def _deployment_stop(ctx: Context, method: str, round_: int, logs: Logs, step: Any, metrics: dict) -> None:
    """``--env none``: record the round (stats of the consumed logs) and stop with instructions."""
    metrics |= logs_stats(nested_table(logs), "logs/")
    metrics |= _alignment(write_round_tables(ctx, method, round_, logs, step))
    ctx.run.append_metrics(metrics)
    return None


def _take_deployed_logs(ctx: Context, new_logs: Path | None) -> None:
    """``--env none``: file the deployed checkpoint's logs as its round's logs, or say what is awaited."""
    method = ctx.cfg.methods[0]
    done = ctx.run.completed_rounds(method)
    last = max(done) if done else 0
    if last == 0 or last >= ctx.cfg.rounds:
        return
    target = ArmState.logs_file(ctx, method, last)
    if new_logs is not None:
        write_parquet(nested_table(read_logs([new_logs])), target)
    elif not target.is_file():
        policy = ctx.run.checkpoint_dir(method, last, "policy")
        raise ItpoError(
            f"round {last} ended with {policy} to deploy; pass the conversations it logged with "
            f"--resume --logs NEW.parquet to run round {last + 1}"
        )


def iterate(
    cfg: IterateConfig,
    run_dir: Path,
    resume: bool = False,
    hook: Hook | None = None,
    on_round: Callable[[int, int], None] | None = None,
    new_logs: Path | None = None,
) -> RunDir:
    """Run (or resume) every arm for ``cfg.rounds`` rounds in ``run_dir``; returns the run.

    ``hook(message)`` hears each phase; ``on_round(done, total)`` each finished arm-round. ``new_logs``
    (``--env none``): the conversations of the last exported checkpoint, which the next round consumes.
    """
    run = RunDir(run_dir)
    if run.is_run() and not resume:
        raise ItpoError(
            f"{run_dir} already holds a run; pass --resume to continue it or pick another --run-dir"
        )
    if not run.is_run():
        run.write_config(cfg)
    ctx = make_context(cfg, run, hook or (lambda _msg: None))
    round0 = round_zero(ctx)
    if cfg.task is None:
        _take_deployed_logs(ctx, new_logs)
    total = cfg.rounds * len(cfg.methods)
    for round_ in range(1, cfg.rounds + 1):
        for i, method in enumerate(cfg.methods):
            if round_ not in run.completed_rounds(method) and arm_round(ctx, method, round_, round0) is None:
                return run
            if on_round is not None:
                on_round((round_ - 1) * len(cfg.methods) + i + 1, total)
    return run
