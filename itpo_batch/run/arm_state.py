"""An arm's state between rounds (loaded from and saved to the run directory) and the round's tables.

Everything a round needs from the previous one lives on disk under
``checkpoints/method=M/round=R/``: ``policy/`` (HF ``save_pretrained``, safetensors, with the tokenizer),
``prm/`` (:meth:`ImplicitPRM.save`), ``qvalue/`` (:func:`itpo_batch.credit.qfit.save`), ``critic/`` (value model
of ``--estimator ppo``), ``logs.parquet`` (what the round's policy collected) and
``logs.logprobs.safetensors`` (π_0's and that policy's log-probs of them,
:mod:`itpo_batch.run.logprob_cache`). Round 0's state is π_0 and the shared round-0 logs. Each directory is written atomically; the metrics line appended after them is
the round's commit point, so a half-saved round is just redone on ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from itpo_batch.core.errors import ModelLoadError
from itpo_batch.credit.prm import ImplicitPRM
from itpo_batch.credit.qfit import save as save_q
from itpo_batch.credit.score import turns_table
from itpo_batch.data.io import atomic_dir
from itpo_batch.data.schemas import canonical_cast, load_schema, nested_logs_schema
from itpo_batch.data.validate import Logs
from itpo_batch.model import dist
from itpo_batch.model.loading import VALUE_HEAD_FILE, ValueModel, load_model
from itpo_batch.rl.methods import METHODS, MethodSpec
from itpo_batch.run.arm_step import ArmSeeds, StepResult, ippo_arm_step, ippo_q_config, log_arm_step
from itpo_batch.run.buffer import FitLogs, fit_logs
from itpo_batch.run.logprob_cache import LogsLogprobs, cache_key, cache_path

if TYPE_CHECKING:
    from itpo_batch.run.context import Context

LOGS_FILE = "logs.parquet"


def _round_dir(ctx: Context, method: str, round_: int) -> Path:
    return ctx.run.checkpoint_dir(method, round_, "policy").parent


@dataclass
class ArmState:
    """Models and logs of one arm after round ``round_`` (0: π_0 and the round-0 logs)."""

    ctx: Context
    spec: MethodSpec
    round_: int
    policy: torch.nn.Module
    prm: ImplicitPRM | None
    q_dir: str | None
    critic: ValueModel | None
    logs_path: Path

    def cached_logprobs(self) -> LogsLogprobs | None:
        """π_0's and the collecting policy's log-probs of the logs, kept by the round that collected them."""
        cfg = self.ctx.cfg
        key = cache_key(self.logs_path, self.ctx.pi0_spec, cfg.prm, cfg.update)
        return LogsLogprobs.load(cache_path(self.logs_path), key)

    @staticmethod
    def logs_file(ctx: Context, method: str, round_: int, round0_logs: Path | None = None) -> Path:
        if round_ == 0:
            assert round0_logs is not None
            return round0_logs
        return _round_dir(ctx, method, round_) / LOGS_FILE

    @classmethod
    def load(cls, ctx: Context, method: str, round_: int, round0_logs: Path) -> ArmState:
        """Load the state after round ``round_`` (fresh from disk: the same whether resumed or not)."""
        spec, cfg, dev = METHODS[method], ctx.cfg, ctx.device
        ck = (lambda kind: str(ctx.run.checkpoint_dir(method, round_, kind))) if round_ else None
        policy = load_model(
            ck("policy") if ck else ctx.pi0_spec, role="policy", device=dev, dtype=torch.float32
        )
        prm = None
        if spec.prm:
            prm = (ImplicitPRM.from_dir(ck("prm"), cfg=cfg.prm, device=dev) if ck
                   else ImplicitPRM.load(ctx.pi0_spec, cfg.prm, device=dev))  # fmt: skip
        critic = None
        if spec.needs_critic(cfg.method.estimator):
            if ck and not (head := Path(ck("critic")) / VALUE_HEAD_FILE).is_file():
                raise ModelLoadError(  # without it the critic would load with a fresh head: a silent restart
                    f"{head} is missing: the critic of round {round_} cannot be resumed; restore the file"
                )
            critic = load_model(
                ck("critic") if ck else ctx.pi0_spec, role="value", device=dev, dtype=torch.float32
            )
        q_dir = ck("qvalue") if (ck and spec.q) else None
        return cls(ctx, spec, round_, policy, prm, q_dir, critic,  # type: ignore[arg-type]
                   cls.logs_file(ctx, method, round_, round0_logs))  # fmt: skip

    def buffer(self, round0_logs: Path) -> FitLogs | None:
        """The logs the arm's PRM / Q-model are fitted on (:mod:`itpo_batch.run.buffer`): this state's
        logs, then the earlier rounds', newest first, then the round-0 logs; None for ``scope="round"``
        or an arm without a credit model."""
        cfg = self.ctx.cfg
        if cfg.buffer.scope == "round" or not (self.spec.prm or self.spec.q):
            return None
        paths = [self.logs_file(self.ctx, self.spec.name, r, round0_logs) for r in range(self.round_, -1, -1)]

        def cache(path: Path) -> LogsLogprobs | None:
            key = cache_key(path, self.ctx.pi0_spec, cfg.prm, cfg.update)
            return LogsLogprobs.load(cache_path(path), key)

        return fit_logs(paths, cfg.buffer, cache)

    def step(self, logs: Logs, seeds: ArmSeeds, hook: Callable[[str], None] | None = None,
             fit: FitLogs | None = None) -> StepResult:  # fmt: skip
        """The next round's fit + update; trains ``policy`` (and PRM / critic) in place; ``hook`` hears
        each phase (fitting, updating); ``fit``: the credit model's logs (:meth:`buffer`)."""
        cfg = self.ctx.cfg
        if self.spec.fresh_samples:
            q_cfg = ippo_q_config(cfg.q, self.ctx.pi0_spec, self.q_dir)
            return ippo_arm_step(self.policy, self.ctx.tokenizer, logs, q_cfg, cfg.ippo, seeds,
                                 self.ctx.device, hook=hook, fit=fit)  # fmt: skip
        return log_arm_step(self.spec, self.policy, self.ctx.tokenizer, logs, self.prm, self.ctx.pi0,
                            cfg.method, cfg.update, self.critic, cfg.critic, cfg.prm, seeds=seeds,
                            hook=hook, cached=self.cached_logprobs(), fit=fit)  # fmt: skip


