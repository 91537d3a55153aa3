"""One round's policy step of Iterative PPO: single-turn PPO at logged states, with the fitted Q as reward.

Iterative PPO (Jiang et al. 2025, arXiv 2511.21638; docs/method.md §7.1, §7.2) alternates Monte-Carlo
policy evaluation (:mod:`itpo_batch.credit.qvalue`) with ordinary single-turn RLHF whose prompts are the logged
states and whose reward model is ``Q_{k-1}``. :func:`iterative_ppo_step` is that second phase.

Design decisions (the paper fixes none of them; docs/method.md §7.2 unless marked *deviation*):

- **States.** Every assistant turn ``t`` of every logged conversation gives one state: the messages
  before it (normally ending with the user's message), all turns and not only first ones, because
  Theorem 1 needs improvement in every visited state. *Deviation:* a seeded subsample without replacement
  of ``max_states`` states per round (kept in log order: conversation order, then turn) bounds the cost.
- **Samples.** ``K = samples_per_state`` fresh replies per state from the policy as passed in
  (``π_{k-1}``), via the rollout engine (:func:`itpo_batch.model.engine.generate`: one call for all
  prompts, ``gen_batch_size`` rows decoded together, a finished reply's row taken by the next prompt at
  once), seeded with ``derived_seed(seed, "samples", 0)``, so samples are a function of (model, seed,
  ``gen_batch_size``). The state subsample and the update's shuffles take ``derived_seed(seed, "states")``
  and ``derived_seed(seed, "update")`` (:mod:`itpo_batch.core.seeds`: one derivation for every stream). A reply that decodes to whitespace is played as ``empty_reply``, exactly as
  :mod:`itpo_batch.sim.rollout` logs it (so it is trained on like any logged ``"..."``).
- **Reward.** The frozen ``Q_{k-1}(s, a)`` read at the end token of the fresh reply (where
  :mod:`itpo_batch.credit.qvalue` reads every turn), i.e. a reward model at EOS. ``q_model`` must share the
  policy's tokenizer (docs/method.md §6.2: Q starts from ``π_i`` or the SFT model); the chats are rendered with it.
- **Rendering.** State + reply is rendered once with ``overflow="drop"`` (``truncate`` would cut the fresh
  reply itself) and ``max_length`` = the tighter of the tokenizer's context and ``q_cfg.max_length``, so
  the Q model (same tokenizer) keeps every sample the policy keeps: a sample is dropped from both or from
  neither (``kept`` in the samples frame). :func:`only_last_turn` masks everything but the fresh reply:
  earlier logged assistant turns are context, never trained.
- **Advantages.** Group = state (its ``K`` samples); the outcome-only signal goes in ``last_turn_reward``
  with zero turn rewards, through :func:`itpo_batch.rl.estimators.estimate` (``grpo`` | ``rloo`` |
  ``rloo_once``; whitening as ``whiten``). ``ppo`` is rejected: it needs a token critic, which the group
  baselines remove (Theorem 1 admits group methods, docs/method.md §7.1). Groups shrunk to one by drops get baseline 0.
  ``grpo`` divides by the group's Q spread, so a nearly flat Q still gives unit-size advantages (noise
  amplified); ``rloo``/``rloo_once`` keep Q's scale.
- **Old log-probs are recomputed** with the policy before the update rather than taken from generation:
  re-tokenising the decoded text need not give the generated ids (byte-level merges, the ``empty_reply``
  substitute, the template's end token after a reply cut at ``max_new_tokens``), so the ratios start at
  exactly 1 on the tokens actually trained.
- **KL anchor** ``ref_logp = old_logp``: the previous round's policy ``π_{k-1}`` (Theorem 2), not
  ``π_0`` as in ITPO; k3 penalty ``kl_coef`` plus the ``kl_budget`` early stop of :func:`update_policy`.
  The :class:`UpdateConfig` in ``update`` is used with ``loss.kl_coef``, ``kl_budget``, ``temperature``
  (the sampling temperature, so log-probs describe the sampling distribution) and ``seed`` overridden.
- **Truncated replies** (*deviation*, as in the rollout logs): a reply without eos within
  ``max_new_tokens`` is rendered with the template's end token, so the policy is trained to stop there;
  ``ippo/stopped_frac`` reports how often replies ended on their own.
- **Determinism.** The same seed on copies of the same model gives identical samples and metrics, apart
  from the ``…seconds`` timings. The policy is trained in place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError
from itpo_batch.core.seeds import derived_seed
from itpo_batch.credit.qvalue import QConfig, build_data, predict
from itpo_batch.credit.turns import segment_turns
from itpo_batch.data.validate import Logs
from itpo_batch.model.engine import generate
from itpo_batch.model.generation import Generation, SamplingConfig, eval_mode
from itpo_batch.model.packing import pad
from itpo_batch.model.render import RenderConfig, render, resolve_max_length
from itpo_batch.rl.estimators import ESTIMATORS, EstimatorConfig, EstimatorInputs, estimate
from itpo_batch.rl.update import (
    UpdateConfig,
    UpdateData,
    flat_offsets,
    only_last_turn,
    recompute_logprobs,
    update_policy,
)

Chat = list[dict[str, str]]
GROUP_ESTIMATORS = tuple(sorted(n for n, e in ESTIMATORS.items() if not e.needs_critic))


@dataclass
class IPPOConfig:
    """Knobs of one Iterative PPO policy step (docs/method.md §7.2 defaults where it gives them)."""

    samples_per_state: int = 4
    "K fresh responses per logged state: the group of GRPO/RLOO (docs/method.md §7.2: K >= 4)."
    max_states: int | None = 256
    "Logged states used per round (seeded subsample of all assistant turns); None = all."
    estimator: str = "grpo"
    "Group estimator over the K samples of a state: grpo | rloo | rloo_once (ppo needs a critic)."
    whiten: bool = True
    "Whiten the advantages over the round's trained tokens (EstimatorConfig.whiten)."
    kl_coef: float = 0.05
    "k3 KL penalty to the previous round's policy (docs/method.md §7.2: 0.01-0.05); overrides update.loss.kl_coef."
    kl_budget: float | None = 0.05
    "Stop the update once KL(pi_theta || pi_{k-1}) per token exceeds this; overrides update.kl_budget."
    temperature: float = 1.0
    "Sampling temperature (> 0: K greedy samples would be identical); also the update's temperature."
    max_new_tokens: int = 96
    "Most tokens per fresh response."
    gen_batch_size: int = 64
    "Rows the rollout engine decodes together."
    empty_reply: str = "..."
    "Played (and trained) instead of a reply that decodes to whitespace, as in rollouts."
    update: UpdateConfig = field(default_factory=UpdateConfig)
    "The policy update; its loss.kl_coef, kl_budget and temperature are overridden."

    def __post_init__(self) -> None:
        if self.estimator not in GROUP_ESTIMATORS:
            raise ItpoError(
                f"estimator {self.estimator!r} is not supported by Iterative PPO; use one of "
                f"{', '.join(GROUP_ESTIMATORS)} (group baselines over the K samples replace the critic)"
            )
        if self.samples_per_state < 1 or self.gen_batch_size < 1 or self.max_new_tokens < 1:
            raise ItpoError("samples_per_state, gen_batch_size and max_new_tokens must be at least 1")
        if self.max_states is not None and self.max_states < 1:
            raise ItpoError(f"max_states must be at least 1 or None, got {self.max_states}")
        if self.temperature <= 0:
            raise ItpoError("temperature must be > 0: the K greedy samples of a state would be identical")
        if not self.empty_reply.strip():
            raise ItpoError("empty_reply must not be blank")


@dataclass
class IPPOResult:
    """What :func:`iterative_ppo_step` produced."""

    metrics: dict[str, float]  # 'ippo/…' and 'update/…'
    samples: pl.DataFrame  # one row per fresh sample, see iterative_ppo_step


def logged_states(logs: Logs, max_states: int | None, seed: int) -> tuple[list[Chat], pl.DataFrame]:
    """``(states, frame)``: the messages before each assistant turn and ``conversation_id``, ``turn``.

    All assistant turns in log order, or a seeded subsample of ``max_states`` of them (log order kept).
    """
    conv = logs.conversations.select("conversation_id").with_row_index("conv_pos")
    turns = (
        logs.messages.select("conversation_id", "assistant_turn")
        .with_columns(pos=pl.int_range(pl.len()).over("conversation_id"))  # index in Logs.chats()
        .filter(pl.col("assistant_turn").is_not_null())
        .join(conv, on="conversation_id")
        .sort("conv_pos", "pos")
    )
    if max_states is not None and turns.height > max_states:
        pick = np.sort(np.random.default_rng(seed).choice(turns.height, size=max_states, replace=False))
        turns = turns[pick]
    chats = logs.chats()
    states = [chats[c][:p] for c, p in zip(turns["conv_pos"], turns["pos"], strict=True)]
    frame = turns.select("conversation_id", pl.col("assistant_turn").cast(pl.Int32).alias("turn"))
    return states, frame


def q_rewards(
    q_model: nn.Module,
    q_cfg: QConfig,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    ids: Sequence[str],
) -> torch.Tensor:
    """``Q(s, a)`` at the last assistant turn of each chat, float32 ``[n]``; ItpoError if one does not fit."""
    data = build_data(chats, [0.0] * len(chats), ids, tokenizer, dataclasses.replace(q_cfg, overflow="drop"))
    if len(data.rendered) != len(chats):
        kept = {r.index for r in data.rendered}
        missing = [ids[i] for i in range(len(chats)) if i not in kept]
        raise ItpoError(f"{len(missing)} chats do not fit the Q model's context (e.g. {missing[:5]})")
    pred = predict(q_model, data, q_cfg)  # sorted by (conversation_index, turn)
    last = pred.group_by("conversation_index", maintain_order=True).agg(pl.col("q_value").last())
    return torch.from_numpy(last["q_value"].to_numpy().astype(np.float32))


def _max_length(tokenizer: PreTrainedTokenizerBase, q_cfg: QConfig) -> int | None:
    """The tighter of the policy's and the Q model's context, so Q never drops what the policy kept."""
    limits = [n for n in (resolve_max_length(RenderConfig(), tokenizer), q_cfg.max_length) if n is not None]
    return min(limits) if limits else None


def _sample(
    policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Chat], cfg: IPPOConfig, seed: int
) -> list[Generation]:
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    seed = derived_seed(seed, "samples", 0)
    return generate(policy, tokenizer, prompts, sampling, seed, width=cfg.gen_batch_size)


def _advantages(
    rendered: list, q: torch.Tensor, group: torch.Tensor, cfg: IPPOConfig, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat [A] advantages in conversation order, per-sample token mean [n])`` of the last-turn rows."""
    mask = pad(rendered, pad_id)[2]
    seg = segment_turns(mask)
    inputs = EstimatorInputs(torch.zeros(seg.shape), seg, mask, group, last_turn_reward=q.double())
    adv, _ = estimate(cfg.estimator, inputs, EstimatorConfig(whiten=cfg.whiten))
    per_sample = adv.sum(1) / mask.sum(1).clamp_min(1)
    return adv[mask].float(), per_sample.float()


