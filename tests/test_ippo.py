"""Iterative PPO policy step (itpo_batch.rl.ippo): logged states and Q rewards against plain loops, that only the
fresh reply is trained, group advantages, drops, that a reward signal is followed, and determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.core.seeds import derived_seed
from itpo_batch.credit.qfit import load_q
from itpo_batch.credit.qvalue import QConfig, build_data, predict
from itpo_batch.data.validate import read_logs
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.packing import flat_offsets
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.rl import ippo
from itpo_batch.rl.ippo import IPPOConfig, iterative_ppo_step, logged_states, q_rewards
from itpo_batch.rl.update import UpdateConfig, only_last_turn, recompute_logprobs
from tests.logs_factory import nested_rows, write

SMALL = dict(max_states=4, samples_per_state=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory):
    """6 conversations with 1-3 assistant turns (12 states), behind a system prompt."""
    return read_logs([write(nested_rows(6), tmp_path_factory.mktemp("ippo") / "logs.parquet")])


@pytest.fixture(scope="module")
def models(tiny_dir: Path):
    """(policy, tokenizer, Q model with a fresh head, QConfig); tests that train take a deepcopy of the policy."""
    policy = load_model(str(tiny_dir), role="policy", dtype=torch.float32)
    q_cfg = QConfig(model=str(tiny_dir))
    q_model, _ = load_q(q_cfg, device="cpu")
    return policy, load_tokenizer(str(tiny_dir)), q_model, q_cfg


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _loop_states(logs) -> list[tuple[str, int, list[dict]]]:
    out = []
    for cid, chat in zip(logs.conversations["conversation_id"], logs.chats(), strict=True):
        turn = 0
        for i, m in enumerate(chat):
            if m["role"] == "assistant":
                out.append((cid, turn, chat[:i]))
                turn += 1
    return out


# ------------------------------------------------------------------------------------ states and Q rewards


def test_logged_states_match_plain_loop(logs) -> None:
    ref = _loop_states(logs)
    states, frame = logged_states(logs, None, seed=0)
    assert len(states) == len(ref) == 12
    assert [(c, t) for c, t, _ in ref] == list(zip(frame["conversation_id"], frame["turn"], strict=True))
    assert states == [s for _, _, s in ref]
    assert all(s[-1]["role"] == "user" for s in states)
    sub, sub_frame = logged_states(logs, 5, seed=3)
    assert len(sub) == sub_frame.height == 5
    keys = [(c, t) for c, t, _ in ref]
    picked = [keys.index(k) for k in zip(sub_frame["conversation_id"], sub_frame["turn"], strict=True)]
    assert picked == sorted(picked)  # a subset, in log order
    assert all(sub[j] == ref[i][2] for j, i in enumerate(picked))
    again, again_frame = logged_states(logs, 5, seed=3)
    assert again == sub and again_frame.equals(sub_frame)
    assert not logged_states(logs, 5, seed=4)[1].equals(sub_frame)
    assert logged_states(logs, 50, seed=0)[1].equals(frame)


def test_q_rewards_match_per_chat_predict(logs, models) -> None:
    _, tok, q_model, q_cfg = models
    chats = logs.chats()
    ids = logs.conversations["conversation_id"].to_list()
    got = q_rewards(q_model, q_cfg, tok, chats, ids)
    expected = [
        predict(q_model, build_data([c], [0.0], [i], tok, q_cfg), q_cfg).sort("turn")["q_value"][-1]
        for c, i in zip(chats, ids, strict=True)
    ]
    assert got.dtype == torch.float32 and got.shape == (len(chats),)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    longest = max(len(r) for r in render(chats, tok, RenderConfig()).conversations)
    with pytest.raises(ItpoError, match="do not fit"):  # overflow='truncate' in the config is not used
        q_rewards(q_model, QConfig(model=q_cfg.model, max_length=longest - 1), tok, chats, ids)


# ------------------------------------------------------------------------------------------- the step


def test_step_trains_only_the_fresh_reply(logs, models, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, tok, q_model, q_cfg = models
    seen = {}
    real = ippo.update_policy

    def spy(model, data, cfg, on_step=None, seed=0):
        seen["data"], seen["cfg"], seen["seed"] = data, cfg, seed
        return real(model, data, cfg, on_step, seed)

    monkeypatch.setattr(ippo, "update_policy", spy)
    trained = copy.deepcopy(policy)
    cfg = IPPOConfig(**SMALL, kl_coef=0.02, kl_budget=0.5)
    res = iterative_ppo_step(trained, tok, q_model, q_cfg, logs, cfg, seed=1)
    assert res.samples.height == 4 * 2 == res.metrics["ippo/samples"]
    assert res.metrics["ippo/states"] == 4 and res.samples["kept"].all()
    assert not torch.equal(_flat_params(trained), _flat_params(policy))
    data, upd = seen["data"], seen["cfg"]
    assert upd.loss.kl_coef == 0.02 and upd.kl_budget == 0.5
    assert seen["seed"] == derived_seed(1, "update")  # one derivation for every stream
    assert data.ref_logp is data.old_logp  # the KL anchor is π_{k-1}
    assert torch.allclose(data.old_logp, recompute_logprobs(policy, data.rendered), atol=1e-5)
    for r, reply in zip(data.rendered, res.samples["response"], strict=True):
        assert r.n_turns == 1
        trained_text = tok.decode(r.input_ids[r.assistant_mask])
        assert trained_text == reply + "<|end|>"  # exactly the fresh reply and its stop token
        assert int(r.assistant_mask.sum()) < int((r.input_ids >= 0).sum())


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "rloo_once"])
def test_group_advantages_per_state(logs, models, estimator: str) -> None:
    """Unwhitened advantages are the group z-score (grpo) or the leave-one-out difference (rloo*) of Q."""
    policy, tok, q_model, q_cfg = models
    cfg = IPPOConfig(max_states=3, samples_per_state=3, max_new_tokens=6, estimator=estimator, whiten=False)
    res = iterative_ppo_step(copy.deepcopy(policy), tok, q_model, q_cfg, logs, cfg, seed=2)
    for (_,), g in res.samples.group_by(["group"]):
        q = g["q_value"].to_numpy().astype(np.float64)
        if estimator == "grpo":
            expected = (q - q.mean()) / (q.std(ddof=1) + 1e-6)
        else:
            expected = np.array([q[i] - np.delete(q, i).mean() for i in range(len(q))])
        assert np.allclose(g["advantage"].to_numpy(), expected, atol=1e-4)
        assert abs(g["advantage"].mean()) < 1e-4


def test_overlong_samples_are_dropped_from_both(logs, models) -> None:
    """A Q context shorter than the later states drops those samples for the policy and for Q alike."""
    policy, tok, q_model, q_cfg = models
    limit = 48
    cfg = IPPOConfig(max_states=None, samples_per_state=2, max_new_tokens=6)
    short_q = QConfig(model=q_cfg.model, max_length=limit)
    res = iterative_ppo_step(copy.deepcopy(policy), tok, q_model, short_q, logs, cfg, seed=0)
    states, _ = logged_states(logs, None, seed=0)
    chats = [
        [*states[g], {"role": "assistant", "content": r}]
        for g, r in res.samples.select("group", "response").rows()
    ]
    lengths = np.array([len(render([c], tok).conversations[0]) for c in chats])
    kept = res.samples["kept"].to_numpy()
    assert np.array_equal(kept, lengths <= limit) and 0 < kept.sum() < len(kept)
    assert res.samples.filter(~pl.col("kept"))["q_value"].is_null().all()
    assert res.metrics["update/conversations"] == kept.sum() == res.metrics["ippo/kept"]


def test_reward_sign_is_followed(logs, models, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reward +1 when a reply's first token id is even, else −1: after the step the rewarded replies have
    gained log-likelihood relative to the others.

    One step, not three: after two more steps on other samples the gap of the first step's replies fell to
    0.47-3.18 over 16 seeds (1.12 at seed 0), while with no reward at all it drifts over -1.16..0.85, so no
    threshold separated the two. After one step: 4.31/6.13/7.53 (min/median/max of 48 fits: seeds 0-15 x
    weights as loaded or with 2 draws of 1e-6 relative noise, another CPU's rounding; 5.96 at seed 0, also
    at 2 threads) against -1.09..0.71 with no reward (12 seeds); 2.0 is below half the minimum."""
    policy, tok, _, q_cfg = models

    def parity_q(q_model, q_cfg, tokenizer, chats, ids):
        first = [tokenizer(c[-1]["content"], add_special_tokens=False)["input_ids"][0] for c in chats]
        return torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in first])

    monkeypatch.setattr(ippo, "q_rewards", parity_q)
    trained = copy.deepcopy(policy)
    cfg = IPPOConfig(
        max_states=4, samples_per_state=4, max_new_tokens=8, kl_budget=None, update=UpdateConfig(lr=1e-3)
    )
    first = iterative_ppo_step(trained, tok, None, q_cfg, logs, cfg, seed=0).samples
    states, _ = logged_states(logs, 4, seed=derived_seed(0, "states"))  # the states step seed=0 drew
    chats = [
        [*states[g], {"role": "assistant", "content": r}] for g, r in first.select("group", "response").rows()
    ]
    rendered = [only_last_turn(r) for r in render(chats, tok).conversations]
    offsets = flat_offsets(rendered)

    def seq_logp(model) -> np.ndarray:
        lp = recompute_logprobs(model, rendered)
        return np.array([float(lp[offsets[i] : offsets[i + 1]].sum()) for i in range(len(rendered))])

    gain = seq_logp(trained) - seq_logp(policy)
    good = first["q_value"].to_numpy() > 0
    assert 0 < good.sum() < len(good)
    assert gain[good].mean() > gain[~good].mean() + 2.0


def test_same_seed_same_metrics(logs, models) -> None:
    policy, tok, q_model, q_cfg = models
    cfg = IPPOConfig(**SMALL)
    runs = [
        iterative_ppo_step(copy.deepcopy(policy), tok, q_model, q_cfg, logs, cfg, seed=5) for _ in range(2)
    ]
    metrics = [{k: v for k, v in r.metrics.items() if not k.endswith("seconds")} for r in runs]
    assert metrics[0] == metrics[1]
    assert runs[0].samples.equals(runs[1].samples)
    other = iterative_ppo_step(copy.deepcopy(policy), tok, q_model, q_cfg, logs, cfg, seed=6)
    assert not other.samples.equals(runs[0].samples)


def test_config_rejects_ppo_and_greedy() -> None:
    with pytest.raises(ItpoError, match="ppo"):
        IPPOConfig(estimator="ppo")
    with pytest.raises(ItpoError, match="temperature"):
        IPPOConfig(temperature=0.0)
    with pytest.raises(ItpoError, match="max_states"):
        IPPOConfig(max_states=0)
