"""Methods (arms) of ``iterate``: which signals an arm fits each round and how it turns them into advantages.

One registry (:data:`METHODS`); each :class:`MethodSpec` says what the arm fits (implicit PRM, turn Q,
critic) and, for the log-based arms, how turn rewards are built (:func:`advantages`). Coefficients are the
official scripts' for the medical task (docs/method.md §3.5) and only their ratio matters once advantages are
whitened; every one can be overridden in :class:`MethodConfig`.

- ``itpo``: turn reward ``dpo · S_k`` (sum of the turn's normalised implicit token rewards) at every turn
  end, plus ``gt · outcome`` on the last turn (medical ITPO: dpo 5, gt 5; math/doc use gt 0).
- ``itpo_norm``: ``dpo · outcome · p_k`` (Norm-ITPO proportions, they sum to the outcome), gt 0 (all scripts).
- ``outcome``: the paper's baseline, the same estimator on ``gt · outcome`` at the last assistant turn only.
- ``prime``: PRIME's token-level rewards (docs/method.md §3.4): ``dpo · r_t`` on *every* assistant token plus
  ``gt · outcome`` at the last one. Implemented by **spreading** the mask (assistant tokens on even columns
  of a ``[B, 2L]`` layout), so every token is its own "turn" and the turn-grid estimators run unchanged:
  masked RLOO then subtracts the per-row mean token reward of the others at every token, exactly the
  official ``else`` branch, and returns are suffix sums over tokens.
- ``iterative_ppo``: no log-based advantages; :mod:`itpo_batch.rl.ippo` runs single-turn PPO at the logged
  states with the fitted turn Q as reward.

The estimator (``rloo``, ``rloo_once``, ``grpo``, ``ppo``) is shared by the log-based arms; ``ppo`` needs
critic values ``[B, L]`` (:mod:`itpo_batch.rl.critic`). The word-count cost is already inside the logged
outcome (:mod:`itpo_batch.sim.envs.base`), so no separate ``token_amount`` component is added
(docs/method.md §3.5: the official code counts it twice in medical ITPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from itpo_batch.core.errors import ItpoError, NonFiniteError
from itpo_batch.credit.turns import DEFAULT_TAU, TurnRewardInputs, segment_turns, turn_rewards, turn_sum
from itpo_batch.rl.estimators import ESTIMATORS, EstimatorConfig, EstimatorInputs, estimate, get_estimator


@dataclass(frozen=True)
class MethodSpec:
    """What an arm needs each round."""

    name: str
    prm: bool  # fits the implicit PRM (warm-started round to round)
    q: bool  # fits the turn Q-model
    turn_reward: str | None  # credit.turn_rewards name for the per-turn component (None: no such term)
    dpo_coef: float  # weight of the implicit-reward term
    gt_coef: float  # weight of the outcome on the last assistant turn
    token_level: bool = False  # PRIME: every assistant token is its own turn
    fresh_samples: bool = (
        False  # Iterative PPO: updates on fresh samples at the logged states, not on the logs
    )

    def estimator(self, log_estimator: str, own_estimator: str) -> str:
        """The estimator this arm really uses: the run's (log-based arms) or its own (fresh-sample arms)."""
        return own_estimator if self.fresh_samples else log_estimator

    def needs_critic(self, estimator: str) -> bool:
        """Whether the arm fits a critic each round under the run's ``--estimator``."""
        return not self.fresh_samples and get_estimator(estimator).needs_critic


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("itpo", prm=True, q=False, turn_reward="itpo", dpo_coef=5.0, gt_coef=5.0),
        MethodSpec("itpo_norm", prm=True, q=False, turn_reward="itpo_norm", dpo_coef=10.0, gt_coef=0.0),
        MethodSpec("outcome", prm=False, q=False, turn_reward=None, dpo_coef=0.0, gt_coef=5.0),
        MethodSpec(
            "prime", prm=True, q=False, turn_reward="itpo", dpo_coef=5.0, gt_coef=5.0, token_level=True
        ),
        MethodSpec(
            "iterative_ppo",
            prm=False,
            q=True,
            turn_reward=None,
            dpo_coef=0.0,
            gt_coef=0.0,
            fresh_samples=True,
        ),
    )
}