def _update_config(cfg: IPPOConfig) -> UpdateConfig:
    loss = dataclasses.replace(cfg.update.loss, kl_coef=cfg.kl_coef)
    return dataclasses.replace(cfg.update, loss=loss, kl_budget=cfg.kl_budget, temperature=cfg.temperature)


def _fresh_samples(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    states: list[Chat],
    frame: pl.DataFrame,
    cfg: IPPOConfig,
    seed: int,
) -> tuple[pl.DataFrame, list[Chat]]:
    """K replies per state: the samples frame (no Q yet) and the chats state + reply, state-major."""
    k = cfg.samples_per_state
    prompts = [s for s in states for _ in range(k)]
    gens = _sample(policy, tokenizer, prompts, cfg, seed)
    empty = [not g.text.strip() for g in gens]
    replies = [cfg.empty_reply if e else g.text for g, e in zip(gens, empty, strict=True)]
    samples = frame.with_columns(
        state_id=pl.format("{}:{}", "conversation_id", "turn"), group=pl.int_range(pl.len(), dtype=pl.Int64)
    )[np.repeat(np.arange(len(states)), k)].with_columns(
        sample=pl.Series(np.tile(np.arange(k, dtype=np.int32), len(states))),
        response=pl.Series(replies, dtype=pl.String),
        n_tokens=pl.Series([len(g.token_ids) for g in gens], dtype=pl.Int32),
        stopped=pl.Series([g.stopped for g in gens], dtype=pl.Boolean),
        empty=pl.Series(empty, dtype=pl.Boolean),
    )
    chats = [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies, strict=True)]
    return samples, chats


