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
- **NaN cannot spread.** The fits, the credit and the update check their numbers (one ``isfinite`` per
  tensor they already hold) and raise :class:`~itpo_batch.core.errors.NonFiniteError`, which
  :func:`arm_round` places (method, round) before anything of the round is saved: a NaN round is never
  committed, and ``--resume`` redoes it. Each phase of a round is announced to ``hook`` (the fault tests
  kill the process at each of them).
- **``--env none``** (deployment loop, one method): after updating, the round's policy checkpoint is the
  deliverable; the command stops and prints where it is. ``--resume --logs NEW.parquet`` continues with the
  logs of the deployed checkpoint.
- **Inputs before outputs.** :func:`iterate` claims the run directory (:mod:`itpo_batch.data.io`: new,
  empty, or, with ``--resume``, a run it wrote), reads and validates the logs it will use, loads π_0
  and the task, and only then creates the directory and writes ``config.yaml``: a bad ``--logs``,
  ``--model`` or ``--task`` leaves no folder behind and changes nothing in an existing one.
  ``--resume --logs NEW`` before round 0 has filed its logs makes NEW the round-0 logs (recorded in
  ``config.yaml``); after it, NEW are the deployed checkpoint's logs (``--env none``) and a task run
  refuses them (its arms already started from the old ones).
- **One command per run.** :func:`iterate` holds the run's lock (:mod:`itpo_batch.data.runlock`) from
  the claim (or from creating the run) to its end, so a second ``iterate`` on the run exits 2 naming the
  first, and sweeps what a killed writer left under ``tables/`` and ``checkpoints/`` once it holds it.
- **Arms in parallel.** With at least two arms and two cores (``workers``, default ``auto``) each arm
  runs its rounds in a worker process of its own, one torch thread each (:mod:`itpo_batch.run.workers`:
  who writes what, phases, failures); round 0 runs here first. An arm-round depends only on what the
  arm's previous round saved, so the results are those of a sequential run (tested).
- **One π_0 forward per round.** The round that collects logs runs π_0 on them once, for its KL to π_0,
  and keeps the values beside the logs for the round that consumes them (:mod:`itpo_batch.run.
  logprob_cache`); the evaluation follows a schedule (:class:`itpo_batch.run.evaluate.EvalConfig`: greedy
  every round, sampled at round 0 and the last round by default).
- **Device.** CUDA when present (models in float32 master weights, forwards under bf16 autocast), else CPU.
- **Several processes** (``accelerate launch … -m itpo_batch iterate``, :mod:`itpo_batch.model.dist`):
  every rank runs every arm-round, the arms one after the other (``workers`` is 1 under a launcher: the
  ranks are the parallelism). Fits, scoring and updates split their batches over the ranks as in
  ``score``; rollouts and evaluations deal their chunks of ``rollout_batch`` / ``eval.batch_size``
  conversations over the ranks and all-gather the table (:func:`itpo_batch.sim.rollout.rollout`), so
  every rank holds the conversations one process would have collected, bit for bit. Rank 0 alone writes
  (run directory, ``config.yaml``, checkpoints, logs and their log-prob caches, tables, metrics) and the
  others wait for it (:func:`~itpo_batch.run.context.on_main`); later rounds read those files back on every
  rank, as a resumed round does (so the run directory must be on a filesystem every node sees). Whatever a
  rank decides from the disk (round-0 logs filed, rounds committed) is rank 0's answer
  (:func:`~itpo_batch.model.dist.main_value`), so the ranks never take different branches.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import torch

from itpo_batch.core.errors import ItpoError, NonFiniteError
from itpo_batch.core.seeds import derived_seed
from itpo_batch.credit.alignment import credit_alignment
from itpo_batch.data.io import claim_output, write_parquet
from itpo_batch.data.runlock import RunLock
from itpo_batch.data.store import RunDir
from itpo_batch.data.validate import Logs, read_logs
from itpo_batch.model import dist
from itpo_batch.run.arm_state import ArmState, logs_table_from, nested_table, save_round, write_round_tables
from itpo_batch.run.arm_step import ArmSeeds
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.context import Context, Hook, hold_run, make_context, on_main, sweep_run
from itpo_batch.run.evaluate import eval_rollout, logs_stats
from itpo_batch.run.intervals import mean_ci
from itpo_batch.run.logprob_cache import cache_key, cache_path, logs_logprobs
from itpo_batch.run.workers import run_arms, worker_count
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, rollout