@dataclass
class MethodConfig:
    """Per-run overrides of the arms' credit settings."""

    estimator: str = "rloo"
    "Advantage estimator of the log-based arms: rloo | rloo_once | grpo | ppo."
    dpo_coef: float | None = None
    "Weight of the implicit-reward term (None: the method's default)."
    gt_coef: float | None = None
    "Weight of the outcome on the last assistant turn (None: the method's default)."
    estimator_cfg: EstimatorConfig | None = None
    "Whitening and GAE settings (None: defaults)."


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``, or an ItpoError listing the known methods."""
    if name not in METHODS:
        raise ItpoError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def check_methods(names: list[str], estimator: str) -> list[MethodSpec]:
    """Validate a ``--methods`` list and ``--estimator`` together; duplicates are an error."""
    if not names:
        raise ItpoError("--methods is empty")
    if len(set(names)) != len(names):
        raise ItpoError(f"--methods lists a method twice: {','.join(names)}")
    if estimator not in ESTIMATORS:
        raise ItpoError(f"unknown estimator {estimator!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return [get_method(n) for n in names]


@dataclass
class CreditBatch:
    """Padded ``[B, L]`` inputs of one round's credit (rows = conversations, in the update's order)."""

    assistant_mask: torch.Tensor  # bool [B, L]
    outcome: torch.Tensor  # float32 [B]
    group_index: torch.Tensor  # int64 [B]
    token_rewards: torch.Tensor | None = None  # float32 [B, L]: normalised implicit rewards, 0 off the mask
    values: torch.Tensor | None = None  # float32 [B, L]: critic values (estimator ppo)
    mean_length: float | None = None  # n̄ of Norm-ITPO (batch-global mean turn length)
    tau: float = DEFAULT_TAU  # Norm-ITPO temperature: the scoring PRM's PRMConfig.tau (its one home)


def _spread(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2L]`` with ``x [B, L]`` on the even columns (zeros / False between)."""
    out = x.new_zeros(x.shape[0], 2 * x.shape[1])
    out[:, 0::2] = x
    return out


def advantages(
    spec: MethodSpec, batch: CreditBatch, cfg: MethodConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(advantages [B, L], returns [B, L], turn rewards [B, K])`` of a log-based arm.

    The turn rewards are the per-turn component before the estimator (token-level for ``prime``: one
    column per assistant token); they go to the scored-turns table. Turn rewards, advantages and returns
    must be finite on the assistant tokens (:class:`~itpo_batch.core.errors.NonFiniteError`).
    """
    if spec.fresh_samples:
        raise ItpoError(f"method {spec.name!r} does not compute advantages from logs")
    dpo = spec.dpo_coef if cfg.dpo_coef is None else cfg.dpo_coef
    gt = spec.gt_coef if cfg.gt_coef is None else cfg.gt_coef
    mask = batch.assistant_mask.bool()
    tokens, values = batch.token_rewards, batch.values
    if spec.token_level:
        mask = _spread(mask)
        tokens = None if tokens is None else _spread(tokens)
        values = None if values is None else _spread(values)
    seg = segment_turns(mask)
    outcome = batch.outcome.to(torch.float32)
    if spec.turn_reward is None or dpo == 0.0:
        per_turn = torch.zeros(seg.shape, dtype=torch.float32, device=mask.device)
    elif spec.token_level:
        per_turn = dpo * turn_sum(_need_tokens(tokens, spec), seg)
    else:
        inputs = TurnRewardInputs(
            seg, _need_tokens(tokens, spec), outcome, None, batch.tau, batch.mean_length
        )
        per_turn = dpo * turn_rewards(spec.turn_reward, inputs)
    critic = get_estimator(cfg.estimator).needs_critic
    if critic and values is None:
        raise ItpoError(f"estimator {cfg.estimator!r} needs critic values")
    est_in = EstimatorInputs(
        per_turn, seg, mask, batch.group_index, gt * outcome if gt else None, values if critic else None
    )  # fmt: skip
    adv, ret = estimate(cfg.estimator, est_in, cfg.estimator_cfg)
    NonFiniteError.check("turn rewards", per_turn[seg.valid])
    NonFiniteError.check("advantages", adv[mask])
    NonFiniteError.check("returns", ret[mask])
    if spec.token_level:
        adv, ret = adv[:, 0::2], ret[:, 0::2]
    return adv, ret, per_turn


def _need_tokens(tokens: torch.Tensor | None, spec: MethodSpec) -> torch.Tensor:
    if tokens is None:
        raise ItpoError(f"method {spec.name!r} needs the implicit PRM's token rewards")
    return tokens
