"""Packing: exact round trips, the padded baseline, and padding-free forwards on the tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itpo_batch.model.loading import load_model
from itpo_batch.model.packing import PackedBatch, model_inputs, pack, pad, unpack
from itpo_batch.model.render import RenderedConversation, render, turn_ids_from_mask


def make_seq(rng: np.random.Generator, index: int, length: int) -> RenderedConversation:
    mask = rng.random(length) < 0.5
    mask[-1] = True  # at least one assistant token
    turn = turn_ids_from_mask(mask)
    ids = rng.integers(8, 4096, size=length, dtype=np.int64)
    return RenderedConversation(index, ids, mask, turn, int(turn.max()) + 1)


def assert_same(a: RenderedConversation, b: RenderedConversation) -> None:
    assert (a.index, a.n_turns) == (b.index, b.n_turns)
    for name in ("input_ids", "assistant_mask", "turn_id"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def round_trip(seqs: list[RenderedConversation], max_tokens: int) -> list[PackedBatch]:
    batches = pack(seqs, max_tokens)
    back = [s for b in batches for s in unpack(b)]
    assert len(back) == len(seqs)
    for a, b in zip(back, seqs, strict=True):
        assert_same(a, b)
    assert torch.cat([b.seq_index for b in batches]).tolist() == list(range(len(seqs)))
    return batches


def test_pack_layout() -> None:
    rng = np.random.default_rng(0)
    seqs = [make_seq(rng, 10 + i, n) for i, n in enumerate([3, 4, 2, 9, 1])]
    batches = round_trip(seqs, max_tokens=8)
    assert [b.seq_index.tolist() for b in batches] == [[0, 1], [2], [3], [4]]  # greedy, in order
    first = batches[0]
    assert first.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert first.cu_seqlens.dtype == torch.int32 and first.cu_seqlens.tolist() == [0, 3, 7]
    assert first.max_seqlen == 4 and first.n_tokens == 7 and first.n_seqs == 2
    assert first.seq_id().tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert first.conv_index.tolist() == [10, 11]
    assert batches[2].n_tokens == 9  # longer than max_tokens: a buffer of its own
    assert (first.input_ids.dtype, first.turn_id.dtype, first.assistant_mask.dtype) == (
        torch.int64,
        torch.int32,
        torch.bool,
    )
    moved = first.to("cpu")
    assert torch.equal(moved.input_ids, first.input_ids) and moved.max_seqlen == first.max_seqlen


def test_pack_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_tokens"):
        pack([make_seq(rng, 0, 3)], 0)
    assert pack([], 10) == []


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=25),
    max_tokens=st.integers(min_value=1, max_value=120),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_round_trip_property(lengths: list[int], max_tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    seqs = [make_seq(rng, i * 3, n) for i, n in enumerate(lengths)]
    batches = round_trip(seqs, max_tokens)
    for b in batches:
        assert b.n_tokens <= max_tokens or b.n_seqs == 1
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        assert b.max_seqlen == max(lens)
        starts = b.cu_seqlens[:-1].long()
        assert (b.position_ids[starts] == 0).all()
    for prev, nxt in itertools.pairwise(batches):  # greedy: the next sequence did not fit
        first_next = lengths[int(nxt.seq_index[0])]
        assert prev.n_tokens + first_next > max_tokens


def test_pad_matches_loop() -> None:
    rng = np.random.default_rng(1)
    seqs = [make_seq(rng, i, n) for i, n in enumerate([5, 1, 8, 3])]
    ids, attn, mask, turn = pad(seqs, pad_id=1)
    assert ids.shape == attn.shape == mask.shape == turn.shape == (4, 8)
    for row, s in enumerate(seqs):
        n = len(s)
        assert ids[row, :n].tolist() == s.input_ids.tolist() and (ids[row, n:] == 1).all()
        assert attn[row].tolist() == [1] * n + [0] * (8 - n)
        assert mask[row, :n].tolist() == s.assistant_mask.tolist() and not mask[row, n:].any()
        assert turn[row, :n].tolist() == s.turn_id.tolist() and (turn[row, n:] == -1).all()
    with pytest.raises(ValueError):
        pad([], 0)


# ---------------------------------------------------------------- forwards on the tiny model


@pytest.fixture(scope="module")
def rendered(tiny_tokenizer) -> list[RenderedConversation]:
    convs = [
        [{"role": "user", "content": "Do you have a fever?"}, {"role": "assistant", "content": "No."}],
        [
            {"role": "system", "content": "You are a math tutor."},
            {"role": "user", "content": "Sam has 12 apples. How many are left?"},
            {"role": "assistant", "content": "How many did Sam give away?"},
            {"role": "user", "content": "5"},
            {"role": "assistant", "content": "Then 7 apples are left."},
        ],
        [
            {"role": "user", "content": "Write a formal memo."},
            {"role": "assistant", "content": "Who is the audience?"},
        ],
    ]
    return render(convs, tiny_tokenizer).conversations


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_is_block_diagonal(tiny_dir, rendered: list, attn: str) -> None:
    model = load_model("tiny", role="reference", attn_implementation=attn)
    (batch,) = pack(rendered, max_tokens=4096)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        per_seq = torch.cat(
            [model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0] for r in rendered]
        )
        ids, attn_mask, _, _ = pad(rendered, pad_id=1)
        padded = model(input_ids=ids, attention_mask=attn_mask).logits[attn_mask.bool()]
    torch.testing.assert_close(packed, per_seq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)


def test_packed_forward_with_cache_leaks_across_sequences(tiny_dir, rendered: list) -> None:
    """Pitfall canary (transformers 5): a KV cache disables packed-sequence detection from position_ids.

    If this starts failing, transformers changed; update the packing module docstring.
    """
    model = load_model("tiny", role="reference")
    (batch,) = pack(rendered, max_tokens=4096)
    with torch.no_grad():
        safe = model(**model_inputs(batch)).logits[0]
        leaky = model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None]).logits[0]
    first = len(rendered[0])
    torch.testing.assert_close(leaky[:first], safe[:first])  # the first sequence sees nothing else anyway
    assert (leaky[first:] - safe[first:]).abs().max() > 1e-2


def test_value_model_packed_forward(tiny_dir, rendered: list) -> None:
    vm = load_model("tiny", role="value")
    (batch,) = pack(rendered, max_tokens=4096)
    with torch.no_grad():
        packed = vm(batch.input_ids[None], position_ids=batch.position_ids[None])[0]
        per_seq = torch.cat([vm(torch.from_numpy(r.input_ids)[None])[0] for r in rendered])
    torch.testing.assert_close(packed, per_seq, atol=1e-5, rtol=1e-4)
