"""Implicit PRM (itpo_batch.credit.prm): loss against a plain loop, exact zeros at init, learning a marker, Norm-ITPO
invariants, the normaliser's scope, diagnostics against loops, one reference forward, warm start, labels."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit import prm_metrics
from itpo_batch.credit.prm import ImplicitPRM, PRMConfig, default_lr
from itpo_batch.credit.prm_data import outcome_labels
from itpo_batch.credit.prm_metrics import mean_bce, pairwise_accuracy, sign_accuracy
from itpo_batch.data.validate import read_logs
from itpo_batch.model.packing import gather_segments
from tests.logs_factory import nested_rows, write

FILLER = ["Any fever?", "How long?", "Where does it hurt?"]
USER = ["I feel sick.", "Yes.", "Two days."]
MARKER, OTHER = "It is a rash.", "It is a cold."


def synthetic(n_groups: int, seed: int) -> tuple[list, list[float], list[str], list[int]]:
    """Groups of 4 (2 good, 2 bad); one random turn of 3 says MARKER in good ones and OTHER in bad ones."""
    rng = np.random.default_rng(seed)
    chats, outcomes, groups, marks = [], [], [], []
    for g in range(n_groups):
        for m in range(4):
            good, k = m % 2 == 0, int(rng.integers(0, 3))
            msgs = []
            for t in range(3):
                reply = (MARKER if good else OTHER) if t == k else FILLER[t]
                msgs += [{"role": "user", "content": USER[t]}, {"role": "assistant", "content": reply}]
            chats.append(msgs)
            outcomes.append(float(good))
            groups.append(f"g{g}")
            marks.append(k)
    return chats, outcomes, groups, marks


# ---------------------------------------------------------------------------------------- plain references


def loop_logratio_sums(prm: ImplicitPRM, data) -> list[float]:
    """Per conversation, unpacked full-logits forwards: Σ over assistant tokens of log π_φ − log π_ref."""
    out = []
    with torch.no_grad():
        for r in data.rendered:
            ids = torch.as_tensor(r.input_ids)[None]
            lp = [
                torch.log_softmax(m(input_ids=ids, use_cache=False).logits[0].double(), -1)
                for m in (prm.model, prm.reference)
            ]
            total = 0.0
            for t in range(1, len(r)):
                if r.assistant_mask[t]:
                    total += float(lp[0][t - 1, r.input_ids[t]] - lp[1][t - 1, r.input_ids[t]])
            out.append(total)
    return out


def loop_bce(z: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def loop_pairwise(z, y, groups, weighted=False) -> float:
    num = den = 0.0
    for i in range(len(z)):
        for j in range(len(z)):
            if groups[i] == groups[j] and y[i] > y[j]:
                w = (y[i] - y[j]) if weighted else 1.0
                den += w
                num += w * (1.0 if z[i] > z[j] else 0.5 if z[i] == z[j] else 0.0)
    return num / den if den else math.nan


def loop_normalizer(token_rewards: torch.Tensor, offsets: torch.Tensor) -> float:
    peak = 0.0
    for j in range(len(offsets) - 1):
        row = token_rewards[offsets[j] : offsets[j + 1]].tolist()
        for t in range(len(row)):
            peak = max(peak, abs(sum(row[t:])))
    return peak + 1e-6


# ---------------------------------------------------------------------------------------------- no model


def test_labels_range_mapping_and_config() -> None:
    np.testing.assert_allclose(outcome_labels([-1, -0.5, 0, 1, 1.5], (-1.0, 1.0)), [0, 0.25, 0.5, 1, 1])
    np.testing.assert_array_equal(
        outcome_labels([0.0, 0.37, 1.0], (0.0, 1.0)), [0.0, 0.37, 1.0]
    )  # as they are
    assert outcome_labels([-0.002], (0.0, 1.0))[0] == 0.0  # a word-cost-only failure clips to 0
    with pytest.raises(ItpoError, match="finite"):
        outcome_labels([math.nan], (0.0, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        PRMConfig(label_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="normalize"):
        PRMConfig(normalize="shard")  # type: ignore[arg-type]
    assert default_lr(2_500_000) == 3e-4 and default_lr(3_000_000_000) == 1e-6


def test_gather_segments() -> None:
    offsets = torch.tensor([0, 3, 3, 7, 9])
    got = gather_segments(offsets, torch.tensor([3, 0, 2, 1]))
    assert got.tolist() == [7, 8, 0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(4))
def test_diagnostics_match_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    z = torch.from_numpy(np.round(rng.normal(size=n), 1))  # rounding makes ties
    y = torch.from_numpy(rng.choice([0.0, 0.25, 1.0], size=n))  # soft labels, with ties
    groups = rng.choice([f"g{i}" for i in range(12)], size=n)  # some groups of one
    for weighted in (False, True):
        acc, n_pairs = pairwise_accuracy(z, y, groups, weighted=weighted)
        assert acc == pytest.approx(loop_pairwise(z.tolist(), y.tolist(), list(groups), weighted), abs=1e-12)
    assert n_pairs == sum(groups[i] == groups[j] and y[i] > y[j] for i in range(n) for j in range(n))
    expect_sign = np.mean([(float(a) > 0) == (float(b) > 0.5) for a, b in zip(z, y, strict=True)])
    assert sign_accuracy(z, y) == pytest.approx(expect_sign)
    assert mean_bce(z, y) == pytest.approx(
        np.mean([loop_bce(float(a), float(b)) for a, b in zip(z, y, strict=True)])
    )
    singles = np.array([f"s{i}" for i in range(n)])
    assert math.isnan(pairwise_accuracy(z, y, singles)[0]) and pairwise_accuracy(z, y, singles)[1] == 0
    assert pairwise_accuracy(z, y, None)[0] == pytest.approx(loop_pairwise(z.tolist(), y.tolist(), [0] * n))


def test_pairwise_accuracy_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    z, y = torch.from_numpy(rng.normal(size=30)), torch.from_numpy(rng.integers(0, 3, size=30) / 2)
    groups = rng.choice(["a", "b", "c"], size=30)
    whole = pairwise_accuracy(z, y, groups)
    monkeypatch.setattr(prm_metrics, "PAIR_BLOCK", 7)  # a block of one "first" member at a time
    assert pairwise_accuracy(z, y, groups) == whole
    assert whole[0] == pytest.approx(loop_pairwise(z.tolist(), y.tolist(), list(groups)))


# ----------------------------------------------------------------------------------------- tiny model


def test_loss_matches_plain_loop(tiny_dir: Path) -> None:
    prm = ImplicitPRM.load("tiny", PRMConfig(beta=0.5), device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move π_φ away from π_ref so the log-ratios are not zero
        for p in prm.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    chats, _, groups, _ = synthetic(2, seed=3)
    labels = [0.0, 0.3, 1.0, 0.7, 1.0, 0.0, 0.5, 0.2]  # soft labels
    data = prm.prepare(chats, [0.0] * 8, groups, labels=labels)
    sums = loop_logratio_sums(prm, data)
    np.testing.assert_allclose(
        prm.conversation_rewards(data).numpy(), 0.5 * np.array(sums), rtol=1e-4, atol=1e-5
    )
    expect = np.mean([loop_bce(0.5 * s, y) for s, y in zip(sums, labels, strict=True)])
    assert float(prm.loss(data).detach()) == pytest.approx(expect, rel=1e-5)
    subset = [5, 1, 6]  # any mini-batch, packed into one buffer or split into many (accumulated)
    expect_sub = np.mean([loop_bce(0.5 * sums[i], labels[i]) for i in subset])
    assert float(prm.loss(data, subset).detach()) == pytest.approx(expect_sub, rel=1e-5)
    prm.cfg.batch_tokens = 40  # every conversation gets a buffer of its own
    assert float(prm.loss(data, subset).detach()) == pytest.approx(expect_sub, rel=1e-5)


def test_init_rewards_are_exactly_zero(tmp_path: Path, tiny_dir: Path) -> None:
    prm = ImplicitPRM.load("tiny", device="cpu")
    data = prm.prepare_logs(read_logs([write(nested_rows(6), tmp_path / "logs.parquet")]))
    scores = prm.score(data)
    turns, conv = scores.turns, scores.conversations
    assert (turns["implicit_reward"] == 0).all() and (turns["implicit_reward_normalized"] == 0).all()
    assert (conv["implicit_reward_total"] == 0).all() and bool((scores.token_rewards == 0).all())
    per_conv = turns.join(conv.select("conv_index", "n_turns", "outcome"), on="conv_index")
    np.testing.assert_allclose(per_conv["itpo_norm_weight"], 1.0 / per_conv["n_turns"].to_numpy())
    assert conv["conversation_id"].to_list() == [f"c{i}" for i in range(6)]
    assert scores.metrics["prm/loss"] == pytest.approx(math.log(2))
    assert scores.metrics["prm/pair_acc"] == 0.5 and scores.metrics["prm/n_pairs"] == 3  # groups of 2, ties
    assert turns["n_tokens"].sum() == conv["n_tokens"].sum() == int(data.offsets[-1])


@pytest.fixture(scope="module")
def fitted(tiny_dir: Path) -> types.SimpleNamespace:
    """A PRM fitted on the marker problem (16 conversations, 3 epochs of 4 steps), counting π_ref forwards."""
    cfg = PRMConfig(beta=0.5, epochs=3, shuffle=True)  # test-scale β: separates within 12 steps
    prm = ImplicitPRM.load("tiny", cfg, device="cpu")
    calls = []
    prm.reference.register_forward_hook(lambda *_: calls.append(1))
    chats, outcomes, groups, marks = synthetic(4, seed=0)
    train = prm.prepare(chats, outcomes, groups)
    hold_chats, hold_out, hold_groups, _ = synthetic(2, seed=1)
    holdout = prm.prepare(hold_chats, hold_out, hold_groups)
    before = prm.diagnostics(train)
    steps: list[tuple[int, int, float]] = []
    result = prm.fit(train, holdout=holdout, on_step=lambda *a: steps.append(a))
    scores = prm.score(train)
    n_ref_calls = len(calls)
    return types.SimpleNamespace(**locals())


def test_fit_learns_the_marker_turn(fitted) -> None:
    m, hist = fitted.result["metrics"], fitted.result["history"]
    assert len(fitted.steps) == 12 and fitted.steps[-1][:2] == (12, 12)
    # Margins measured over 64 fits (data and shuffle seeds 0-7 x weights as loaded or with 3 draws of 1e-6
    # relative noise, another CPU's rounding, x 1 and 2 threads), min/median/max: first-last epoch loss
    # 0.55/1.34/2.29; loss drop 0.32/0.45/0.54; both pair accuracies 1.0 in every fit; the marker gaps
    # below 0.49/0.70/0.87 and 1.65/2.20/2.71, the blamed-turn share 1.0 in every fit.
    assert hist[-1]["prm/train_loss"] < hist[0]["prm/train_loss"]
    assert m["prm/loss"] < fitted.before["prm/loss"] - 0.2
    assert m["prm/pair_acc"] > 0.8 and m["prm/holdout/pair_acc"] > 0.8
    grid = fitted.scores.turns.pivot(on="turn", index="conv_index", values="implicit_reward").sort(
        "conv_index"
    )
    rewards = grid.select(["0", "1", "2"]).to_numpy()
    marks, good = np.array(fitted.marks), np.array(fitted.outcomes) == 1.0
    at_mark = rewards[np.arange(len(marks)), marks]
    others = np.where(np.arange(3)[None, :] == marks[:, None], np.nan, rewards)
    # The marker turn of a good conversation earns more than its other turns (turns after it gain too: they
    # only follow the marker in good conversations, so an implicit PRM credits them as well) ...
    assert at_mark[good].mean() > np.nanmean(others[good]) + 0.3
    # ... and the bad turn of a bad conversation is blamed: the lowest turn reward of its conversation.
    assert (at_mark[~good] < np.nanmin(others[~good], axis=1)).mean() >= 0.8
    assert at_mark[~good].mean() < np.nanmean(others[~good]) - 1.0


def test_reference_runs_once_per_dataset(fitted) -> None:
    assert fitted.n_ref_calls == len(fitted.train.batches) + len(fitted.holdout.batches)
    assert not fitted.train.ref_logp.requires_grad


def test_norm_itpo_sums_to_outcome_and_global_normalizer(fitted) -> None:
    s = fitted.scores
    sums = s.turns.group_by("conv_index").agg(
        pl.col("itpo_norm_reward").sum(), pl.col("itpo_norm_weight").sum()
    )
    check = sums.join(s.conversations, on="conv_index")
    np.testing.assert_allclose(check["itpo_norm_reward"], check["outcome"], atol=1e-6)
    np.testing.assert_allclose(check["itpo_norm_weight"], 1.0, atol=1e-6)
    raw_tokens = s.token_rewards * s.normalizer
    assert s.normalizer == pytest.approx(loop_normalizer(raw_tokens, fitted.train.offsets), rel=1e-5)
    np.testing.assert_allclose(
        s.turns["implicit_reward_normalized"], s.turns["implicit_reward"] / s.normalizer, rtol=1e-5
    )
    totals = (
        s.turns.group_by("conv_index")
        .agg(pl.col("implicit_reward").sum())
        .join(s.conversations, on="conv_index")
    )
    np.testing.assert_allclose(
        totals["implicit_reward"], totals["implicit_reward_total"], rtol=1e-4, atol=1e-5
    )


def test_normalizer_scopes(fitted) -> None:
    prm, base = fitted.prm, fitted.scores
    prm.cfg.normalize = "none"
    raw = prm.score(fitted.train)
    assert raw.normalizer == 1.0
    assert_frame_equal(raw.turns.select("implicit_reward"), base.turns.select("implicit_reward"))
    np.testing.assert_array_equal(raw.turns["implicit_reward_normalized"], raw.turns["implicit_reward"])
    # Per-shard ("local" under DDP): each shard is scaled by its own max, so the shard without the batch's
    # largest |suffix sum| gets a smaller divisor, hence larger rewards, than under the global normaliser.
    raw_tokens, off = base.token_rewards * base.normalizer, fitted.train.offsets
    peaks = np.array([loop_normalizer(raw_tokens, off[j : j + 2]) for j in range(len(off) - 1)])
    top = np.isclose(peaks, peaks.max(), rtol=1e-4)
    assert top.any() and not top.all()
    prm.cfg.normalize = "local"
    shards = []
    for members in (np.flatnonzero(top), np.flatnonzero(~top)):
        pick = [fitted.chats[i] for i in members], [fitted.outcomes[i] for i in members]
        shards.append(prm.score(prm.prepare(*pick)))
    prm.cfg.normalize = "global"
    assert shards[0].normalizer == pytest.approx(base.normalizer, rel=1e-4)
    assert shards[1].normalizer == pytest.approx(peaks[~top].max(), rel=1e-4)
    # far enough below the global divisor for the ratio check below (rtol 1e-4) to tell them apart; measured
    # 0.75/0.95/0.98 of it over the 64 fits above (0.9715 here, moved < 1e-4 by rounding noise)
    assert shards[1].normalizer < 0.999 * base.normalizer
    ratio = shards[1].turns["implicit_reward_normalized"] / shards[1].turns["implicit_reward"]
    np.testing.assert_allclose(ratio, 1.0 / shards[1].normalizer, rtol=1e-4)


def test_center_subtracts_the_batch_mean_token_reward(fitted) -> None:
    prm, data = fitted.prm, fitted.train
    prm.cfg.normalize = "none"
    try:
        raw = prm.score(data)
        prm.cfg.center = True
        centred = prm.score(data)
    finally:
        prm.cfg.center, prm.cfg.normalize = False, "global"
    tokens = raw.token_rewards.double().numpy()
    mean = sum(tokens) / len(tokens)  # loop reference: one mean over every assistant token of the batch
    np.testing.assert_allclose(centred.token_rewards.double().numpy(), tokens - mean, atol=1e-6)
    # each turn's reward loses mean × its length (ITPO's S_ik, the scored table's implicit_reward) ...
    expect = raw.turns["implicit_reward"].to_numpy() - mean * raw.turns["n_tokens"].to_numpy()
    np.testing.assert_allclose(centred.turns["implicit_reward"].to_numpy(), expect, atol=1e-5)
    assert not np.allclose(centred.turns["implicit_reward"], raw.turns["implicit_reward"], atol=1e-3)
    # ... Norm-ITPO's weights (a softmax over per-token means) and the PRM's own prediction do not change
    np.testing.assert_allclose(centred.turns["itpo_norm_weight"], raw.turns["itpo_norm_weight"], atol=1e-5)
    assert_frame_equal(centred.conversations, raw.conversations)


def test_warm_start_reloads_identical_scores(fitted, tmp_path: Path) -> None:
    out = fitted.prm.save(tmp_path / "prm")
    assert (out / "model.safetensors").is_file() and (out / "prm_config.json").is_file()
    again = ImplicitPRM.from_dir(out, device="cpu")
    assert again.cfg == fitted.prm.cfg and again.ref_spec == "tiny"
    data = again.prepare(fitted.chats, fitted.outcomes, fitted.groups)
    assert_frame_equal(again.score(data).turns, fitted.prm.score(fitted.train).turns)
    with pytest.raises(ItpoError, match="not a PRM directory"):
        ImplicitPRM.from_dir(tmp_path)


def test_soft_labels_and_outcome_range(tiny_dir: Path) -> None:
    prm = ImplicitPRM.load("tiny", PRMConfig(label_range=(-1.0, 1.0)), device="cpu")
    chats = synthetic(1, seed=0)[0]
    data = prm.prepare(chats, [-1.0, -0.2, 0.6, 1.0])
    np.testing.assert_allclose(data.labels, [0.0, 0.4, 0.8, 1.0], atol=1e-7)
    assert data.outcomes.tolist() == [-1.0, -0.2, 0.6, 1.0]  # Norm-ITPO splits the outcome, not the label
    own = prm.prepare(chats, [0.0] * 4, labels=[0.1, 0.2, 0.3, 0.9])
    np.testing.assert_allclose(own.labels, [0.1, 0.2, 0.3, 0.9], atol=1e-7)
    with pytest.raises(ItpoError, match=r"in \[0, 1\]"):
        prm.prepare(chats, [0.0] * 4, labels=[0.0, 0.5, 1.5, 1.0])
