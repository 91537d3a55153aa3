"""Turn Q-values (Iterative PPO critic): targets, read positions, split, Spearman, fitting, warm start.

Every vectorised piece is checked against a plain loop written from the definition.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.qfit import fit_q, load_q
from itpo_batch.credit.qvalue import (
    CONFIG_FILE,
    QConfig,
    build_data,
    fit,
    holdout_mask,
    init_head_bias,
    mc_returns,
    predict,
    q_metrics,
    read_turn_heads,
    turn_end_positions,
)
from itpo_batch.credit.stats import average_ranks, spearman
from itpo_batch.data.validate import read_logs
from itpo_batch.model.loading import load_model
from itpo_batch.model.packing import pack
from tests.logs_factory import write

CPU = torch.device("cpu")


GOOD = ["Do you have a fever?", "How long has the cough lasted?", "Any rash on the skin?"]
BAD = ["Take a painkiller and rest.", "It is probably nothing serious.", "Drink some water."]


def synthetic(n: int, seed: int = 0, noise: float = 0.1) -> tuple[list[list[dict]], list[float], list[str]]:
    """1-3 assistant turns; outcome 1 iff the assistant asks questions (GOOD), flipped w.p. ``noise``."""
    rng = random.Random(seed)
    chats, outcomes, ids = [], [], []
    for i in range(n):
        good, k = rng.random() < 0.5, rng.randint(1, 3)
        msgs = [{"role": "user", "content": "I feel unwell today."}]
        for t in range(k):
            msgs.append({"role": "assistant", "content": rng.choice(GOOD if good else BAD)})
            if t < k - 1:
                msgs.append({"role": "user", "content": "Yes, a little."})
        chats.append(msgs)
        outcomes.append(float(good != (rng.random() < noise)))
        ids.append(f"c{i}")
    return chats, outcomes, ids


# ------------------------------------------------------------------------------------------- targets


def loop_returns(outcome, n_turns, gamma, horizon=None):
    """Rewards 0 at every turn but the last logged one (= outcome); G_t = Σ_{u ≥ t} γ^(u−t) r_u."""
    rows = []
    for i, (r, n) in enumerate(zip(outcome, n_turns, strict=True)):
        total = n if horizon is None else horizon[i]
        rewards = [0.0] * (total - 1) + [r] if total else []
        for t in range(n):
            rows.append((i, t, sum(gamma ** (u - t) * rewards[u] for u in range(t, total))))
    return rows


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
def test_mc_returns_match_loop(gamma: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n_turns = torch.tensor([1, 4, 0, 2, 6, 0, 1])  # single turns, many turns, no assistant turn
    outcome = torch.rand(7, generator=gen) * 2 - 0.5
    conv, turn, g = mc_returns(outcome, n_turns, gamma)
    ref = loop_returns(outcome.tolist(), n_turns.tolist(), gamma)
    assert list(zip(conv.tolist(), turn.tolist(), strict=True)) == [(i, t) for i, t, _ in ref]
    assert g.tolist() == pytest.approx([v for _, _, v in ref], abs=1e-12)
    assert 2 not in conv.tolist() and 5 not in conv.tolist()


def test_mc_returns_truncated_turns_keep_their_discount() -> None:
    outcome, n_turns, horizon = torch.tensor([1.0, 2.0]), torch.tensor([2, 1]), torch.tensor([4, 1])
    _, _, g = mc_returns(outcome, n_turns, 0.5, horizon)
    ref = loop_returns(outcome.tolist(), n_turns.tolist(), 0.5, horizon.tolist())
    assert g.tolist() == pytest.approx([v for _, _, v in ref]) == [0.125, 0.25, 2.0]
    with pytest.raises(ValueError, match="horizon"):
        mc_returns(outcome, n_turns, 0.5, torch.tensor([1, 1]))


def test_build_data_uses_the_logged_turn_count_after_truncation(tiny_tokenizer) -> None:
    chats, outcomes, ids = synthetic(6)
    full = build_data(chats, outcomes, ids, tiny_tokenizer, QConfig(gamma=0.5))
    cut = build_data(chats, outcomes, ids, tiny_tokenizer, QConfig(gamma=0.5, max_length=24))
    assert 0 < cut.target.shape[0] < full.target.shape[0]
    kept = {
        (c, t): g
        for c, t, g in zip(full.conv.tolist(), full.turn.tolist(), full.target.tolist(), strict=True)
    }
    for c, t, g in zip(cut.conv.tolist(), cut.turn.tolist(), cut.target.tolist(), strict=True):
        assert g == kept[(cut.rendered[c].index, t)]


# ------------------------------------------------------------------------------------ read positions


def loop_turn_ends(rendered) -> list[list[int]]:
    """Per conversation: the position of the last token of each assistant turn, by walking the tokens."""
    out = []
    for r in rendered:
        ends = {}
        for p in range(len(r)):
            if r.assistant_mask[p]:
                ends[int(r.turn_id[p])] = p
        out.append([ends[k] for k in range(r.n_turns)])
    return out


def test_read_positions_are_turn_ends_and_packed_matches_per_sequence(tiny_dir, tiny_tokenizer) -> None:
    chats, outcomes, ids = synthetic(9, seed=3)
    data = build_data(chats, outcomes, ids, tiny_tokenizer, QConfig())
    ends = loop_turn_ends(data.rendered)
    end_id = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert all(data.rendered[i].input_ids[p] == end_id for i, e in enumerate(ends) for p in e)
    model = load_model(tiny_dir, role="value", device="cpu", dtype=torch.float32)
    batches = pack(data.rendered, 150)  # several buffers of several conversations
    assert len(batches) > 1 and max(b.n_seqs for b in batches) > 1
    with torch.no_grad():
        for batch in batches:
            starts = batch.cu_seqlens[:-1].long()
            expected = [int(starts[j]) + p for j, i in enumerate(batch.seq_index.tolist()) for p in ends[i]]
            assert turn_end_positions(batch).tolist() == expected
            raw, slot, turn = read_turn_heads(model, batch, CPU)
            alone = {  # per-sequence forwards through ValueModel.forward, read at the loop's positions
                j: model(input_ids=torch.as_tensor(data.rendered[i].input_ids)[None])[0][ends[i]]
                for j, i in enumerate(batch.seq_index.tolist())
            }
            expected_q = torch.stack([alone[j][t] for j, t in zip(slot.tolist(), turn.tolist(), strict=True)])
            torch.testing.assert_close(raw, expected_q, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- split


def test_holdout_split_is_by_conversation_deterministic_and_sized() -> None:
    ids = [f"conv-{i}" for i in range(4000)]
    mask = holdout_mask(ids, 0.2, seed=7)
    assert 0.18 < mask.mean() < 0.22
    assert (holdout_mask(ids, 0.2, seed=7) == mask).all()
    subset = ids[::-3]  # another order and subset: each conversation keeps its split
    assert (holdout_mask(subset, 0.2, seed=7) == mask[::-3]).all()
    assert (holdout_mask(ids, 0.2, seed=8) != mask).any()
    assert not holdout_mask(ids, 0.0, seed=7).any()


def test_all_turns_of_a_conversation_share_the_split(tiny_tokenizer) -> None:
    chats, outcomes, ids = synthetic(40)
    data = build_data(chats, outcomes, ids, tiny_tokenizer, QConfig(holdout=0.5))
    assert data.holdout.tolist() == holdout_mask(ids, 0.5, 0).tolist()
    turn_split = data.holdout[data.conv]
    for c in range(len(data.rendered)):
        assert len(set(turn_split[data.conv == c].tolist())) == 1


# ------------------------------------------------------------------------------------------ spearman


def loop_spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        return [1 + sum(b < a for b in v) + (sum(b == a for b in v) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den


def test_spearman_matches_loop_with_ties() -> None:
    gen = torch.Generator().manual_seed(1)
    for n in (2, 5, 37):
        x = torch.randint(0, 4, (n,), generator=gen).double()  # many ties
        y = x + torch.randint(0, 3, (n,), generator=gen).double()
        if x.unique().numel() == 1 or y.unique().numel() == 1:
            continue
        assert spearman(x, y) == pytest.approx(loop_spearman(x.tolist(), y.tolist()), abs=1e-12)
    x = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0])
    assert average_ranks(x).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.ones(4), torch.arange(4.0)) == 0.0  # a constant ranks nothing
    with pytest.raises(ValueError, match="non-finite"):
        spearman(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------------------- fitting


def test_fit_learns_a_word_dependent_outcome(tiny_dir, tiny_tokenizer) -> None:
    cfg = QConfig(model=str(tiny_dir), epochs=3, batch_tokens=256)
    data = build_data(*synthetic(80), tiny_tokenizer, cfg)
    model = load_model(tiny_dir, role="value", device="cpu", dtype=torch.float32)
    init_head_bias(model, data, cfg)
    steps: list[int] = []
    history = fit(model, data, cfg, on_step=lambda s, total, loss: steps.append(total))
    assert len(steps) == steps[0] and len(history) == 3
    m = q_metrics(predict(model, data, cfg))
    assert m["q/holdout_turns"] > 10
    # holdout mse / baseline over 32 fits (data and shuffle seeds 0-7 x weights as loaded or with 3 draws of
    # 1e-6 relative noise, another CPU's rounding; seeds 0-2 at 2 threads agree to 1e-3): min 0.03, median
    # 0.22, max 0.55 (seed 0: 0.36); an unfitted model (lr 0, 8 seeds) 0.95-0.97. 0.75 sits between the two.
    assert m["q/holdout_mse"] < 0.75 * m["q/baseline_holdout_mse"]
    # Spearman: the learning check is the mse above (the unfitted model already ranks 0.57-0.87); fitted:
    # min 0.44, median 0.77, max 0.87 (seed 0: 0.72-0.76, rounding alone moves it by 0.05)
    assert m["q/holdout_spearman"] > 0.2 and m["q/baseline_holdout_spearman"] == 0.0
    assert m["q/train_mse"] < m["q/baseline_holdout_mse"]


def test_fit_q_saves_and_warm_start_reproduces_predictions(tmp_path: Path, tiny_dir) -> None:
    chats, outcomes, ids = synthetic(12, seed=5)
    rows = [
        {"conversation_id": c, "messages": m, "outcome": o}
        for c, m, o in zip(ids, chats, outcomes, strict=True)
    ]
    logs = read_logs([write(rows, tmp_path / "logs.parquet")])
    cfg = QConfig(model=str(tiny_dir), epochs=1, holdout=0.3)
    res = fit_q(logs, cfg, out_dir=tmp_path / "q", device="cpu")
    pred = res.predictions
    assert pred.height == sum(sum(m["role"] == "assistant" for m in c) for c in chats)
    assert pred["conversation_id"].to_list() == [ids[i] for i in pred["conversation_index"].to_list()]
    meta = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert meta["config"]["epochs"] == 1 and "q/holdout_mse" in meta["metrics"]
    warm = QConfig(model="unused", warm_start=str(tmp_path / "q"), epochs=1, holdout=0.3)
    model, _ = load_q(warm, device="cpu")
    assert predict(model, res.data, warm)["q_value"].to_list() == pred["q_value"].to_list()
    with pytest.raises(ItpoError, match="not a Q directory"):
        load_q(QConfig(warm_start=str(tiny_dir)), device="cpu")
    with pytest.raises(ItpoError, match="loss='mse'"):
        load_q(QConfig(warm_start=str(tmp_path / "q"), loss="bce"), device="cpu")


def test_fit_never_reads_held_out_targets(tiny_dir, tiny_tokenizer) -> None:
    cfg = QConfig(model=str(tiny_dir), epochs=1, holdout=0.4)
    weights = []
    for poison in (False, True):
        data = build_data(*synthetic(16, seed=4), tiny_tokenizer, cfg)
        if poison:
            data.target[data.holdout[data.conv]] = 1e6
        model = load_model(tiny_dir, role="value", device="cpu", dtype=torch.float32)
        fit(model, data, cfg)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert bool(data.holdout.any()) and torch.equal(weights[0], weights[1])


def test_q_metrics_match_a_loop() -> None:
    pred = pl.DataFrame(
        {
            "conversation_index": [0, 0, 1, 2, 2, 3],
            "q_value": [0.2, 0.4, 0.9, 0.1, 0.1, 0.7],
            "mc_return": [0.0, 1.0, 1.0, 0.0, 0.5, 1.0],
            "holdout": [False, False, True, True, True, False],
        }
    )
    m = q_metrics(pred)
    rows = pred.rows(named=True)
    train = [r for r in rows if not r["holdout"]]
    held = [r for r in rows if r["holdout"]]
    base = sum(r["mc_return"] for r in train) / len(train)
    assert m["q/baseline_value"] == pytest.approx(base)
    assert m["q/train_mse"] == pytest.approx(sum((r["q_value"] - r["mc_return"]) ** 2 for r in train) / 3)
    assert m["q/holdout_mse"] == pytest.approx(sum((r["q_value"] - r["mc_return"]) ** 2 for r in held) / 3)
    assert m["q/baseline_holdout_mse"] == pytest.approx(sum((base - r["mc_return"]) ** 2 for r in held) / 3)
    expected = loop_spearman([r["q_value"] for r in held], [r["mc_return"] for r in held])
    assert m["q/holdout_spearman"] == pytest.approx(expected)
    assert (m["q/holdout_turns"], m["q/holdout_conversations"], m["q/train_turns"]) == (3, 2, 3)


def test_bce_mode_predicts_probabilities(tiny_dir, tiny_tokenizer) -> None:
    cfg = QConfig(model=str(tiny_dir), loss="bce", epochs=1, gamma=0.8)
    data = build_data(*synthetic(16, seed=2), tiny_tokenizer, cfg)
    model = load_model(tiny_dir, role="value", device="cpu", dtype=torch.float32)
    init_head_bias(model, data, cfg)
    fit(model, data, cfg)
    q = predict(model, data, cfg)["q_value"]
    assert q.is_between(0.0, 1.0).all() and q.n_unique() > 1
    chats, _, ids = synthetic(4)
    with pytest.raises(ItpoError, match=r"\[0, 1\]"):
        build_data(chats, [2.0] * 4, ids, tiny_tokenizer, cfg)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ItpoError, match="gamma"):
        QConfig(gamma=1.5)
    with pytest.raises(ItpoError, match="loss"):
        QConfig(loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ItpoError, match="holdout"):
        QConfig(holdout=1.0)
