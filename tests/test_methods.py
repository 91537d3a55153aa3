"""Arms' advantages (itpo_batch.rl.methods) against plain-loop references of the official code, with edge cases:
a row without assistant turns, a group of one, one-turn rows, ties, and the PRIME token-level spread."""

from __future__ import annotations

import random

import pytest
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.rl.estimators import EstimatorConfig
from itpo_batch.rl.methods import METHODS, CreditBatch, MethodConfig, advantages, check_methods
from tests import credit_reference as cref
from tests import estimator_reference as eref

NO_WHITEN = EstimatorConfig(whiten=False)


def random_batch(seed: int, b: int = 7, length: int = 14) -> tuple[list, list, list, list]:
    """Mask rows with 0-3 turns (row 0: none), token rewards, outcomes, groups (one group of one)."""
    rng = random.Random(seed)
    mask = []
    for i in range(b):
        row = [0] * length
        if i > 0:
            for _ in range(rng.randint(1, 3)):
                start = rng.randrange(length)
                for t in range(start, min(length, start + rng.randint(1, 3))):
                    row[t] = 1
        mask.append(row)
    rewards = [[round(rng.uniform(-1, 1), 3) if m else 0.0 for m in row] for row in mask]
    outcome = [rng.choice([0.0, 0.5, 1.0]) for _ in range(b)]  # ties on purpose
    groups = [0, 0, 0, 1, 1, 1, 2]  # the last row is a group of one
    return mask, rewards, outcome, groups


def _batch(mask, rewards, outcome, groups) -> CreditBatch:
    return CreditBatch(
        assistant_mask=torch.tensor(mask, dtype=torch.bool),
        outcome=torch.tensor(outcome),
        group_index=torch.tensor(groups),
        token_rewards=torch.tensor(rewards, dtype=torch.float32),
        mean_length=cref.mean_turn_length(mask),
    )


def _close(fast: torch.Tensor, slow: list, tol: float = 1e-5) -> None:
    assert torch.allclose(fast.double(), torch.tensor(slow, dtype=torch.float64), atol=tol), (fast, slow)


@pytest.mark.parametrize("seed", range(5))
def test_itpo_rloo_matches_loop(seed: int) -> None:
    mask, rewards, outcome, groups = random_batch(seed)
    adv, ret, _ = advantages(METHODS["itpo"], _batch(mask, rewards, outcome, groups),
                                    MethodConfig(estimator_cfg=NO_WHITEN))  # fmt: skip
    turns = [[5.0 * s for s in cref.turn_sums(rewards[i], mask[i])] for i in range(len(mask))]
    slow = eref.rloo(turns, [5.0 * o for o in outcome], groups, mask)
    _close(ret, slow)
    _close(adv, slow)
    assert torch.all(adv[0] == 0)  # the row without assistant turns


@pytest.mark.parametrize("seed", range(5))
def test_itpo_norm_rloo_matches_loop(seed: int) -> None:
    mask, rewards, outcome, groups = random_batch(seed)
    cfg = MethodConfig(estimator_cfg=NO_WHITEN)
    adv, _, per_turn = advantages(METHODS["itpo_norm"], _batch(mask, rewards, outcome, groups), cfg)
    norm = cref.norm_rewards(rewards, mask, outcome, 0.4)
    turns = [[10.0 * v for v in row] for row in norm]
    _close(adv, eref.rloo(turns, None, groups, mask))
    for i in range(1, len(mask)):  # Norm-ITPO turn rewards sum to dpo · outcome
        assert float(per_turn[i].sum()) == pytest.approx(10.0 * outcome[i], abs=1e-5)


@pytest.mark.parametrize("estimator", ["rloo", "rloo_once", "grpo"])
def test_outcome_arm_gives_every_token_of_a_conversation_one_value(estimator: str) -> None:
    mask, rewards, outcome, groups = random_batch(3)
    adv, _, _ = advantages(METHODS["outcome"], _batch(mask, rewards, outcome, groups),
                           MethodConfig(estimator=estimator, estimator_cfg=NO_WHITEN))  # fmt: skip
    for i, row in enumerate(mask):
        vals = {round(float(adv[i, t]), 6) for t in range(len(row)) if row[t]}
        assert len(vals) <= 1
    if estimator == "rloo":  # exact leave-one-out of 5·outcome within each group
        slow = eref.rloo([[0.0] * len(cref.turn_sums(rewards[i], mask[i])) for i in range(len(mask))],
                         [5.0 * o for o in outcome], groups, mask)  # fmt: skip
        _close(adv, slow)