def save_round(ctx: Context, method: str, round_: int, state: ArmState, step: StepResult) -> None:
    """Write the round's checkpoints (policy, PRM, Q, critic), each atomically."""
    run = ctx.run
    with atomic_dir(run.checkpoint_dir(method, round_, "policy")) as tmp:
        state.policy.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
    if step.prm is not None:
        step.prm.save(run.checkpoint_dir(method, round_, "prm"))
    if step.q is not None and step.q_cfg is not None:
        save_q(
            step.q.model,
            step.q.tokenizer,
            step.q_cfg,
            run.checkpoint_dir(method, round_, "qvalue"),
            step.q.metrics,
        )
    if state.critic is not None:
        with atomic_dir(run.checkpoint_dir(method, round_, "critic")) as tmp:
            state.critic.save_pretrained(tmp)


def nested_table(logs: Logs) -> pa.Table:
    """Validated logs back in the nested shape (:func:`itpo_batch.data.schemas.nested_logs_schema`)."""
    msgs = logs.messages.sort("conversation_id", "turn_index").group_by(
        "conversation_id", maintain_order=True
    )
    nested = msgs.agg(
        messages=pl.struct("role", "content"),
        behavior_logprobs=pl.col("behavior_logprobs").filter(pl.col("role") == "assistant"),
    )
    conv = logs.conversations.select("conversation_id", "group_id", "task", "outcome", "oracle_turn_utility",
                                     "metadata")  # fmt: skip
    frame = conv.join(nested, on="conversation_id", how="left", maintain_order="left")
    frame = frame.with_columns(
        behavior_logprobs=pl.when(pl.col("behavior_logprobs").list.eval(pl.element().is_null()).list.all())
        .then(None)
        .otherwise(pl.col("behavior_logprobs"))
    )
    schema = nested_logs_schema()
    return frame.select(schema.names).to_arrow().cast(schema)


def logs_table_from(path: Path) -> pa.Table:
    """The nested logs table stored at ``path`` (written by :func:`itpo_batch.data.io.write_parquet`)."""
    return pq.read_table(path)


def write_round_tables(ctx: Context, method: str, round_: int, logs: Logs, step: StepResult) -> pl.DataFrame:
    """Scored turns, conversations and messages of the logs round ``round_`` consumed; returns the turns.

    Every rank computes them (the alignment metrics come from the turns); rank 0 alone writes them."""
    turns = turns_table(logs, step.turns, None)
    schema = load_schema("turns")
    missing = [pl.lit(None).alias(f.name) for f in schema.fields if f.name not in turns.columns]
    turns = turns.with_columns(missing)
    if not dist.is_main_process():
        return turns
    ctx.run.write_partition("turns", method, round_, canonical_cast(turns, schema).to_arrow())
    per_conv = turns.group_by("conversation_id").agg(
        implicit_reward_total=pl.col("implicit_reward").sum() if "implicit_reward" in step.turns.columns
        else pl.lit(None, dtype=pl.Float64),
        n_tokens=pl.col("n_tokens").sum(),
    )  # fmt: skip
    conv = logs.conversations.join(per_conv, on="conversation_id", how="left").with_columns(
        split=pl.lit("train"), n_tokens=pl.col("n_tokens").fill_null(0)
    )
    conv_schema = load_schema("scored_conversations")
    ctx.run.write_partition("conversations", method, round_, canonical_cast(conv, conv_schema).to_arrow())
    ctx.run.write_partition(
        "messages", method, round_, canonical_cast(logs.messages, load_schema("messages")).to_arrow()
    )
    return turns


__all__ = ["LOGS_FILE", "ArmState", "logs_table_from", "nested_table", "save_round", "write_round_tables"]
