"""One round of one arm: fit the arm's signals on its logs, compute advantages, update the policy in place.

:func:`log_arm_step` serves the log-based arms (``itpo``, ``itpo_norm``, ``outcome``, ``prime``):
(warm-started) implicit PRM fit on the logs → token rewards → padded credit batch → advantages
(:mod:`itpo_batch.rl.methods`) → flat ``[A]`` layout → :func:`itpo_batch.rl.update.update_policy`, with the KL
reference π_0 taken from the PRM dataset's cached reference forward (the outcome arm runs that reference
forward alone). With the log-probs that the round which collected the logs kept beside them
(:mod:`itpo_batch.run.logprob_cache`), neither π_0 nor the policy runs before the update: π_0's
log-probs and the old log-probs come from that file (issue 14: one π_0 forward per round). With
``--estimator ppo`` the critic's values feed GAE, then the critic is fitted on the returns.
:func:`ippo_arm_step` fits the turn Q-model (warm-started) and runs :func:`itpo_batch.rl.ippo.iterative_ppo_step`.

Both return a :class:`StepResult`: the arm's fitted models (the caller saves them), the scored-turns frame
of the logs the update consumed (one row per assistant turn, with the advantage that the update used,
averaged over the turn's tokens) and ``prm/…``, ``q/…``, ``update/…`` metrics.

NaN cannot spread: the PRM and Q fits and predictions, the credit (:func:`itpo_batch.rl.methods.advantages`)
and the update check their own numbers; this module adds the critic's loss. Each
raises :class:`~itpo_batch.core.errors.NonFiniteError` before the caller has saved anything of the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from itpo_batch.core.errors import NonFiniteError
from itpo_batch.core.seeds import derived_seed
from itpo_batch.credit.prm import ImplicitPRM, PRMConfig
from itpo_batch.credit.prm_data import PRMDataset
from itpo_batch.credit.qfit import QResult, fit_q
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.credit.turns import segment_turns, turn_mean
from itpo_batch.data.validate import Logs
from itpo_batch.model.packing import pad
from itpo_batch.rl.critic import CriticConfig, critic_values, fit_critic
from itpo_batch.rl.estimators import group_index_from_ids
from itpo_batch.rl.ippo import IPPOConfig, iterative_ppo_step
from itpo_batch.rl.methods import CreditBatch, MethodConfig, MethodSpec, advantages
from itpo_batch.rl.update import UpdateConfig, UpdateData, behaviour_logprobs, retokenized, update_policy
from itpo_batch.run.buffer import FitLogs
from itpo_batch.run.logprob_cache import LogsLogprobs, reference_dataset


@dataclass(frozen=True)
class ArmSeeds:
    """Every seed of one arm-round, one per random stream: ``derived_seed(run seed, method, round, stream)``.

    The one place an arm-round's seeds come from (:mod:`itpo_batch.core.seeds`); the stage configs
    (PRM, Q, critic, update) hold no seed of their own, so nothing set in a config can be silently
    overwritten. Rollouts are seeded per round only (``derived_seed(seed, "rollout", round)``), so every
    arm plays the same cases.
    """

    torch: int  # torch's global generator (initialisations, dropout)
    prm: int  # the implicit PRM's epoch shuffles
    q: int  # the turn Q-model's hold-out split, shuffles and head initialisation
    critic: int  # the critic's shuffles
    update: int  # the policy update's mini-batch shuffles
    ippo: int  # Iterative PPO: state subsample, fresh samples, its update

    @classmethod
    def of(cls, seed: int, method: str, round_: int) -> ArmSeeds:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: derived_seed(seed, method, round_, n) for n in names})


@dataclass
class StepResult:
    """What one arm-round produced."""

    turns: pl.DataFrame  # conversation_id, turn, n_tokens, advantage, turn_reward (+ PRM / Q columns)
    metrics: dict[str, Any]
    prm: ImplicitPRM | None = None
    q: QResult | None = None
    q_cfg: QConfig | None = None  # the settings q was fitted with (saved beside it)
    extra: dict[str, Any] = field(default_factory=dict)


def _quiet(_phase: str) -> None:
    """The default phase hook: say nothing."""


def _padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = flat.float().cpu()
    return out


def _turn_frame(data: PRMDataset, seg_mask: torch.Tensor, adv: torch.Tensor, per_turn: torch.Tensor | None
                ) -> pl.DataFrame:  # fmt: skip
    """Per assistant turn of ``data``: n_tokens, the mean advantage of its tokens and its turn reward."""
    seg = segment_turns(seg_mask)
    mean_adv = turn_mean(adv, seg)
    rows, cols = seg.valid.nonzero(as_tuple=True)
    ids = np.asarray(data.conversation_ids, dtype=object)[rows.numpy()].astype(str)
    frame = {
        "conversation_id": ids,
        "turn": cols.numpy().astype(np.int32),
        "n_tokens": seg.lengths[rows, cols].numpy().astype(np.int32),
        "advantage": mean_adv[rows, cols].double().numpy(),
    }
    if per_turn is not None and per_turn.shape == seg.valid.shape:
        frame["turn_reward"] = per_turn[rows, cols].double().numpy()
    return pl.DataFrame(frame)


def log_arm_step(
    spec: MethodSpec,
    policy: nn.Module,
    tokenizer: Any,
    logs: Logs,
    prm: ImplicitPRM | None,
    pi0: nn.Module,
    cfg: MethodConfig,
    update_cfg: UpdateConfig,
    critic: nn.Module | None = None,
    critic_cfg: CriticConfig | None = None,
    prm_cfg: PRMConfig | None = None,
    *,
    seeds: ArmSeeds,
    hook: Callable[[str], None] | None = None,
    cached: LogsLogprobs | None = None,
    fit: FitLogs | None = None,
) -> StepResult:
    """One round of a log-based arm (see the module docstring); trains ``policy`` (and the PRM) in place.

    ``prm_cfg`` gives the render and buffer settings of the π_0 reference forward of arms without a PRM
    (arms with one use their PRM's). ``hook`` hears each phase. ``cached``: π_0's and the collecting
    policy's log-probs of ``logs`` (:mod:`itpo_batch.run.logprob_cache`), which spare the π_0 forward and
    the old-log-prob recompute. ``fit``: the logs the PRM is fitted on (the arm's buffer,
    :mod:`itpo_batch.run.buffer`); None fits it on ``logs``. The PRM scores ``logs`` either way.
    """
    hook = hook or _quiet
    metrics: dict[str, Any] = {}
    ref_logp = None if cached is None else cached.ref_logp
    hook("reference forward")  # π_0 on the logs, unless ``cached`` has it
    if spec.prm:
        assert prm is not None, f"method {spec.name} needs a PRM"
        data = prm.prepare_logs(logs, ref_logp=ref_logp)
        hook("fitting PRM")
        if fit is None:
            metrics |= prm.fit(data, seed=seeds.prm)["metrics"]
        else:
            train = prm.prepare_logs(fit.train, ref_logp=fit.train_ref)
            held = None if fit.holdout is None else prm.prepare_logs(fit.holdout, ref_logp=fit.holdout_ref)
            metrics |= prm.fit(train, held, seed=seeds.prm)["metrics"] | fit.metrics()
        scores = prm.score(data)
    else:
        data, scores = reference_dataset(pi0, tokenizer, logs, prm_cfg or PRMConfig(), ref_logp), None
    if cached is not None and not cached.fits(data):
        raise AssertionError("cached log-probs describe other conversations than the logs rendered here")
    _, _, mask, _ = pad(data.rendered, 0)
    groups = data.groups if data.groups is not None else np.zeros(len(data), dtype=object)
    batch = CreditBatch(
        assistant_mask=mask,
        outcome=data.outcomes.float(),
        group_index=group_index_from_ids([str(g) for g in groups]),
        token_rewards=None if scores is None else _padded(scores.token_rewards, mask),
        mean_length=data.mean_turn_length(),
        tau=(prm.cfg if prm is not None else prm_cfg or PRMConfig()).tau,
    )
    if spec.needs_critic(cfg.estimator):
        assert critic is not None and critic_cfg is not None, "estimator ppo needs a critic"
        batch.values = _padded(critic_values(critic, data.rendered, critic_cfg.batch_tokens), mask)
    adv, ret, per_turn = advantages(spec, batch, cfg)
    adv_flat, ret_flat = adv[mask], ret[mask]
    hook("old log-probs")  # the behaviour log-probs, the policy's forward where they miss, or ``cached``
    if cached is not None and update_cfg.temperature == 1.0:  # the collecting policy's, at T = 1
        old, n_logged = cached.policy_logp, cached.logged
    else:
        untrusted = retokenized(logs.conversations)
        old, n_logged = behaviour_logprobs(
            policy, data.rendered, data.conversation_ids, logs.messages, update_cfg, untrusted
        )
    hook("updating policy")
    update = UpdateData(data.rendered, adv_flat, old, data.offsets.cpu(), data.ref_logp.cpu())
    metrics |= update_policy(policy, update, update_cfg, seed=seeds.update)
    metrics["update/behavior_logprobs_used"] = n_logged / max(len(data), 1)
    if spec.needs_critic(cfg.estimator):
        hook("fitting critic")
        metrics |= fit_critic(critic, data.rendered, ret_flat, critic_cfg, seed=seeds.critic)  # type: ignore[arg-type]
        NonFiniteError.check("critic loss after its fit", metrics["critic/loss"])
    turns = _turn_frame(data, mask, adv, None if spec.token_level else per_turn)
    if scores is not None:
        prm_cols = scores.turns.drop("conv_index", "n_tokens")
        turns = turns.join(prm_cols, on=["conversation_id", "turn"], how="left")
    return StepResult(turns, metrics, prm=prm)


def ippo_arm_step(
    policy: nn.Module,
    tokenizer: Any,
    logs: Logs,
    q_cfg: QConfig,
    ippo_cfg: IPPOConfig,
    seeds: ArmSeeds,
    device: torch.device,
    hook: Callable[[str], None] | None = None,
    fit: FitLogs | None = None,
) -> StepResult:
    """Fit Q (Monte-Carlo regression) on ``fit`` (the arm's buffer; None: on ``logs``), then single-turn
    PPO at the states of ``logs`` with Q as reward."""
    hook = hook or _quiet
    hook("fitting Q")
    q = fit_q(logs if fit is None else fit.all, q_cfg, device=device, seed=seeds.q)
    metrics: dict[str, Any] = dict(q.metrics) | ({} if fit is None else fit.metrics())
    q.model.eval()
    hook("updating policy")
    result = iterative_ppo_step(policy, tokenizer, q.model, q_cfg, logs, ippo_cfg, seeds.ippo)
    metrics |= result.metrics
    pred = q.predictions.select("conversation_id", pl.col("turn").cast(pl.Int32), "q_value", "mc_return")
    if fit is not None:  # the round's conversations only: the tables describe the logs the update consumed
        pred = pred.filter(pl.col("conversation_id").is_in(logs.conversations["conversation_id"].implode()))
    return StepResult(pred, metrics, q=q, q_cfg=q_cfg, extra={"samples": result.samples})


def ippo_q_config(base: QConfig, pi0_spec: str, previous: str | None) -> QConfig:
    """Round's Q settings: warm start from the previous round's Q, else a fresh head on ``q.model``
    (default: π_0, docs/method.md §6.3). The spec is passed down as configured, never overwritten."""
    return dataclasses.replace(base, model=base.model or pi0_spec, warm_start=previous)