@pytest.mark.parametrize("seed", range(5))
def test_prime_token_level_matches_official_else_branch(seed: int) -> None:
    """Masked RLOO over every assistant token (row means as m_i) + gt LOO at the last one, suffix sums."""
    mask, rewards, outcome, groups = random_batch(seed)
    adv, _, _ = advantages(METHODS["prime"], _batch(mask, rewards, outcome, groups), MethodConfig())
    z = [[5.0 * r for r in row] for row in rewards]
    r = eref.masked_rloo(z, mask, groups, mask)
    lm = eref.last_turn_end_mask(mask)
    gz = [[5.0 * outcome[i] if lm[i][t] else 0.0 for t in range(len(lm[i]))] for i in range(len(lm))]
    g = eref.masked_rloo(gz, lm, groups, mask)
    total = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(r, g, strict=True)]
    _close(adv, eref.whiten(eref.token_returns(total, mask), mask), tol=1e-4)


def test_ppo_estimator_needs_values_and_uses_them() -> None:
    mask, rewards, outcome, groups = random_batch(1)
    batch = _batch(mask, rewards, outcome, groups)
    with pytest.raises(ItpoError, match="critic"):
        advantages(METHODS["itpo"], batch, MethodConfig(estimator="ppo"))
    batch.values = torch.zeros(len(mask), len(mask[0]))
    adv0, _, _ = advantages(METHODS["itpo"], batch, MethodConfig(estimator="ppo", estimator_cfg=NO_WHITEN))
    batch.values = torch.ones(len(mask), len(mask[0]))
    adv1, _, _ = advantages(METHODS["itpo"], batch, MethodConfig(estimator="ppo", estimator_cfg=NO_WHITEN))
    assert not torch.allclose(adv0, adv1)
    assert torch.isfinite(adv1).all()


def test_one_turn_rows_and_no_nan() -> None:
    mask = [[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    rewards = [[0.0, 0.2, -0.1, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0] * 4]
    for name in ("itpo", "itpo_norm", "outcome", "prime"):
        for est in ("rloo", "rloo_once", "grpo"):
            adv, _, _ = advantages(METHODS[name], _batch(mask, rewards, [1.0, 0.0, 1.0], [0, 0, 0]),
                                   MethodConfig(estimator=est))  # fmt: skip
            assert torch.isfinite(adv).all()
            assert torch.all(adv[2] == 0)


def test_check_methods() -> None:
    assert [s.name for s in check_methods(["itpo", "outcome"], "grpo")] == ["itpo", "outcome"]
    with pytest.raises(ItpoError, match="unknown method"):
        check_methods(["itpo", "nope"], "rloo")
    with pytest.raises(ItpoError, match="twice"):
        check_methods(["itpo", "itpo"], "rloo")
    with pytest.raises(ItpoError, match="estimator"):
        check_methods(["itpo"], "gae")
    with pytest.raises(ItpoError, match="does not compute"):
        advantages(METHODS["iterative_ppo"], _batch(*random_batch(0)), MethodConfig())


# --- capabilities are properties of the registry entries -------------------------------------------------
def test_critic_need_comes_from_the_estimator_entry() -> None:
    from itpo_batch.rl.estimators import ESTIMATORS
    from itpo_batch.rl.ippo import GROUP_ESTIMATORS

    assert {n for n, e in ESTIMATORS.items() if e.needs_critic} == {"ppo"}
    for name in ("itpo", "itpo_norm", "outcome", "prime"):
        assert METHODS[name].needs_critic("ppo") and not METHODS[name].needs_critic("rloo")
    # Iterative PPO updates on fresh samples with its own group estimator: never a critic
    assert not METHODS["iterative_ppo"].needs_critic("ppo")
    assert "ppo" not in GROUP_ESTIMATORS and set(GROUP_ESTIMATORS) == {"grpo", "rloo", "rloo_once"}


def test_each_arm_reports_the_estimator_it_really_uses() -> None:
    from itpo_batch.run.config import IterateConfig

    cfg = IterateConfig(methods=["itpo_norm", "iterative_ppo"])
    cfg.method.estimator, cfg.ippo.estimator = "rloo_once", "rloo"
    assert cfg.estimator_of("itpo_norm") == "rloo_once"
    assert cfg.estimator_of("iterative_ppo") == "rloo"  # its own, not the log arms'


@pytest.mark.parametrize("tau", [0.05, 0.4, 2.0])
def test_norm_itpo_tau_of_the_batch_is_the_one_used(tau: float) -> None:
    """τ reaches the advantages through the credit batch (set from PRMConfig.tau, its only home)."""
    mask, rewards, outcome, groups = random_batch(3)
    batch = _batch(mask, rewards, outcome, groups)
    batch.tau = tau
    _, _, per_turn = advantages(METHODS["itpo_norm"], batch, MethodConfig(estimator_cfg=NO_WHITEN))
    expected = cref.norm_rewards(rewards, mask, outcome, tau)
    k = per_turn.shape[1]
    _close(per_turn, [[10.0 * v for v in row] + [0.0] * (k - len(row)) for row in expected])
