"""Rollout engine: table shape and validation, groups, determinism, shrinking batches, behaviour log-probs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itpo_batch.data.validate import read_logs
from itpo_batch.model.generation import Generation, SamplingConfig, generate, render_prompts
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.sim.envs.base import Episode
from itpo_batch.sim.rollout import (
    HFPolicy,
    Policy,
    RolloutConfig,
    ScriptedPolicy,
    collect,
    records_to_table,
    rollout,
)
from tests.toy_task import GuessTask

EOS_BOOST = 5.0  # makes the untrained tiny model stop now and then (it almost never samples eos otherwise)


@pytest.fixture(scope="module")
def tiny_policy(tiny_dir: Path):
    """The tiny model with a bias towards eos (a forward hook), so turns of every length occur."""
    tok = load_tokenizer("tiny", padding_side="left")
    model = load_model("tiny", "reference")
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = EOS_BOOST
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    return model, tok


def _hf_cfg(**kw) -> RolloutConfig:
    base = dict(n=10, group_size=4, seed=3, batch_size=6, max_new_tokens=12)
    return RolloutConfig(**{**base, **kw})


def _validated(table: pa.Table, tmp_path: Path, name: str = "logs.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return read_logs([path])


def test_scripted_rollout_passes_validation_and_groups(tmp_path: Path) -> None:
    task, cfg = GuessTask(), RolloutConfig(n=20, group_size=8, seed=1, batch_size=7, skill=0.6)
    records = collect(task, ScriptedPolicy(task, cfg.skill), cfg, progress=False)
    table = records_to_table(records, task, ScriptedPolicy(task, cfg.skill), cfg)
    logs = _validated(table, tmp_path)
    assert logs.report.ok and logs.conversations.height == 20
    assert table["conversation_id"][0].as_py() == "guess-s1-g00000-m00"
    assert table["conversation_id"][19].as_py() == "guess-s1-g00002-m03"
    groups = table["group_id"].to_pylist()
    assert [groups.count(g) for g in sorted(set(groups))] == [8, 8, 4]
    for g in set(groups):  # one hidden case per group
        assert len({r.episode.case for r in records if r.group_id == g}) == 1
    assert table["behavior_logprobs"].null_count == 20
    for row in table.to_pylist():
        n_asst = sum(m["role"] == "assistant" for m in row["messages"])
        meta = json.loads(row["metadata"])
        assert len(row["oracle_turn_utility"]) == n_asst == meta["n_turns"]
        assert meta["policy"] == "scripted" and meta["skill"] == 0.6 and meta["seed"] == 1
        assert row["outcome"] == pytest.approx(max(-1.0, min(1.0, meta["score"] + meta["cost"])))
    assert len(set(table["outcome"].to_pylist())) > 1  # skill 0.6 gives varied outcomes


def test_scripted_rollout_is_deterministic_per_seed() -> None:
    task = GuessTask()
    cfg = RolloutConfig(n=16, group_size=4, seed=5, batch_size=5)
    a = rollout(task, ScriptedPolicy(task), cfg, progress=False)
    b = rollout(task, ScriptedPolicy(task), cfg, progress=False)
    c = rollout(
        task, ScriptedPolicy(task), RolloutConfig(n=16, group_size=4, seed=6, batch_size=5), progress=False
    )
    assert a.equals(b)
    assert a["messages"].to_pylist() != c["messages"].to_pylist()
    # a conversation does not depend on the chunk it ran in (scripted policy and users use episode rngs)
    d = rollout(
        task, ScriptedPolicy(task), RolloutConfig(n=16, group_size=4, seed=5, batch_size=16), progress=False
    )
    assert a["messages"].to_pylist() == d["messages"].to_pylist()


class CountingPolicy(Policy):
    """Records the batch size of every call; replies with the wrapped policy or a fixed text."""

    name = "counting"

    def __init__(self, inner: Policy | None = None, text: str = "x"):
        self.inner, self.text, self.sizes = inner, text, []

    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        self.sizes.append(len(episodes))
        if self.inner is not None:
            return self.inner.act(episodes, seed)
        return [Generation(self.text, [], [], True) for _ in episodes]


def test_batches_shrink_and_nothing_is_generated_for_finished_conversations() -> None:
    task = GuessTask()
    cfg = RolloutConfig(n=12, group_size=4, seed=2, batch_size=6, skill=0.5)
    policy = CountingPolicy(ScriptedPolicy(task, cfg.skill))
    records = collect(task, policy, cfg, progress=False)
    total_turns = sum(len(r.episode.utilities) for r in records)
    assert sum(policy.sizes) == total_turns
    assert policy.sizes[0] == 6 and min(policy.sizes) < 6
    chunks, current = [], []
    for s in policy.sizes:  # a new chunk starts at full size
        if current and s == 6:
            chunks.append(current)
            current = []
        current.append(s)
    chunks.append(current)
    assert len(chunks) == 2 and all(c == sorted(c, reverse=True) for c in chunks)


def test_blank_reply_is_logged_as_placeholder(tmp_path: Path) -> None:
    task = GuessTask()
    cfg = RolloutConfig(n=3, group_size=3, empty_reply="(no reply)")
    policy = CountingPolicy(text=" \n ")
    table = records_to_table(collect(task, policy, cfg, progress=False), task, policy, cfg)
    row = table.to_pylist()[0]
    asst = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert asst == ["(no reply)"] * 5  # never commits: max_assistant_turns
    assert json.loads(row["metadata"])["n_empty_replies"] == 5
    assert _validated(table, tmp_path).report.ok


def test_hf_rollout_is_deterministic_and_valid(tiny_policy, tmp_path: Path) -> None:
    model, tok = tiny_policy
    task, cfg = GuessTask(), _hf_cfg()
    a = rollout(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    b = rollout(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    assert a.equals(b)
    c = rollout(task, HFPolicy(model, tok, _hf_cfg(seed=4)), _hf_cfg(seed=4), progress=False)
    assert a["behavior_logprobs"].to_pylist() != c["behavior_logprobs"].to_pylist()
    logs = _validated(a, tmp_path)
    assert logs.report.ok and logs.conversations.height == cfg.n
    meta = json.loads(a["metadata"][0].as_py())
    assert meta["policy"] == "hf" and meta["temperature"] == 1.0 and meta["max_new_tokens"] == 12
    assert not model.training  # generation restored the model's mode (it was loaded frozen)


def test_hf_behaviour_logprob_shapes(tiny_policy) -> None:
    model, tok = tiny_policy
    task, cfg = GuessTask(), _hf_cfg(n=12, seed=7)
    records = collect(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    table = records_to_table(records, task, HFPolicy(model, tok, cfg), cfg)
    lengths = set()
    for rec, row in zip(records, table.to_pylist(), strict=True):
        n_asst = sum(m["role"] == "assistant" for m in row["messages"])
        assert len(row["behavior_logprobs"]) == len(rec.token_ids) == n_asst
        for ids, lps in zip(rec.token_ids, row["behavior_logprobs"], strict=True):
            assert len(ids) == len(lps) >= 1 and all(lp <= 0 for lp in lps)
            assert tok.eos_token_id not in ids[:-1]  # cut right after the first eos
            assert ids[-1] == tok.eos_token_id or len(ids) == cfg.max_new_tokens
            lengths.add(len(ids))
        meta = json.loads(row["metadata"])
        assert meta["n_generated_tokens"] == sum(len(t) for t in rec.token_ids)
        ends = [ids[-1] == tok.eos_token_id for ids in rec.token_ids]
        assert meta["n_truncated_turns"] == ends.count(False)
    assert cfg.max_new_tokens in lengths and min(lengths) < cfg.max_new_tokens  # both kinds of turn occur


def _reference_logprobs(model, tok, messages: list[dict], ids: list[int], temperature: float) -> torch.Tensor:
    """Plain loop: one unpadded forward per token prefix would be slowest; one per turn is enough."""
    prompt = render_prompts(tok, [messages])[0]
    full = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(full).logits[0].float() / temperature
    out = []
    for j, t in enumerate(ids):
        out.append(torch.log_softmax(logits[len(prompt) - 1 + j], dim=-1)[t])
    return torch.stack(out)


def test_behaviour_logprobs_match_a_recomputed_forward_pass(tiny_policy) -> None:
    model, tok = tiny_policy
    task, cfg = GuessTask(), _hf_cfg(n=8, seed=11, batch_size=8)
    records = collect(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    checked = 0
    for rec in records:
        msgs = rec.episode.messages
        positions = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for pos, ids, lps in zip(positions, rec.token_ids, rec.logprobs, strict=True):
            ref = _reference_logprobs(model, tok, msgs[:pos], ids, 1.0)
            torch.testing.assert_close(torch.tensor(lps, dtype=torch.float32), ref, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 8


def test_logprobs_are_untruncated_tempered_and_rng_is_isolated(tiny_policy) -> None:
    """T=0.7, top_p=0.8: the recorded values are log_softmax(logits/0.7) over the full vocabulary (this
    fails if the recorder ran after transformers' temperature or top-p warpers)."""
    model, tok = tiny_policy
    convs = [[{"role": "user", "content": f"hello number {i}"}] for i in range(4)]
    state = torch.get_rng_state()
    gens = generate(model, tok, convs, SamplingConfig(0.7, 0.8, 10), seed=123)
    assert torch.equal(state, torch.get_rng_state())
    again = generate(model, tok, convs, SamplingConfig(0.7, 0.8, 10), seed=123)
    assert [g.token_ids for g in gens] == [g.token_ids for g in again]
    for conv, g in zip(convs, gens, strict=True):
        ref = _reference_logprobs(model, tok, conv, g.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float32), ref, atol=1e-4, rtol=1e-4)
    greedy = generate(model, tok, convs, SamplingConfig(0.0, 1.0, 10), seed=1)
    other = generate(model, tok, convs, SamplingConfig(0.0, 1.0, 10), seed=2)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in other]
    for conv, g in zip(convs, greedy, strict=True):  # greedy records temperature-1 log-probs
        ref = _reference_logprobs(model, tok, conv, g.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float32), ref, atol=1e-4, rtol=1e-4)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        RolloutConfig(n=0)
    with pytest.raises(ValueError):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError):
        RolloutConfig(empty_reply="  ")