def _metrics(samples: pl.DataFrame, q: torch.Tensor, adv_flat: torch.Tensor) -> dict[str, float]:
    """``ippo/…`` metrics; Q statistics over kept samples. ``q_group_std`` is the mean within-state spread
    (0: no learning signal); ``reward_mean`` equals ``q_mean`` (the PPO reward *is* Q), for RLHF dashboards."""
    kept = samples.filter(pl.col("kept"))
    group_std = kept.group_by("group", maintain_order=True).agg(pl.col("q_value").std(ddof=0))["q_value"]
    q = q.double()
    return {
        "ippo/states": samples["group"].n_unique(),
        "ippo/samples": samples.height,
        "ippo/kept": kept.height,
        "ippo/dropped": samples.height - kept.height,
        "ippo/empty_replies": int(samples["empty"].sum()),
        "ippo/stopped_frac": float(samples["stopped"].mean()),
        "ippo/response_tokens": float(samples["n_tokens"].mean()),
        "ippo/q_mean": float(q.mean()),
        "ippo/q_std": float(q.std(unbiased=False)),
        "ippo/q_group_std": float(group_std.mean() or 0.0),
        "ippo/reward_mean": float(q.mean()),
        "ippo/advantage_abs_mean": float(adv_flat.abs().mean()),
    }