def _rollout(ctx: Context, policy: torch.nn.Module, round_: int) -> Any:
    """``cfg.n`` sampled conversations of π on round ``round_``'s cases (the same for every arm)."""
    cfg = ctx.cfg
    rcfg = RolloutConfig(
        n=cfg.n, group_size=cfg.group_size, seed=derived_seed(cfg.seed, "rollout", round_), temperature=1.0,
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rollout_batch,
    )  # fmt: skip
    return rollout(ctx.task, HFPolicy(policy, ctx.tokenizer, rcfg), rcfg, progress=False)


def _eval_rollouts(ctx: Context, policy: torch.nn.Module, round_: int) -> dict[str, Any]:
    """The evaluations due at ``round_`` (:meth:`EvalConfig.due`): sampled (T=1) and/or greedy rollouts of π
    on the fixed evaluation cases, keyed by metric prefix."""
    out = {}
    for prefix, temperature in (("eval/", 1.0), ("eval/greedy_", 0.0)):
        if not ctx.cfg.eval.due(temperature, round_, ctx.cfg.rounds):
            continue
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


def evaluate(
    ctx: Context, policy: torch.nn.Module, logs_path: Path, table: Any, round_: int
) -> dict[str, Any]:
    """Metrics of π at ``round_``: ``logs/…`` of the conversations it collected (``logs_path``, ``table``),
    ``policy/kl_pi0`` on them, and the evaluations due (``eval/…`` sampled, ``eval/greedy_…`` greedy, on the
    fixed evaluation cases, with the per-case paired difference to π_0).

    The collected logs change cases every round (they are training data), so round-to-round comparisons
    of their outcome mix policy and case difficulty; the evaluation cases are the same for every round
    and arm (same seeds), which makes the comparison paired.
    """
    out: dict[str, Any] = logs_stats(table, "logs/")
    out |= _kl_to_pi0(ctx, policy, logs_path)
    if ctx.task is None or ctx.cfg.eval.n <= 0:
        return out
    reference_dir = ctx.run.path / "checkpoints"
    for prefix, eval_table in _eval_rollouts(ctx, policy, round_).items():
        out |= logs_stats(eval_table, prefix)
        ref_path = reference_dir / f"pi0_{prefix.strip('/').replace('/', '_')}.parquet"
        if dist.is_main_process() and not ref_path.is_file():  # round 0: π_0's evaluation is the reference
            write_parquet(eval_table, ref_path)
        dist.wait()
        out |= _paired_delta(eval_table, logs_table_from(ref_path), prefix)
    return out


def _kl_to_pi0(ctx: Context, policy: torch.nn.Module, logs_path: Path) -> dict[str, float]:
    """KL(π‖π_0) on the logs π collected, from π_0's one forward on them and π's behaviour log-probs; both
    kept beside the logs for the round that consumes them (:mod:`itpo_batch.run.logprob_cache`).
    π_0 against itself is 0 by definition."""
    ctx.hook("KL to π_0")
    cfg = ctx.cfg
    values = logs_logprobs(policy, ctx.pi0, ctx.tokenizer, read_logs([logs_path]), cfg.prm, cfg.update)
    key = cache_key(logs_path, ctx.pi0_spec, cfg.prm, cfg.update) if dist.is_main_process() else {}
    on_main(lambda: values.save(cache_path(logs_path), key))
    return {"policy/kl_pi0": 0.0, "policy/kl_pi0_k3": 0.0} if policy is ctx.pi0 else values.kl()


def round0_path(run: RunDir) -> Path:
    """Where a run files its round-0 logs (shared by every arm)."""
    return run.path / "checkpoints" / "round0_logs.parquet"


def round_zero(ctx: Context, logs: Logs | None = None) -> Path:
    """Round-0 logs (from ``--logs`` or collected by π_0) and π_0's metrics for every arm; returns the logs.

    ``logs``: ``cfg.logs`` already read and validated (by :func:`iterate`, before the run was created).
    """
    cfg, run = ctx.cfg, ctx.run
    shared = round0_path(run)
    if not dist.main_value(shared.is_file()):
        ctx.hook("round 0: collecting π_0 logs" if cfg.logs is None else "round 0: reading logs")
        if cfg.logs is not None:
            table = nested_table(logs if logs is not None else read_logs([cfg.logs]))
        else:
            table = _rollout(ctx, ctx.pi0, 0)
        on_main(lambda: write_parquet(table, shared))
    todo = dist.main_value([m for m in cfg.methods if 0 not in run.completed_rounds(m)])
    if todo:
        metrics = evaluate(ctx, ctx.pi0, shared, logs_table_from(shared), 0)
        for m in todo:
            on_main(lambda m=m: run.append_metrics({"method": m, "round": 0, "task": cfg.task, "seed": cfg.seed,
                                                    "budget/conversations": 0, **metrics}))  # fmt: skip
    return shared


