"""No wasted forwards (issue 14): π_0's and the collecting policy's log-probs kept beside a logs file
(itpo_batch.run.logprob_cache) equal what a round would compute, are refused when stale, and spare the
consuming round its π_0 forward and its old-log-prob recompute; the PRM's diagnostics come from its
scoring forward. Forwards are counted with hooks on the models."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from itpo_batch.credit.prm import ImplicitPRM, PRMConfig
from itpo_batch.data.io import write_parquet
from itpo_batch.data.validate import read_logs
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.rl.methods import METHODS, MethodConfig
from itpo_batch.rl.update import UpdateConfig, behaviour_logprobs, recompute_logprobs
from itpo_batch.run.arm_step import ArmSeeds, log_arm_step
from itpo_batch.run.evaluate import kl_to_reference
from itpo_batch.run.logprob_cache import LogsLogprobs, cache_key, cache_path, logs_logprobs, reference_dataset
from itpo_batch.sim.envs.base import load_task
from itpo_batch.sim.rollout import RolloutConfig, ScriptedPolicy, rollout

PRM_CFG, UPDATE_CFG = PRMConfig(), UpdateConfig(mini_batch=4)


@pytest.fixture(scope="module")
def pi0(tiny_dir: Path) -> torch.nn.Module:
    return load_model(str(tiny_dir), role="reference", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def moved(pi0) -> torch.nn.Module:
    """A policy a little away from π_0 (so that the KL is not zero)."""
    policy = copy.deepcopy(pi0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy


@pytest.fixture(scope="module")
def logs_file(tmp_path_factory: pytest.TempPathFactory, moved, tokenizer) -> Path:
    """8 scripted medical conversations whose first 6 carry ``moved``'s log-probs of every rendered assistant
    token as behaviour log-probs (what sampling them from ``moved`` records); the last 2 carry none.

    (Text sampled from the untrained tiny model rarely re-tokenises to the ids it was generated as, so its
    logs would cover no conversation; the experiment's SFT π_0 covers all of them.)"""
    cfg = RolloutConfig(n=8, group_size=4, seed=3)
    table = rollout(load_task("medical"), ScriptedPolicy(load_task("medical")), cfg, progress=False)
    rendered = render(
        table["messages"].to_pylist(), tokenizer, RenderConfig(overflow="truncate")
    ).conversations
    flat = recompute_logprobs(moved, rendered).tolist()
    behaviour, at = [], 0
    for j, r in enumerate(rendered):
        turns = r.turn_id[r.assistant_mask]
        values = flat[at : at + len(turns)]
        at += len(turns)
        behaviour.append(
            [[v for v, t in zip(values, turns, strict=True) if t == k] for k in range(r.n_turns)]
            if j < 6
            else None
        )
    column = pa.array(behaviour, type=table.schema.field("behavior_logprobs").type)
    table = table.set_column(table.schema.get_field_index("behavior_logprobs"), "behavior_logprobs", column)
    return write_parquet(table, tmp_path_factory.mktemp("logs") / "logs.parquet")


def count_forwards(model: torch.nn.Module, grad: bool | None = None) -> list[int]:
    """Forward calls of ``model`` (tokens each), only those with grad on (True) or off (False) if given."""
    seen: list[int] = []

    def hook(_m, args, kwargs, _out) -> None:
        if grad is None or torch.is_grad_enabled() == grad:
            seen.append(int(kwargs["input_ids"].numel()))

    model.register_forward_hook(hook, with_kwargs=True)
    return seen


def test_values_are_what_the_consuming_round_computes(pi0, moved, tokenizer, logs_file: Path) -> None:
    logs = read_logs([logs_file])
    values = logs_logprobs(moved, pi0, tokenizer, logs, PRM_CFG, UPDATE_CFG)
    data = reference_dataset(pi0, tokenizer, logs, PRM_CFG)  # what the PRM / outcome arm would run
    assert values.fits(data) and torch.equal(values.ref_logp, data.ref_logp)  # bit for bit
    old, used = behaviour_logprobs(moved, data.rendered, data.conversation_ids, logs.messages, UPDATE_CFG)
    assert torch.equal(values.policy_logp, old) and values.logged == used == 6
    # the KL scores the behaviour log-probs recorded while sampling, which equal a re-forward's
    forward = recompute_logprobs(moved, data.rendered)
    assert torch.allclose(values.policy_logp, forward, atol=1e-5)
    old_kl = kl_to_reference(moved, pi0, tokenizer, logs.chats())
    new_kl = values.kl()
    assert new_kl.keys() == old_kl.keys() and old_kl["policy/kl_pi0_k3"] > 1e-3
    for key in old_kl:
        assert new_kl[key] == pytest.approx(old_kl[key], rel=1e-3, abs=1e-6)


def test_pi0_itself_needs_no_second_forward(pi0, tokenizer, logs_file: Path) -> None:
    logs = read_logs([logs_file])
    seen = count_forwards(pi0)
    values = logs_logprobs(pi0, pi0, tokenizer, logs, PRM_CFG, UPDATE_CFG)
    data = reference_dataset(pi0, tokenizer, logs, PRM_CFG, values.ref_logp)  # given: π_0 is not run
    assert len(seen) == len(data.batches)  # one pass of π_0, for both roles
    offsets = values.offsets
    assert torch.equal(
        values.policy_logp[offsets[6] :], values.ref_logp[offsets[6] :]
    )  # not logged: π_0's own
    assert not torch.equal(values.policy_logp[: offsets[6]], values.ref_logp[: offsets[6]])  # logged: kept


def test_save_load_and_stale_keys(pi0, moved, tokenizer, logs_file: Path, tmp_path: Path) -> None:
    logs = read_logs([logs_file])
    values = logs_logprobs(moved, pi0, tokenizer, logs, PRM_CFG, UPDATE_CFG)
    key = cache_key(logs_file, "tiny", PRM_CFG, UPDATE_CFG)
    path = cache_path(logs_file)
    assert path.name == "logs.logprobs.safetensors"
    values.save(path, key)
    back = LogsLogprobs.load(path, key)
    assert back is not None and back.conversation_ids == values.conversation_ids
    assert torch.equal(back.ref_logp, values.ref_logp) and torch.equal(back.policy_logp, values.policy_logp)
    assert back.logged == values.logged and torch.equal(back.offsets, values.offsets)
    assert LogsLogprobs.load(path, cache_key(logs_file, "other-pi0", PRM_CFG, UPDATE_CFG)) is None
    assert (
        LogsLogprobs.load(path, cache_key(logs_file, "tiny", PRMConfig(batch_tokens=512), UPDATE_CFG)) is None
    )
    edited = tmp_path / "logs.parquet"
    edited.write_bytes(logs_file.read_bytes() + b"\n")  # other bytes: other logs
    assert LogsLogprobs.load(path, cache_key(edited, "tiny", PRM_CFG, UPDATE_CFG)) is None
    assert LogsLogprobs.load(tmp_path / "absent.safetensors", key) is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert LogsLogprobs.load(tmp_path / "junk.safetensors", key) is None


def _step(tiny_dir: Path, pi0, tokenizer, logs, cached: LogsLogprobs | None, method: str):
    """Round 1 of ``method`` from π_0 (fresh policy and PRM), counting the forwards of each model."""
    policy = load_model(str(tiny_dir), role="policy", dtype=torch.float32)
    spec = METHODS[method]
    prm = ImplicitPRM.load(str(tiny_dir), PRM_CFG) if spec.prm else None
    counts = {"pi0": count_forwards(pi0), "policy_no_grad": count_forwards(policy, grad=False)}
    if prm is not None:
        counts["prm_reference"] = count_forwards(prm.reference)
        counts["prm_no_grad"] = count_forwards(prm.model, grad=False)
    step = log_arm_step(spec, policy, tokenizer, logs, prm, pi0, MethodConfig(), UPDATE_CFG, prm_cfg=PRM_CFG,
                        seeds=ArmSeeds.of(0, method, 1), cached=cached)  # fmt: skip
    return step, {k: len(v) for k, v in counts.items()}


@pytest.mark.parametrize("method", ["itpo_norm", "outcome"])
def test_the_consuming_round_runs_neither_pi0_nor_a_recompute(
    tiny_dir: Path, pi0, tokenizer, logs_file: Path, method: str
) -> None:
    """Before (no kept values): π_0 once over the logs' buffers and the policy's recompute of the
    conversations the behaviour log-probs miss. After: neither; the PRM's diagnostics come from its one
    scoring forward. The round's metrics are the same (up to the recompute's float rounding)."""
    logs = read_logs([logs_file])
    kept = logs_logprobs(pi0, pi0, tokenizer, logs, PRM_CFG, UPDATE_CFG)  # round 0: π_0 collected them
    n_buffers = len(reference_dataset(pi0, tokenizer, logs, PRM_CFG, kept.ref_logp).batches)
    before, n_before = _step(tiny_dir, pi0, tokenizer, logs, None, method)
    after, n_after = _step(tiny_dir, pi0, tokenizer, logs, kept, method)
    pi0_key = "prm_reference" if method == "itpo_norm" else "pi0"
    assert n_before[pi0_key] == n_buffers and n_after[pi0_key] == 0
    assert n_after["policy_no_grad"] == 0  # only the update's own (grad) forwards
    assert n_before["policy_no_grad"] == (kept.logged < len(kept.conversation_ids))
    if method == "itpo_norm":
        assert n_before["prm_no_grad"] == n_after["prm_no_grad"] == n_buffers  # scoring = diagnostics
        assert "prm/pair_acc" in after.metrics
    assert after.metrics.keys() == before.metrics.keys()
    for key, value in before.metrics.items():
        if key != "update/seconds":
            assert after.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