def iterative_ppo_step(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    q_model: nn.Module,
    q_cfg: QConfig,
    logs: Logs,
    cfg: IPPOConfig,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> IPPOResult:
    """Sample K replies per logged state, reward them with Q, train ``policy`` in place (module docstring).

    ``samples`` columns: ``conversation_id``, ``turn``, ``state_id`` (``conversation_id:turn``), ``group``
    (state index), ``sample``, ``response`` (as played), ``n_tokens`` (generated), ``stopped``, ``empty``,
    ``kept``, ``q_value`` and ``advantage`` (mean over its tokens), both null where not kept.
    """
    t0 = time.perf_counter()
    states, frame = logged_states(logs, cfg.max_states, derived_seed(seed, "states"))
    if not states:
        raise ItpoError("the logs have no assistant turn, so there is no state to train on")
    samples, chats = _fresh_samples(policy, tokenizer, states, frame, cfg, seed)
    t_gen = time.perf_counter()
    ids = [f"{s}#{j}" for s, j in zip(samples["state_id"], samples["sample"], strict=True)]
    result = render(chats, tokenizer, RenderConfig(_max_length(tokenizer, q_cfg), overflow="drop"), ids)
    if not result.conversations:
        raise ItpoError("no fresh sample fits the policy's and the Q model's context")
    rows = [r.index for r in result.conversations]
    q = q_rewards(q_model, q_cfg, tokenizer, [chats[i] for i in rows], [ids[i] for i in rows])
    t_q = time.perf_counter()
    rendered = [only_last_turn(r) for r in result.conversations]
    group = torch.from_numpy(samples["group"].to_numpy()[rows])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    adv_flat, adv_sample = _advantages(rendered, q, group, cfg, pad_id)

    upd = _update_config(cfg)
    with eval_mode(policy):  # π_{k-1}: the old policy of the ratios and the KL anchor
        old = recompute_logprobs(policy, rendered, upd.batch_tokens, upd.temperature, upd.chunk_size)
    t_old = time.perf_counter()
    data = UpdateData(rendered, adv_flat, old, flat_offsets(rendered), ref_logp=old)
    update_metrics = update_policy(policy, data, upd, on_step, seed=derived_seed(seed, "update"))

    q_all, advantage = torch.full((2, len(chats)), float("nan")).unbind(0)
    q_all[rows], advantage[rows] = q, adv_sample
    samples = samples.with_columns(
        kept=pl.Series(~np.isnan(q_all.numpy())),
        q_value=pl.Series(q_all.numpy()).fill_nan(None),
        advantage=pl.Series(advantage.numpy()).fill_nan(None),
    )
    timings = {
        "ippo/gen_seconds": t_gen - t0,
        "ippo/q_seconds": t_q - t_gen,
        "ippo/logp_seconds": t_old - t_q,
        "ippo/seconds": time.perf_counter() - t0,
    }
    return IPPOResult(_metrics(samples, q, adv_flat) | timings | update_metrics, samples)