def consumed(round0_logs: Path, round_: int, n: int) -> int:
    """Logged conversations an arm's updates have consumed by the end of round ``round_``: the round-0
    logs, then ``n`` a round (the x-axis of the learning curves: the same budget for every arm;
    Iterative PPO's fresh single-turn samples are counted apart, ``ippo/…``)."""
    return pq.read_metadata(round0_logs).num_rows + (round_ - 1) * n if round_ else 0


def arm_round(ctx: Context, method: str, round_: int, round0_logs: Path) -> dict[str, Any] | None:
    """Run round ``round_`` of ``method``; returns its metrics (None: stopped for ``--env none``)."""
    cfg, t0 = ctx.cfg, time.perf_counter()
    state = ArmState.load(ctx, method, round_ - 1, round0_logs)
    logs = read_logs([state.logs_path])
    seeds = ArmSeeds.of(cfg.seed, method, round_)
    torch.manual_seed(seeds.torch)
    where = f"round {round_} · {method}"
    try:
        step = state.step(logs, seeds, hook=lambda phase: ctx.hook(f"{where}: {phase}"),
                          fit=state.buffer(round0_logs))  # fmt: skip
    except NonFiniteError as e:  # raised before anything of the round was written
        raise _not_committed(e, method, round_) from None
    ctx.hook(f"{where}: saving checkpoints")
    on_main(lambda: save_round(ctx, method, round_, state, step))
    metrics: dict[str, Any] = {"method": method, "round": round_, "task": cfg.task, "seed": cfg.seed,
                               "estimator": cfg.estimator_of(method),
                               "budget/conversations": consumed(round0_logs, round_, cfg.n), **step.metrics}  # fmt: skip
    if ctx.task is None:
        return _deployment_stop(ctx, method, round_, logs, step, metrics)
    ctx.hook(f"{where}: collecting logs")
    table = _rollout(ctx, state.policy, round_)
    new_logs_path = ctx.run.checkpoint_dir(method, round_, "policy").parent / "logs.parquet"
    on_main(lambda: write_parquet(table, new_logs_path))
    heard = dataclasses.replace(ctx, hook=lambda phase: ctx.hook(f"{where}: {phase}"))
    metrics |= evaluate(heard, state.policy, new_logs_path, table, round_)
    ctx.hook(f"{where}: writing tables")
    metrics |= _alignment(write_round_tables(ctx, method, round_, logs, step))
    metrics["time/round_s"] = time.perf_counter() - t0
    on_main(lambda: ctx.run.append_metrics(metrics))  # the commit point; every rank sees it afterwards
    return metrics


def arm_rounds(
    cfg: IterateConfig,
    run_dir: Path,
    round0_logs: Path,
    method: str,
    hook: Hook,
    round_done: Callable[[int], None],
) -> None:
    """Every round of ``method`` not yet committed, in order, with a context of its own (a worker process's
    body, :mod:`itpo_batch.run.workers`); ``round_done(round)`` after each."""
    ctx = make_context(cfg, RunDir(run_dir), hook)
    for round_ in range(1, cfg.rounds + 1):
        if round_ not in ctx.run.completed_rounds(method):
            arm_round(ctx, method, round_, round0_logs)
        round_done(round_)


def _not_committed(e: NonFiniteError, method: str, round_: int) -> NonFiniteError:
    """``e`` placed at its arm-round, saying that the round was not committed and how to redo it."""
    hint = (
        f"round {round_} of {method} is not committed (nothing of it was written); `iterate --resume` redoes "
        "it (--set changes a setting, e.g. a learning rate: prm.lr, q.lr, critic.lr, update.lr)"
    )
    return e.at(f"iterate, method {method}, round {round_}", hint)


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
    on_main(lambda: ctx.run.append_metrics(metrics))
    return None


