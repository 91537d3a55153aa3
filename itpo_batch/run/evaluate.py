"""Per-round evaluation of a policy for ``itpo-batch iterate``: greedy outcomes, log statistics, KL to π₀.

Design decisions:

- **Fixed evaluation cases.** :class:`EvalConfig` seeds the cases (``seed=10_000``, away from the training
  seeds) and the batch size; both stay fixed across rounds and arms, so every policy plays the same hidden
  cases against the same user noise and differences in ``eval/greedy_*`` come from the policy alone.
  Greedy decoding (``temperature=0``) removes sampling noise; what remains is the spread over cases,
  which the t-interval of the outcome mean reports. Greedy output is deterministic per batch composition
  (kernels round differently for other batch shapes, see :mod:`itpo_batch.model.engine`), hence the fixed
  batch size.
- **An evaluation schedule** (issue 14: evaluation was 38% of an arm-round). ``iterate`` evaluates
  greedy every round and sampled at round 0 and the last round by default (``greedy_every`` = 1,
  ``sampled_every`` = 0; :meth:`EvalConfig.due`): greedy removes sampling noise, so it is the per-round
  curve, and the sampled score (the policy as it is deployed at T = 1) is kept where the headline
  compares π_0 with the final policy. Round 0 and the last round always have both, so the paired Δ to π_0
  of the final policy exists for both. Rounds without an evaluation have no ``eval/…`` key of that kind;
  the report lists which rounds have which, and its plots join the evaluated rounds.
- **Vectorised log statistics.** :func:`logs_stats` works on the nested logs table with polars: one
  ``list.eval`` per statistic over the messages and one ``json_decode`` of the metadata column, no Python
  loop over rows or messages. A word is a maximal run of non-whitespace (regex ``\\S+``, i.e.
  ``str.split()``). ``success``/``score`` average the rows whose metadata has the key (null elsewhere);
  NaN when no row has it or the column is absent.
- **KL to the reference.** :func:`kl_to_reference` is a Monte-Carlo estimate over the assistant tokens of
  conversations sampled from π (token-weighted mean over all of them): k1 = log π − log π_ref (unbiased,
  can be negative on a finite sample) and k3 = exp(d) − d − 1 with d = log π_ref − log π (unbiased for
  KL(π‖π_ref) too, never negative, lower variance; http://joschu.net/blog/kl-approx.html). The estimate is
  only a KL when the conversations were *sampled* from π at temperature 1 (the training rollouts, not the
  greedy evaluation ones). Tokens come from re-rendering the text, so the template's end-of-turn token of a
  turn cut at ``max_new_tokens`` is scored although π never sampled it (a small bias, as in the PRM).
  Both models run in eval mode under ``no_grad``; sums are float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.model.generation import eval_mode
from itpo_batch.model.logprobs import assistant_token_logprobs
from itpo_batch.model.packing import pack
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.run.intervals import mean_ci
from itpo_batch.sim.envs.base import Task
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, rollout
from itpo_batch.sim.users import User

_META_DTYPE = pl.Struct({"success": pl.Boolean, "score": pl.Float64})
NAN = float("nan")


def _mean(series: pl.Series) -> float:
    """Mean of the non-null values, NaN when there are none."""
    value = series.cast(pl.Float64).mean()
    return NAN if value is None else float(value)  # type: ignore[arg-type]


def logs_stats(table: pa.Table, prefix: str = "eval/") -> dict[str, float]:
    """Outcome mean and 95% CI, success rate, score, assistant turns and words per conversation, count.

    ``table`` is a nested logs table (:func:`itpo_batch.data.schemas.nested_logs_schema`; only ``messages``,
    ``outcome`` and, if present, ``metadata`` are read). Keys are ``{prefix}outcome_mean``,
    ``…outcome_ci_low``, ``…outcome_ci_high``, ``…success``, ``…score``, ``…turns``, ``…words``, ``…n``.
    """
    has_meta = "metadata" in table.column_names
    df = pl.from_arrow(table.select(["messages", "outcome"] + (["metadata"] if has_meta else [])))
    assert isinstance(df, pl.DataFrame)
    is_asst = pl.element().struct.field("role") == "assistant"
    n_words = pl.element().struct.field("content").str.count_matches(r"\S+")
    per_conv = df.select(
        turns=pl.col("messages").list.eval(is_asst.cast(pl.Int64)).list.sum(),
        words=pl.col("messages").list.eval(pl.when(is_asst).then(n_words).otherwise(0)).list.sum(),
    )
    mean, low, high = mean_ci(df["outcome"].drop_nulls().to_numpy())
    success = score = NAN
    if has_meta:
        meta = df.select(pl.col("metadata").str.json_decode(_META_DTYPE)).unnest("metadata")
        success, score = _mean(meta["success"]), _mean(meta["score"])
    stats = {
        "outcome_mean": mean,
        "outcome_ci_low": low,
        "outcome_ci_high": high,
        "success": success,
        "score": score,
        "turns": _mean(per_conv["turns"]),
        "words": _mean(per_conv["words"]),
        "n": float(df.height),
    }
    return {f"{prefix}{k}": v for k, v in stats.items()}


@dataclass
class EvalConfig:
    """Greedy evaluation of a policy, identical across rounds and arms."""

    n: int = 64
    "Greedy evaluation conversations."
    group_size: int = 1
    "Conversations per hidden case (members differ only by user noise under greedy decoding)."
    seed: int = 10_000
    "Seeds the evaluation cases; fixed across rounds and arms so every policy meets the same cases."
    max_new_tokens: int = 96
    "Most tokens per assistant turn."
    batch_size: int = 32
    "Conversations generated together (keep fixed: greedy output depends on the batch composition)."
    progress: bool = False
    "Show a progress bar on stderr."
    sampled_every: int = 0
    "iterate: sampled (T=1) evaluation every k rounds; 0: round 0 and the last round only."
    greedy_every: int = 1
    "iterate: greedy evaluation every k rounds; 0: round 0 and the last round only."

    def __post_init__(self) -> None:
        if self.sampled_every < 0 or self.greedy_every < 0:
            raise ValueError("eval.sampled_every and eval.greedy_every must be >= 0")

    def due(self, temperature: float, round_: int, last: int) -> bool:
        """Whether ``iterate`` evaluates at ``temperature`` (> 0: sampled, 0: greedy) at ``round_`` of
        ``last``: always at round 0 and the last round, in between every ``sampled_every`` /
        ``greedy_every`` rounds."""
        every = self.sampled_every if temperature > 0 else self.greedy_every
        return round_ == 0 or round_ >= last or (every > 0 and round_ % every == 0)

    def rollout_config(self) -> RolloutConfig:
        """The greedy (temperature 0) rollout settings."""
        return RolloutConfig(
            n=self.n,
            group_size=self.group_size,
            seed=self.seed,
            temperature=0.0,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )


def greedy_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: EvalConfig,
    user: User | None = None,
) -> tuple[pa.Table, dict[str, float]]:
    """Roll out ``cfg.n`` greedy conversations of ``task``: (nested logs, ``logs_stats(…, "eval/greedy_")``).

    The model runs in eval mode and gets its training flag back afterwards. ``user`` defaults to the rule
    user of :func:`~itpo_batch.sim.rollout.rollout`; pass the training user to evaluate against it.
    """
    table = eval_rollout(model, tokenizer, task, cfg, temperature=0.0, user=user)
    return table, logs_stats(table, "eval/greedy_")


def eval_rollout(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: EvalConfig,
    temperature: float,
    user: User | None = None,
) -> pa.Table:
    """``cfg.n`` conversations of ``task`` on the fixed evaluation cases at ``temperature`` (eval mode)."""
    rcfg = dataclasses.replace(cfg.rollout_config(), temperature=temperature)
    with eval_mode(model):
        return rollout(task, HFPolicy(model, tokenizer, rcfg), rcfg, user=user, progress=cfg.progress)


def kl_to_reference(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Sequence[dict[str, str]]],
    batch_tokens: int = 2048,
    prefix: str = "policy/kl_pi0",
    render_config: RenderConfig | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Per-token KL(π‖π_ref) estimates on ``chats`` (sampled from π): ``{prefix: k1, prefix + "_k3": k3}``.

    Conversations are rendered (``render_config`` defaults to truncation at the tokenizer's context, so long
    conversations keep their leading turns), packed into ``batch_tokens`` buffers and scored by both
    models. ``reference`` may be ``policy`` itself (both estimates are then exactly 0). NaN when no
    assistant token is left.
    """
    rendered = render(chats, tokenizer, render_config or RenderConfig(overflow="truncate")).conversations
    sums, n_tokens = [], 0
    with torch.no_grad(), eval_mode(policy), eval_mode(reference):
        for batch in pack(rendered, batch_tokens) if rendered else []:
            logp = assistant_token_logprobs(policy, batch, chunk_size).double()
            ref = assistant_token_logprobs(reference, batch, chunk_size).to(logp.device, torch.float64)
            d = ref - logp
            sums.append(torch.stack([-d.sum(), (torch.expm1(d) - d).sum()]))
            n_tokens += int(batch.assistant_mask.sum())
    if n_tokens == 0:
        return {prefix: NAN, f"{prefix}_k3": NAN}
    k1, k3 = (torch.stack(sums).sum(0) / n_tokens).tolist()
    return {prefix: k1, f"{prefix}_k3": k3}