def test_sampling_is_not_truncated_by_default_top_k(tiny_policy) -> None:
    """transformers' global default top_k is 50; with top_p=1 every token must stay reachable. The
    untrained tiny model's next-token distribution is nearly flat, so samples far below rank 50 occur."""
    model, tok = tiny_policy
    convs = [[{"role": "user", "content": f"tell me about item {i}"}] for i in range(8)]
    gens = generate(model, tok, convs, SamplingConfig(1.0, 1.0, 12), seed=5)
    ranks = []
    for conv, g in zip(convs, gens, strict=True):
        prompt = render_prompts(tok, [conv])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1 : -1]
        chosen = logits.gather(1, torch.tensor(g.token_ids)[:, None])
        ranks += (logits > chosen).sum(dim=1).tolist()
    assert max(ranks) > 50


class FixedTokensPolicy(Policy):
    """Replies 'hello world' as given token ids; canonical=False spells it one character at a time."""

    name = "fixed"

    def __init__(self, tokenizer, canonical: bool):
        self.tokenizer, self.canonical = tokenizer, canonical

    @property
    def has_logprobs(self) -> bool:
        return True

    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        text = "hello world"
        chars = [self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(c))[0] for c in text]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.canonical else chars
        ids = [*ids, self.tokenizer.eos_token_id]
        return [Generation(text, ids, [-1.0] * len(ids), True) for _ in episodes]


def test_retokenize_mismatch_counts_non_canonical_turns(tiny_tokenizer) -> None:
    task, cfg = GuessTask(), RolloutConfig(n=2, group_size=2)
    for canonical, expected in ((True, 0), (False, 5)):
        policy = FixedTokensPolicy(tiny_tokenizer, canonical)
        table = records_to_table(collect(task, policy, cfg, progress=False), task, policy, cfg)
        meta = json.loads(table["metadata"][0].as_py())
        assert meta["n_retokenize_mismatch"] == expected and meta["n_truncated_turns"] == 0