def _take_deployed_logs(ctx: Context, new_logs: Logs | None) -> None:
    """``--env none``: file the deployed checkpoint's logs (read and validated) as its round's logs, or
    say what is awaited."""
    method = ctx.cfg.methods[0]
    done = dist.main_value(ctx.run.completed_rounds(method))
    last = max(done) if done else 0
    if last == 0 or last >= ctx.cfg.rounds:
        return
    target = ArmState.logs_file(ctx, method, last)
    if new_logs is not None:
        on_main(lambda: write_parquet(nested_table(new_logs), target))
    elif not dist.main_value(target.is_file()):
        policy = ctx.run.checkpoint_dir(method, last, "policy")
        raise ItpoError(
            f"round {last} ended with {policy} to deploy; pass the conversations it logged with "
            f"--resume --logs NEW.parquet to run round {last + 1}"
        )


def _read_inputs(
    cfg: IterateConfig, run: RunDir, new_logs: Path | None
) -> tuple[IterateConfig, Logs | None, Logs | None]:
    """Read and validate the logs this call will use; returns the config (``logs`` = ``new_logs`` when
    those are the round-0 logs), the round-0 logs still to be filed, and the deployed logs (``--env none``)."""
    filed = round0_path(run).is_file()
    if new_logs is not None and not filed:
        cfg, new_logs = dataclasses.replace(cfg, logs=str(new_logs)), None
    if new_logs is not None and cfg.task is not None:
        if cfg.logs is not None and Path(new_logs).resolve() == Path(cfg.logs).resolve():
            new_logs = None  # the same file again: nothing changes
        else:
            raise ItpoError(
                f"round 0 of {run.path} already filed its logs ({cfg.logs or 'collected by π_0'}), and every "
                f"arm started from them; --logs with --resume sets the round-0 logs only before that "
                f"(with --env none: the deployed checkpoint's logs). Start a new --run-dir to use {new_logs}"
            )
    round0 = read_logs([cfg.logs]) if cfg.logs is not None and not filed else None
    deployed = read_logs([new_logs]) if new_logs is not None else None
    return cfg, round0, deployed


def _create(claim: Any, run: RunDir, cfg: IterateConfig) -> None:
    """Create the claimed run directory and write ``config.yaml`` (new run, or new round-0 logs)."""
    claim.create()
    if not run.config_path.is_file() or run.read_config().get("logs") != cfg.logs:
        run.write_config(cfg)


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
    (``--logs`` with ``--resume``): the round-0 logs while round 0 has not filed them, else (``--env none``)
    the conversations of the last exported checkpoint, which the next round consumes.
    """
    run = RunDir(run_dir)
    claim = claim_output(run.path, "workdir", "iterate", resume=resume, known=run.is_run(),
                         continues=("iterate",), option="--run-dir")  # fmt: skip
    lock = RunLock(run.path)
    try:
        hold_run(lock, hook)  # an existing run: before anything is loaded
        cfg, round0_logs, deployed = _read_inputs(cfg, run, new_logs)
        ctx = make_context(cfg, run, hook or (lambda _msg: None))  # loads π_0 and the task: both checked here
        dist.wait()  # under a launcher: every rank has checked the run directory before rank 0 creates it
        on_main(lambda: _create(claim, run, cfg))
        hold_run(lock, ctx.hook)  # a new run: as soon as it exists
        on_main(lambda: sweep_run(run, ctx.hook))
        return _rounds(ctx, cfg, run, round0_logs, deployed, on_round)
    finally:
        lock.release()


def _rounds(
    ctx: Context,
    cfg: IterateConfig,
    run: RunDir,
    round0_logs: Logs | None,
    deployed: Logs | None,
    on_round: Callable[[int, int], None] | None,
) -> RunDir:
    """Round 0, then every arm's rounds up to ``cfg.rounds`` that are not committed yet."""
    round0 = round_zero(ctx, round0_logs)
    if cfg.task is None:
        _take_deployed_logs(ctx, deployed)
    total = cfg.rounds * len(cfg.methods)
    workers = worker_count(cfg.workers, len(cfg.methods)) if cfg.task is not None else 1  # 1 when launched
    if workers > 1:
        done = itertools.count(1)
        run_arms(functools.partial(arm_rounds, cfg, run.path, round0), cfg.methods, workers, ctx.hook,
                 lambda: on_round(next(done), total) if on_round is not None else None)  # fmt: skip
        return run
    for round_ in range(1, cfg.rounds + 1):
        for i, method in enumerate(cfg.methods):
            todo = dist.main_value(round_ not in run.completed_rounds(method))
            if todo and arm_round(ctx, method, round_, round0) is None:
                return run
            if on_round is not None:
                on_round((round_ - 1) * len(cfg.methods) + i + 1, total)
    return run
