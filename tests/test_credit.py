"""Vectorised turn credit (itpo_batch.credit.turns) against the plain-loop references in tests/credit_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itpo_batch.credit import segments
from itpo_batch.credit import turns as C
from itpo_batch.model.render import turn_ids_from_mask
from tests import credit_reference as ref


def random_mask(rng: np.random.Generator, b: int, length: int, max_turns: int) -> torch.Tensor:
    """``[B, L]`` masks with 0..max_turns non-empty turns per row, touching column 0 and L-1 at times."""
    mask = np.zeros((b, length), dtype=bool)
    for i in range(b):
        k = int(rng.integers(0, min(max_turns, (length + 1) // 2) + 1))
        bounds = np.sort(rng.choice(length + 1, size=2 * k, replace=False))
        for s, e in bounds.reshape(-1, 2):
            mask[i, s:e] = True
    return torch.from_numpy(mask)


def rows(grid: torch.Tensor, n_turns: torch.Tensor) -> list[list[float]]:
    """The valid prefix of each row of a ``[B, K]`` grid, as Python lists."""
    return [r[:n].tolist() for r, n in zip(grid, n_turns.tolist(), strict=True)]


def assert_rows_close(a: list, b: list, tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def case(seed: int, b: int = 16, length: int = 60, max_turns: int = 6):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, b, length, max_turns)
    values = torch.from_numpy(rng.normal(size=(b, length))).float() * mask  # zero off the mask
    outcome = torch.from_numpy(rng.uniform(-1, 1, size=b)).float()
    return mask, values, outcome


# ------------------------------------------------------------------------------------------ segmentation


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_matches_loop(seed: int) -> None:
    mask, _, _ = case(seed)
    seg = C.segment_turns(mask)
    lists = mask.tolist()
    assert seg.turn_id().tolist() == [ref.turn_ids(r) for r in lists]
    for row, r in zip(seg.turn_id().numpy(), mask.numpy(), strict=True):
        np.testing.assert_array_equal(row, turn_ids_from_mask(r))  # same convention as render
    assert seg.n_turns.tolist() == [len(ref.turn_lengths(r)) for r in lists]
    assert rows(seg.lengths, seg.n_turns) == [ref.turn_lengths(r) for r in lists]
    assert seg.shape == (16, max(1, int(seg.n_turns.max())))
    assert seg.valid.tolist() == [[k < n for k in range(seg.shape[1])] for n in seg.n_turns.tolist()]
    assert (seg.lengths[~seg.valid] == 0).all()
    assert C.turn_end_mask(mask).tolist() == [ref.turn_ends(r) for r in lists]


def test_segmentation_edge_shapes() -> None:
    empty = C.segment_turns(torch.zeros(3, 5, dtype=torch.bool))
    assert empty.shape == (3, 1) and not empty.valid.any() and empty.n_turns.tolist() == [0, 0, 0]
    one = C.segment_turns(torch.ones(1, 1, dtype=torch.bool))
    assert one.shape == (1, 1) and one.lengths.tolist() == [[1]]
    wide = C.segment_turns(torch.tensor([[0, 1, 1, 0, 1]]), min_turns=4)
    assert wide.shape == (1, 4) and wide.valid.tolist() == [[True, True, False, False]]
    no_cols = C.segment_turns(torch.zeros(2, 0, dtype=torch.bool))
    assert no_cols.shape == (2, 1) and no_cols.n_turns.tolist() == [0, 0]


# ------------------------------------------------------------------------------------------ turn rewards


@pytest.mark.parametrize("seed", range(5))
def test_turn_sums_and_means_match_loop(seed: int) -> None:
    mask, values, _ = case(seed)
    seg = C.segment_turns(mask)
    v, m = values.tolist(), mask.tolist()
    assert_rows_close(
        rows(C.itpo_turn_rewards(values, seg), seg.n_turns),
        [ref.turn_sums(a, b) for a, b in zip(v, m, strict=True)],
    )
    means = C.turn_mean(values, seg)
    assert_rows_close(rows(means, seg.n_turns), [ref.turn_means(a, b) for a, b in zip(v, m, strict=True)])
    assert (means[~seg.valid] == 0).all()
    assert C.mean_turn_length(seg).item() == pytest.approx(ref.mean_turn_length(m))


def test_off_mask_values_are_ignored_even_nan() -> None:
    mask, values, _ = case(7)
    seg = C.segment_turns(mask)
    dirty = torch.where(mask, values, torch.tensor(float("nan")))
    torch.testing.assert_close(C.turn_sum(dirty, seg), C.turn_sum(values, seg))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.4, 0.05, 2.0])
def test_norm_itpo_matches_loop_and_sums_to_outcome(seed: int, tau: float) -> None:
    mask, values, outcome = case(seed)
    seg = C.segment_turns(mask)
    p = C.itpo_norm_proportions(values, seg, tau)
    expected = ref.norm_proportions(values.tolist(), mask.tolist(), tau)
    assert_rows_close(rows(p, seg.n_turns), expected)
    rewards = C.itpo_norm_rewards(outcome, p)
    assert_rows_close(
        rows(rewards, seg.n_turns), ref.norm_rewards(values.tolist(), mask.tolist(), outcome.tolist(), tau)
    )
    has_turn = seg.n_turns > 0
    torch.testing.assert_close(rewards.sum(1)[has_turn], outcome[has_turn], atol=1e-6, rtol=1e-6)
    assert (rewards[~has_turn] == 0).all() and (p[~seg.valid] == 0).all()
    assert torch.isfinite(p).all()


def test_norm_itpo_edge_cases() -> None:
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0], [0] * 8, [1] * 8])
    seg = C.segment_turns(mask)
    equal = torch.full(mask.shape, 0.3) * mask  # ties: all turn means equal → uniform split
    p = C.itpo_norm_proportions(equal, seg)
    torch.testing.assert_close(p[0], torch.full((3,), 1 / 3))
    assert p[1].tolist() == [1.0, 0.0, 0.0] and p[3].tolist() == [1.0, 0.0, 0.0]  # one turn gets it all
    assert p[2].tolist() == [0.0, 0.0, 0.0]  # no assistant turn: zeros, not NaN
    huge = torch.tensor([[0, 1, 0, 1]]) * torch.tensor([[0.0, 1e4, 0.0, -1e4]])
    p_huge = C.itpo_norm_proportions(huge, C.segment_turns(torch.tensor([[0, 1, 0, 1]])), tau=1e-3)
    assert p_huge.tolist() == [[1.0, 0.0]]  # no overflow
    nbar = C.itpo_norm_proportions(equal, seg, mean_length=torch.tensor(10.0))
    torch.testing.assert_close(nbar, p)  # equal means: n̄ does not matter
    with pytest.raises(ValueError, match="tau"):
        C.itpo_norm_proportions(equal, seg, tau=0.0)


def test_masked_softmax_rows_without_valid_entries() -> None:
    logits = torch.tensor([[1.0, 2.0], [float("nan"), 3.0], [5.0, 5.0]])
    valid = torch.tensor([[False, False], [False, True], [True, True]])
    assert C.masked_softmax(logits, valid).tolist() == [[0.0, 0.0], [0.0, 1.0], [0.5, 0.5]]


@pytest.mark.parametrize("seed", range(4))
def test_length_shares_match_loop(seed: int) -> None:
    mask, _, _ = case(seed)
    seg = C.segment_turns(mask)
    lam = C.length_shares(seg)
    assert_rows_close(rows(lam, seg.n_turns), ref.length_shares(mask.tolist()))
    has_turn = seg.n_turns > 0
    torch.testing.assert_close(lam.sum(1)[has_turn], torch.ones(int(has_turn.sum())))
    assert (lam[~has_turn] == 0).all()


# ---------------------------------------------------------------------------- normaliser and PRIME rewards


@pytest.mark.parametrize("seed", range(4))
def test_suffix_normalizer_matches_loop(seed: int) -> None:
    _, values, _ = case(seed)
    values = values * 3.0
    assert C.suffix_max_normalizer(values).item() == pytest.approx(
        ref.suffix_normalizer(values.tolist()), rel=1e-5
    )
    normed = C.normalize_token_rewards(values)
    np.testing.assert_allclose(normed.numpy(), np.array(ref.normalize(values.tolist())), rtol=1e-5, atol=1e-6)
    assert (C.suffix_sum(normed, 1).abs() <= 1.0 + 1e-6).all()  # |row sums| and every suffix ≤ 1
    torch.testing.assert_close(C.normalize_token_rewards(values, scope="local"), normed)  # no process group
    torch.testing.assert_close(
        C.normalize_token_rewards(values * 0.01), normed, rtol=1e-4, atol=1e-6
    )  # β cancels
    assert C.suffix_max_normalizer(torch.zeros(2, 3)).item() == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="scope"):
        C.suffix_max_normalizer(values, scope="shard")  # type: ignore[arg-type]


def test_suffix_sum() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    assert C.suffix_sum(x, 1).tolist() == [[6.0, 5.0, 3.0], [3.0, 3.0, 4.0]]
    assert C.suffix_sum(x, 0).tolist() == [[1.0, 1.0, 7.0], [0.0, -1.0, 4.0]]


@pytest.mark.parametrize("seed", range(3))
def test_prime_token_rewards_match_loop(seed: int) -> None:
    mask, lp, _ = case(seed)
    rng = np.random.default_rng(seed + 100)
    lr = torch.from_numpy(rng.normal(size=lp.shape)).float()
    lengths = torch.from_numpy(rng.integers(1, lp.shape[1] + 1, size=lp.shape[0]))
    attn = torch.arange(lp.shape[1])[None, :] < lengths[:, None]
    got = C.prime_token_rewards(lp, lr, mask, beta=0.05)
    want = ref.prime_rewards(lp.tolist(), lr.tolist(), mask.tolist(), 0.05)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-5, atol=1e-7)
    dropped = C.prime_token_rewards(lp, lr, mask, beta=0.05, attention_mask=attn, drop_last=True)
    want = ref.prime_rewards(lp.tolist(), lr.tolist(), mask.tolist(), 0.05, lengths.tolist())
    np.testing.assert_allclose(dropped.numpy(), np.array(want), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="attention_mask"):
        C.prime_token_rewards(lp, lr, mask, drop_last=True)


# --------------------------------------------------------------------------------- scatter back, registry


@pytest.mark.parametrize("seed", range(3))
def test_turns_to_tokens_matches_loop(seed: int) -> None:
    mask, _, _ = case(seed)
    seg = C.segment_turns(mask)
    turn_vals = torch.randn(seg.shape, generator=torch.Generator().manual_seed(seed))
    got = C.turns_to_tokens(turn_vals, seg, fill=-7.0)
    assert got.tolist() == ref.to_tokens(turn_vals.tolist(), mask.tolist(), fill=-7.0)
    # round trip: a per-turn sum of a per-turn constant is constant × length
    torch.testing.assert_close(C.turn_sum(C.turns_to_tokens(turn_vals, seg), seg), turn_vals * seg.lengths)


def test_registry_and_turn_credit() -> None:
    mask, values, outcome = case(11)
    seg = C.segment_turns(mask)
    cost = -torch.rand(mask.shape[0])
    inputs = C.TurnRewardInputs(seg, token_rewards=values, outcome=outcome, cost=cost)
    assert {"itpo", "itpo_norm", "outcome", "length_spread"} <= set(C.TURN_REWARDS)
    torch.testing.assert_close(C.turn_rewards("itpo", inputs), C.turn_sum(values, seg))
    norm = C.turn_rewards("itpo_norm", inputs)
    torch.testing.assert_close(norm, C.itpo_norm_rewards(outcome, C.itpo_norm_proportions(values, seg)))
    last = C.turn_rewards("outcome", inputs)
    for i, n in enumerate(seg.n_turns.tolist()):
        assert last[i].tolist() == [outcome[i].item() if k == n - 1 else 0.0 for k in range(seg.shape[1])]
    spread = C.turn_rewards("length_spread", inputs)
    has_turn = seg.n_turns > 0
    torch.testing.assert_close(spread.sum(1)[has_turn], cost[has_turn])
    with pytest.raises(KeyError, match="unknown turn reward"):
        C.turn_rewards("nope", inputs)
    with pytest.raises(ValueError, match="outcome"):
        C.turn_rewards("itpo_norm", C.TurnRewardInputs(seg, token_rewards=values))
    with pytest.raises(ValueError, match="already registered"):
        C.register_turn_reward("itpo")(lambda x: x.seg.lengths)
    tc = C.turn_credit(values, mask, outcome)
    torch.testing.assert_close(tc.implicit_reward, C.turn_sum(values, seg))
    torch.testing.assert_close(tc.implicit_reward_mean, C.turn_mean(values, seg))
    torch.testing.assert_close(tc.itpo_norm_reward, norm)
    torch.testing.assert_close(tc.length_share, C.length_shares(seg))
    assert torch.equal(tc.n_tokens, seg.lengths)


def test_gradients_flow_through_turn_credit() -> None:
    mask, values, outcome = case(3, b=4, length=20)
    values = values.clone().requires_grad_(True)
    tc = C.turn_credit(values, mask, outcome)
    (tc.itpo_norm_reward.square().sum() + tc.implicit_reward.sum()).backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert (values.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- scale, singletons, property


def test_long_conversations_and_single_row() -> None:
    mask, values, outcome = case(5, b=3, length=4096, max_turns=8)
    mask[0] = False
    mask[0, 100:400] = True
    for k in range(1, 8):  # row 0: exactly 8 turns
        mask[0, 400 + k * 450 : 400 + k * 450 + 300] = True
    values = values * mask
    seg = C.segment_turns(mask)
    assert int(seg.n_turns[0]) == 8
    tc = C.turn_credit(values, mask, outcome)
    slow = ref.all_turn_quantities(values.tolist(), mask.tolist(), outcome.tolist(), C.DEFAULT_TAU)
    for name in ("implicit_reward", "implicit_reward_mean", "itpo_norm_reward", "length_share"):
        assert_rows_close(rows(getattr(tc, name), seg.n_turns), slow[name], tol=1e-4)
    single = C.turn_credit(values[:1], mask[:1], outcome[:1])  # a batch (or group) of one conversation
    torch.testing.assert_close(single.itpo_norm_reward.sum(), outcome[0])


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 6),
    length=st.integers(1, 30),
    max_turns=st.integers(0, 8),
    seed=st.integers(0, 2**16),
    tau=st.floats(0.05, 3.0),
)
def test_property_random_masks(b: int, length: int, max_turns: int, seed: int, tau: float) -> None:
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, b, length, max_turns)
    values = torch.from_numpy(rng.choice([-1.0, 0.0, 0.5, 1.0], size=(b, length))).float() * mask  # many ties
    outcome = torch.from_numpy(rng.uniform(-1, 1, size=b)).float()
    tc = C.turn_credit(values, mask, outcome, tau=tau)
    slow = ref.all_turn_quantities(values.tolist(), mask.tolist(), outcome.tolist(), tau)
    assert rows(tc.n_tokens, tc.seg.n_turns) == slow["n_tokens"]
    for name in ("implicit_reward", "implicit_reward_mean", "itpo_norm_reward", "length_share"):
        assert_rows_close(rows(getattr(tc, name), tc.seg.n_turns), slow[name])
    assert all(torch.isfinite(getattr(tc, f)).all() for f in ("itpo_norm_weight", "itpo_norm_reward"))


# ------------------------------------------------------------------- numpy (CPU) and torch (CUDA) kernels


@pytest.fixture(params=["numpy", "torch"])
def kernels(request, monkeypatch) -> str:
    """Run a test on the numpy kernels (CPU, no grad) and on the torch ones (what CUDA and autograd use)."""
    if request.param == "torch":
        monkeypatch.setattr(segments, "_numpy_ok", lambda x: False)
    return request.param


def run_edge_masks() -> torch.Tensor:
    """Turns that touch both row ends, runs of adjacent rows that meet, one-token turns, empty rows."""
    return torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],  # whole row: its run ends where the next row's starts
            [1, 0, 1, 0, 0, 1],  # one-token turns at column 0 and L-1
            [1, 1, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],  # no assistant turn
            [0, 1, 0, 1, 0, 1],
            [1, 1, 1, 1, 1, 1],  # last row ends on an assistant token: run end = B·L
        ],
        dtype=torch.bool,
    )


@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_loop_with_nan_off_mask(kernels: str, seed: int) -> None:
    mask, values, outcome = case(seed) if seed else (run_edge_masks(), None, None)
    if values is None:
        values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
        outcome = torch.linspace(-1, 1, mask.shape[0])
    dirty = torch.where(mask, values, torch.tensor(float("nan")))
    tc = C.turn_credit(dirty, mask, outcome)
    slow = ref.all_turn_quantities(values.tolist(), mask.tolist(), outcome.tolist(), C.DEFAULT_TAU)
    assert rows(tc.n_tokens, tc.seg.n_turns) == slow["n_tokens"]
    for name in ("implicit_reward", "implicit_reward_mean", "itpo_norm_reward", "length_share"):
        assert_rows_close(rows(getattr(tc, name), tc.seg.n_turns), slow[name])
    tokens = C.turns_to_tokens(tc.itpo_norm_reward, tc.seg, fill=-3.0)
    np.testing.assert_allclose(
        tokens.numpy(), np.array(ref.to_tokens(slow["itpo_norm_reward"], mask.tolist(), fill=-3.0)), atol=1e-6
    )
    assert tc.seg.turn_id().tolist() == [ref.turn_ids(r) for r in mask.tolist()]


def test_segments_positions_and_slots(kernels: str) -> None:
    for mask in (run_edge_masks(), case(2)[0], torch.zeros(2, 3, dtype=torch.bool)):
        seg = C.segment_turns(mask)
        assert seg.positions.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
        turn = torch.tensor([k for r in mask.tolist() for k in ref.turn_ids(r) if k >= 0], dtype=torch.int64)
        rows_of = seg.positions // mask.shape[1]
        assert seg.slot.tolist() == (rows_of * seg.shape[1] + turn).tolist()
        assert ((seg.ends - seg.starts) > 0).all() and int(seg.bounds[-1]) == mask.numel()


def test_torch_kernels_keep_gradients() -> None:
    """Values that require grad take the torch kernels: the gradient of a turn sum is the assistant mask."""
    mask = run_edge_masks()
    values = torch.where(mask, torch.randn(mask.shape), torch.tensor(float("nan"))).requires_grad_(True)
    seg = C.segment_turns(mask)
    C.turn_sum(values, seg).sum().backward()
    assert values.grad is not None and torch.equal(values.grad, mask.float())
    back = C.turns_to_tokens(torch.ones(seg.shape, requires_grad=True), seg)
    torch.testing.assert_close(back, mask.float())
