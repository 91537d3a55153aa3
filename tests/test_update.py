"""Policy update (itpo_batch.rl.update): micro-batch × accumulation equivalence, behaviour log-probs pairing,
last-turn masks, the KL budget and that positive advantages raise the trained turns' likelihood."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.rl.update import (
    UpdateConfig,
    UpdateData,
    _micro_losses,
    behaviour_logprobs,
    flat_offsets,
    old_logprobs,
    only_last_turn,
    recompute_logprobs,
    retokenized,
    update_policy,
)

CHATS = [
    [
        {"role": "user", "content": "I have a fever."},
        {"role": "assistant", "content": "Do you have a cough?"},
        {"role": "user", "content": "Yes, a dry cough."},
        {"role": "assistant", "content": "It is the flu."},
    ],
    [{"role": "user", "content": "My head hurts."}, {"role": "assistant", "content": "Since when?"}],
    [
        {"role": "user", "content": "Rash on my arm."},
        {"role": "assistant", "content": "Is it itchy?"},
        {"role": "user", "content": "Very."},
        {"role": "assistant", "content": "Any new soap?"},
        {"role": "user", "content": "No."},
        {"role": "assistant", "content": "It is eczema."},
    ],
]


@pytest.fixture()
def setup(tiny_dir: Path):
    tok = load_tokenizer(str(tiny_dir))
    rendered = render(CHATS, tok, RenderConfig()).conversations
    model = load_model(str(tiny_dir), role="policy", dtype=torch.float32)
    return model, tok, rendered


def _data(model, rendered, seed: int = 0, with_ref: bool = True) -> UpdateData:
    offsets = flat_offsets(rendered)
    old = recompute_logprobs(model, rendered)
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(int(offsets[-1]), generator=g)
    ref = old + 0.1 * torch.randn(old.shape, generator=g) if with_ref else None
    return UpdateData(rendered, adv, old, offsets, ref)


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_micro_batches_accumulate_to_the_full_batch(setup) -> None:
    """Gradients of one mini-batch: one buffer vs one buffer per conversation (Adam's first step is ~sign(g),
    so the gradients, not the updated weights, are compared)."""
    model, _, rendered = setup
    data = _data(model, rendered)
    which = torch.arange(len(rendered))
    grads, losses = [], []
    for batch_tokens in (4096, 1):
        m = copy.deepcopy(model)
        parts = _micro_losses(m, data, which, UpdateConfig(batch_tokens=batch_tokens))
        assert len(parts) == (1 if batch_tokens == 4096 else len(rendered))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        losses.append(sum(float(p[0]) for p in parts))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert float(grads[0].abs().max()) > 0
    moved = copy.deepcopy(model)
    assert update_policy(moved, data, UpdateConfig(mini_batch=3))["update/steps"] == 1
    assert not torch.allclose(_flat_params(moved), _flat_params(model))


def test_first_step_loss_is_minus_mean_advantage_plus_terms(setup) -> None:
    """At ratio 1 the pg loss is −(seq-mean-token-mean of A): checked against a plain loop."""
    model, _, rendered = setup
    data = _data(model, rendered, with_ref=False)
    cfg = UpdateConfig(mini_batch=3, epochs=1)
    cfg.loss.entropy_coef = 0.0
    metrics = update_policy(copy.deepcopy(model), data, cfg)
    expected = -np.mean(
        [float(data.advantages[data.offsets[j] : data.offsets[j + 1]].mean()) for j in range(len(rendered))]
    )
    assert metrics["update/pg_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["update/approx_kl"] == pytest.approx(0.0, abs=1e-5)


def test_positive_advantage_raises_likelihood(setup) -> None:
    model, _, rendered = setup
    offsets = flat_offsets(rendered)
    old = recompute_logprobs(model, rendered)
    data = UpdateData(rendered, torch.ones(int(offsets[-1])), old, offsets, None)
    trained = copy.deepcopy(model)
    update_policy(trained, data, UpdateConfig(lr=1e-3, epochs=3, mini_batch=1))
    new = recompute_logprobs(trained, rendered)
    # gains measured +50.56 and -45.18 nats here with weights as loaded or with 1e-6 relative noise (another
    # CPU's rounding) at 1 and 2 threads, spread < 1e-3; shuffled orders (seeds 0-7) 48.9-57.7 and 41.4-58.8
    assert float(new.sum()) > float(old.sum()) + 1.0
    data_neg = UpdateData(rendered, -torch.ones(int(offsets[-1])), old, offsets, None)
    lowered = copy.deepcopy(model)
    update_policy(lowered, data_neg, UpdateConfig(lr=1e-3, epochs=3, mini_batch=1))
    assert float(recompute_logprobs(lowered, rendered).sum()) < float(old.sum()) - 1.0


def test_kl_budget_stops_early(setup) -> None:
    model, _, rendered = setup
    offsets = flat_offsets(rendered)
    old = recompute_logprobs(model, rendered)
    data = UpdateData(rendered, torch.ones(int(offsets[-1])), old, offsets, None)
    free = update_policy(copy.deepcopy(model), data, UpdateConfig(lr=3e-3, epochs=4, mini_batch=1))
    capped = update_policy(
        copy.deepcopy(model), data, UpdateConfig(lr=3e-3, epochs=4, mini_batch=1, kl_budget=1e-3)
    )
    assert free["update/steps"] == 12 and free["update/early_stop"] == 0.0
    assert capped["update/steps"] < 12 and capped["update/early_stop"] == 1.0
    # the step of the mini-batch found past the budget is not taken: every step taken started within it
    # (stepping first, the last step's kl_old, 10-100x the budget here, lifted the mean above it)
    assert capped["update/kl_old"] <= 1e-3
    assert capped["update/steps"] >= 1  # the first step starts at the old policy (kl_old ~ 0)


def test_warmup_scales_the_first_steps_of_a_round(setup) -> None:
    """``warmup_steps``: step k (0-based) of a round's fresh AdamW runs at lr·(k+1)/warmup_steps. A fresh
    AdamW's first step is lr·m̂/(√v̂ + ε), linear in lr, so with 4 warm-up steps one step moves every weight
    a quarter as far as without (the plain-loop reference: the same step at lr/4)."""
    model, _, rendered = setup
    offsets = flat_offsets(rendered)
    old = recompute_logprobs(model, rendered)
    data = UpdateData(rendered, torch.ones(int(offsets[-1])), old, offsets, None)
    one = {"epochs": 1, "mini_batch": len(rendered), "eps": 1e-5}  # one optimiser step
    before = torch.cat([p.detach().flatten() for p in model.parameters()])

    def moved(cfg: UpdateConfig) -> torch.Tensor:
        trained = copy.deepcopy(model)
        assert update_policy(trained, data, cfg)["update/steps"] == 1
        return torch.cat([p.detach().flatten() for p in trained.parameters()]) - before

    warm, quarter = moved(UpdateConfig(lr=1e-3, warmup_steps=4, **one)), moved(UpdateConfig(lr=2.5e-4, **one))
    full = moved(UpdateConfig(lr=1e-3, **one))
    torch.testing.assert_close(warm, quarter, rtol=1e-5, atol=1e-9)
    assert float(warm.abs().max()) < 0.3 * float(full.abs().max())


def test_only_last_turn(setup) -> None:
    _, _, rendered = setup
    r = rendered[2]
    last = only_last_turn(r)
    assert last.n_turns == 1
    assert np.array_equal(last.assistant_mask, r.assistant_mask & (r.turn_id == 2))
    assert set(np.unique(last.turn_id)) == {-1, 0}
    assert np.array_equal(last.input_ids, r.input_ids)


def _messages(rendered, logged_lengths: dict[tuple[int, int], int]) -> pl.DataFrame:
    rows = []
    for j, r in enumerate(rendered):
        for k in range(r.n_turns):
            n = logged_lengths.get((j, k), int((r.turn_id == k).sum()))
            rows.append({"conversation_id": f"c{j}", "assistant_turn": k,
                         "behavior_logprobs": [-(j + 1) - 0.01 * i for i in range(n)]})  # fmt: skip
        rows.append({"conversation_id": f"c{j}", "assistant_turn": None, "behavior_logprobs": None})
    return pl.DataFrame(rows, schema={"conversation_id": pl.String, "assistant_turn": pl.Int32,
                                      "behavior_logprobs": pl.List(pl.Float64)})  # fmt: skip


def test_old_logprobs_uses_logged_values_only_where_every_turn_matches(setup) -> None:
    _, _, rendered = setup
    offsets = flat_offsets(rendered)
    recomputed = torch.full((int(offsets[-1]),), 7.0)
    ids = [f"c{j}" for j in range(len(rendered))]
    # conversation 2's middle turn has one value too many: it falls back to the recomputed values
    out, used = old_logprobs(rendered, ids, _messages(rendered, {(2, 1): 99}), recomputed)
    assert used == 2
    for j in range(len(rendered)):  # plain-loop reference of the pairing
        seg = out[offsets[j] : offsets[j + 1]]
        if j == 2:
            assert torch.all(seg == 7.0)
            continue
        expected = []
        for k in range(rendered[j].n_turns):
            n = int((rendered[j].turn_id == k).sum())
            expected += [-(j + 1) - 0.01 * i for i in range(n)]
        assert torch.allclose(seg, torch.tensor(expected, dtype=torch.float32))


def test_old_logprobs_without_column_or_with_nulls(setup) -> None:
    _, _, rendered = setup
    offsets = flat_offsets(rendered)
    recomputed = torch.arange(int(offsets[-1]), dtype=torch.float32)
    ids = [f"c{j}" for j in range(len(rendered))]
    out, used = old_logprobs(rendered, ids, pl.DataFrame({"conversation_id": ids}), recomputed)
    assert used == 0 and torch.equal(out, recomputed)
    msgs = _messages(rendered, {}).with_columns(behavior_logprobs=pl.lit(None, dtype=pl.List(pl.Float64)))
    out, used = old_logprobs(rendered, ids, msgs, recomputed)
    assert used == 0 and torch.equal(out, recomputed)


def _forwards(model: torch.nn.Module) -> list[int]:
    """Tokens of every forward of ``model`` (one entry per call), recorded by a hook."""
    seen: list[int] = []
    model.register_forward_hook(lambda _m, args, kwargs, _out: seen.append(int(kwargs["input_ids"].numel())),
                                with_kwargs=True)  # fmt: skip
    return seen


def test_behaviour_logprobs_runs_the_policy_only_where_the_logs_do_not_cover(setup) -> None:
    """Issue 14: logs that cover the batch cost no forward (the old path recomputed every conversation:
    one forward per packed buffer); one uncovered conversation costs one forward of that conversation."""
    model, _, rendered = setup
    ids = [f"c{j}" for j in range(len(rendered))]
    offsets = flat_offsets(rendered)
    cfg = UpdateConfig()
    seen = _forwards(model)
    full = recompute_logprobs(model, rendered, cfg.batch_tokens)
    assert len(seen) == 1  # before: the three conversations in one 2,048-token buffer
    seen.clear()
    covered, used = behaviour_logprobs(model, rendered, ids, _messages(rendered, {}), cfg)
    assert seen == [] and used == len(rendered)  # after: no forward at all
    expected, _ = old_logprobs(rendered, ids, _messages(rendered, {}), full)
    assert torch.equal(covered, expected)
    partial, used = behaviour_logprobs(model, rendered, ids, _messages(rendered, {(2, 1): 99}), cfg)
    assert used == 2 and seen == [len(rendered[2].input_ids)]  # conversation 2 alone
    expected, _ = old_logprobs(rendered, ids, _messages(rendered, {(2, 1): 99}), full)
    assert torch.allclose(partial, expected, atol=1e-5)  # the recompute, packed alone
    assert torch.equal(partial[: offsets[2]], expected[: offsets[2]])  # logged values taken as they are


def test_conversations_that_did_not_retokenise_are_never_paired(setup) -> None:
    """Equal counts do not prove equal tokens: a turn whose text re-tokenised to other ids (recorded in the
    metadata by the rollout) keeps its logged values out, even when every count agrees."""
    _, _, rendered = setup
    ids = [f"c{j}" for j in range(len(rendered))]
    metadata = [json.dumps({"n_retokenize_mismatch": 1}), json.dumps({"n_retokenize_mismatch": 0}), None]
    conversations = pl.DataFrame({"conversation_id": ids, "metadata": metadata})
    untrusted = retokenized(conversations)
    expected = [
        i for i, m in zip(ids, metadata, strict=True) if m and json.loads(m)["n_retokenize_mismatch"] > 0
    ]
    assert untrusted == expected == ["c0"]
    assert retokenized(conversations.drop("metadata")) == []
    recomputed = torch.full((int(flat_offsets(rendered)[-1]),), 7.0)
    out, used = old_logprobs(rendered, ids, _messages(rendered, {}), recomputed, untrusted)
    offsets = flat_offsets(rendered)
    assert used == 2 and torch.all(out[offsets[0] : offsets[1]] == 7.0)
    assert not torch.any(out[offsets[1] :] == 7.0)


def test_update_data_checks_shapes(setup) -> None:
    _, _, rendered = setup
    offsets = flat_offsets(rendered)
    with pytest.raises(ValueError, match="advantages"):
        UpdateData(rendered, torch.zeros(3), torch.zeros(int(offsets[-1])), offsets)


def test_eps_keeps_a_fresh_adamw_from_moving_unused_token_embeddings(setup) -> None:
    """A fresh AdamW's first step moves a weight by about lr·g/(|g| + ε). Embedding rows of tokens absent
    from the batch get gradients of ~1e-8 (softmax normaliser only): with ε = 1e-8 they move almost as far
    as the used rows; with ε = 1e-5 they barely move (docs/results.md, "Sanity"; itpo_batch/run/sanity.py)."""
    model, _, rendered = setup
    data = _data(model, rendered)
    used = torch.unique(torch.cat([torch.as_tensor(r.input_ids) for r in rendered]))
    unused = torch.ones(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    unused[used] = False

    def moved(eps: float) -> tuple[float, float]:
        trained = copy.deepcopy(model)
        update_policy(trained, data, UpdateConfig(lr=1e-3, mini_batch=len(rendered), eps=eps))
        delta = (trained.get_input_embeddings().weight - model.get_input_embeddings().weight).abs().mean(1)
        return float(delta[unused].mean()), float(delta[~unused].mean())

    unused_small, used_small = moved(1e-8)
    unused_large, used_large = moved(1e-5)
    # measured: the unused rows move 0.99× as far as the used ones with ε = 1e-8, 0.21× with ε = 1e-5
    assert unused_small > 0.8 * used_small  # the pathology: rows the batch never saw move like the rest
    assert unused_large < 0.4 * used_large and used_large > 0.8 * used_small
