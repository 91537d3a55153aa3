"""Vectorised advantage estimators (itpo_batch.rl.estimators) against the loops in tests/estimator_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itpo_batch.credit import turns as C
from itpo_batch.rl import estimators as E
from tests import estimator_reference as ref
from tests.test_credit import random_mask

GROUPED = ["rloo", "rloo_once", "grpo"]
REFS = {"rloo": ref.rloo, "rloo_once": ref.rloo_once, "grpo": ref.grpo}


def make_case(seed: int, b: int = 12, length: int = 50, max_turns: int = 5, with_last: bool = True):
    """Random masks, turn rewards and critic values; shuffled explicit groups incl. singletons."""
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, b, length, max_turns)
    seg = C.segment_turns(mask)
    turns = torch.from_numpy(rng.normal(size=seg.shape)) * seg.valid
    groups = rng.permutation(np.arange(b) % max(1, b // 3))  # ~3 rows per group, shuffled order
    groups[0] = 10_000  # a group of one
    last = torch.from_numpy(rng.uniform(-1, 1, size=b)) if with_last else None
    values = torch.from_numpy(rng.normal(size=(b, length)))
    x = E.EstimatorInputs(turns, seg, mask, torch.from_numpy(groups), last, values)
    return x, [f"g{g}" for g in groups]  # string ids for the reference: nothing ties them to row order


def ref_lists(x: E.EstimatorInputs):
    mask = x.assistant_mask.long().tolist()
    turns = [r[:n].tolist() for r, n in zip(x.turn_rewards, x.seg.n_turns.tolist(), strict=True)]
    last = None if x.last_turn_reward is None else x.last_turn_reward.tolist()
    return mask, turns, last


def close(a: torch.Tensor, b: list, tol: float = 1e-9) -> None:
    np.testing.assert_allclose(a.numpy(), np.array(b, dtype=np.float64).reshape(a.shape), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("seed", range(6))
def test_grouped_estimators_match_loop(name: str, seed: int) -> None:
    x, gids = make_case(seed, with_last=seed % 2 == 0)
    mask, turns, last = ref_lists(x)
    adv, ret = E.estimate(name, x)
    g = REFS[name](turns, last, gids, mask)
    close(ret, g)
    close(adv, ref.whiten(g, mask))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("seed", range(3))
def test_ppo_gae_matches_loop(seed: int, gamma: float, lam: float) -> None:
    x, _ = make_case(seed)
    mask, turns, last = ref_lists(x)
    cfg = E.EstimatorConfig(gamma=gamma, lam=lam, gae_chunk=8)  # several chunks per row
    adv, ret = E.estimate("ppo", x, cfg)
    a_ref, r_ref = ref.gae(turns, last, mask, x.values.tolist(), gamma, lam)
    close(ret, r_ref)
    close(adv, ref.whiten(a_ref, mask))


def test_rloo_single_position_is_exact_leave_one_out() -> None:
    """Baseline (docs/method.md §3.3): outcome on the last turn only ⇒ G = s_i − mean_{j≠i} s_j everywhere."""
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]).bool()
    seg = C.segment_turns(mask)
    s = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    x = E.EstimatorInputs(torch.zeros(seg.shape, dtype=torch.float64), seg, mask, torch.zeros(3), s)
    _, ret = E.estimate("rloo", x)
    expected = torch.tensor([1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5], dtype=torch.float64)
    torch.testing.assert_close(ret, expected[:, None] * mask)


def test_rloo_faithful_subtracts_baseline_at_every_turn_end() -> None:
    """Two turns vs one: the faithful first-turn return is (n s_i − K_i Σ s_j / K_j) / (n − 1) (docs/method.md §4.2)."""
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]]).bool()
    seg = C.segment_turns(mask)
    turns = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    x = E.EstimatorInputs(turns, seg, mask, torch.tensor([7, 7]))
    ret = E.estimate("rloo", x)[1]
    assert ret[0, 0].item() == pytest.approx((2 * 1.0 - 2 * (1.0 / 2 + 0.0)) / 1)  # 1.0, not 1.0 − 0.0
    assert ret[0, 0].item() == pytest.approx(1.0)
    once = E.estimate("rloo_once", x)[1]
    assert once[0, 0].item() == pytest.approx(1.0) and once[1, 0].item() == pytest.approx(-1.0)
    turns[1, 0] = 1.0  # equal totals: once-RLOO gives 0, faithful RLOO does not (different turn counts)
    assert E.estimate("rloo_once", x)[1][:, 0].abs().max().item() == pytest.approx(0.0)
    assert E.estimate("rloo", x)[1][0, 0].item() == pytest.approx(-1.0)


@pytest.mark.parametrize("name", [*GROUPED, "ppo"])
def test_edge_cases_have_no_nan(name: str) -> None:
    """No assistant turn at all, a row without turns, equal outcomes, one token, groups of one."""
    cases = [
        torch.zeros(3, 6, dtype=torch.bool),  # no assistant token in the batch
        torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1]]).bool(),
        torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).bool(),  # one token
    ]
    for mask in cases:
        seg = C.segment_turns(mask)
        for groups in (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])):
            x = E.EstimatorInputs(
                torch.ones(seg.shape) * seg.valid,
                seg,
                mask,
                groups,
                torch.ones(3),
                torch.full((3, 6), float("nan")),
            )
            x.values = torch.where(mask, 0.3, float("nan"))  # NaN off the mask must not leak
            adv, ret = E.estimate(name, x)
            assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
            assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
            shared = int(groups.unique().numel()) == 1 and int((seg.n_turns > 0).sum()) >= 2
            if name in ("rloo", "grpo") and shared:
                assert adv.abs().max() < 1e-3  # equal entries in one group: nothing to prefer
            if name == "rloo_once" and shared:  # equal totals: the first turn's return is 0
                first = mask.long().argmax(1)
                assert ret.gather(1, first[:, None]).abs().max() < 1e-6


def test_groups_of_one_use_zero_baseline() -> None:
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]]).bool()
    seg = C.segment_turns(mask)
    turns = torch.tensor([[0.2, 0.3], [0.7, 0.0]], dtype=torch.float64) * seg.valid
    x = E.EstimatorInputs(
        turns, seg, mask, torch.tensor([3, 9]), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    for name in GROUPED:
        ret = E.estimate(name, x, E.EstimatorConfig(grpo_eps=0.0))[1]
        torch.testing.assert_close(
            ret, torch.tensor([[1.5, 1.5, 0, 1.3], [0.7, 0, 0, 0]], dtype=torch.float64)
        )


@pytest.mark.parametrize("name", [*GROUPED, "ppo"])
def test_row_order_does_not_matter(name: str) -> None:
    """Explicit groups: permuting the rows permutes the outputs and nothing else."""
    x, _ = make_case(11)
    perm = torch.randperm(x.seg.shape[0], generator=torch.Generator().manual_seed(0))
    mask = x.assistant_mask[perm]
    y = E.EstimatorInputs(
        x.turn_rewards[perm],
        C.segment_turns(mask),
        mask,
        x.group_index[perm],
        x.last_turn_reward[perm],
        x.values[perm],
    )
    for a, b in zip(E.estimate(name, x), E.estimate(name, y), strict=True):
        torch.testing.assert_close(a[perm], b)


@pytest.mark.parametrize("name", [*GROUPED, "ppo"])
def test_long_conversations_match_loop(name: str) -> None:
    """8 turns over 4096 tokens per row."""
    rng = np.random.default_rng(5)
    b, length = 4, 4096
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        bounds = np.sort(rng.choice(np.arange(1, length), size=16, replace=False))
        for s, e in bounds.reshape(-1, 2):
            mask[i, s:e] = True
    seg = C.segment_turns(mask)
    assert seg.shape == (b, 8)
    turns = torch.from_numpy(rng.normal(size=(b, 8)))
    last = torch.from_numpy(rng.normal(size=b))
    values = torch.from_numpy(rng.normal(size=(b, length)))
    x = E.EstimatorInputs(turns, seg, mask, torch.tensor([1, 0, 1, 0]), last, values)
    cfg = E.EstimatorConfig(gamma=0.999, lam=0.95)
    adv, ret = E.estimate(name, x, cfg)
    m, t, la = ref_lists(x)
    gids = ["a", "b", "a", "b"]
    if name == "ppo":
        a_ref, r_ref = ref.gae(t, la, m, values.tolist(), 0.999, 0.95)
    else:
        a_ref = r_ref = REFS[name](t, la, gids, m)
    close(ret, r_ref, 1e-8)
    close(adv, ref.whiten(a_ref, m), 1e-8)


def test_discounted_suffix_sum_edge_shapes() -> None:
    assert E.discounted_suffix_sum(torch.zeros(3, 0), 0.9).shape == (3, 0)
    x = torch.randn(2, 7, dtype=torch.float64)
    loop = torch.zeros_like(x)
    acc = torch.zeros(2, dtype=torch.float64)
    for t in range(6, -1, -1):
        acc = x[:, t] + 0.7 * acc
        loop[:, t] = acc
    for chunk in (1, 3, 7, 128):
        torch.testing.assert_close(E.discounted_suffix_sum(x, 0.7, chunk), loop)


def test_registry_and_validation() -> None:
    assert set(E.ESTIMATORS) >= {"rloo", "rloo_once", "grpo", "ppo"}
    with pytest.raises(KeyError, match="unknown estimator"):
        E.estimate("nope", make_case(0)[0])
    with pytest.raises(ValueError, match="already registered"):
        E.register_estimator("rloo")(E.rloo)
    x, _ = make_case(0)
    x.values = None
    with pytest.raises(ValueError, match="needs values"):
        E.estimate("ppo", x)
    x.group_index = x.group_index[:-1]
    with pytest.raises(ValueError, match="group_index"):
        E.estimate("rloo", x)
    assert E.group_index_from_ids(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]


def test_whitening_off_returns_raw_returns() -> None:
    x, _ = make_case(3)
    adv, ret = E.estimate("rloo", x, E.EstimatorConfig(whiten=False))
    torch.testing.assert_close(adv, ret)
    w = E.estimate("rloo", x)[0][x.assistant_mask]
    assert abs(w.mean().item()) < 1e-9 and w.std().item() == pytest.approx(1.0, abs=1e-6)


def test_plugs_into_credit_turn_reward_registry() -> None:
    """Norm-ITPO turn rewards from ``credit.turn_rewards`` (float32) feed every estimator; ids from strings."""
    x, gids = make_case(2)
    token_rewards = torch.randn(x.assistant_mask.shape) * x.assistant_mask
    outcome = torch.rand(x.seg.shape[0])
    tr = C.turn_rewards("itpo_norm", C.TurnRewardInputs(x.seg, token_rewards=token_rewards, outcome=outcome))
    y = E.EstimatorInputs(tr, x.seg, x.assistant_mask, E.group_index_from_ids(gids), values=x.values.float())
    for name in [*GROUPED, "ppo"]:
        adv, _ = E.estimate(name, y)
        assert (
            adv.dtype == torch.float32 and torch.isfinite(adv).all() and adv.shape == x.assistant_mask.shape
        )
