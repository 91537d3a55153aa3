"""Varlen attention (itpo_batch.model.attention) against transformers' dense-mask path and per-sequence forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from itpo_batch.model.attention import (
    VARLEN,
    build_plan,
    dense_mask_path,
    packed_attention,
    supports_varlen,
    varlen_attention_forward,
)
from itpo_batch.model.loading import load_model
from itpo_batch.model.logprobs import token_logprobs_and_entropy
from itpo_batch.model.packing import PackedBatch, model_inputs, pack
from itpo_batch.model.render import RenderedConversation, turn_ids_from_mask

TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = {  # sequence lengths of one buffer
    "one_sequence": [300],
    "many_short": [1, 2, 3, 5, 8, 2, 13, 4, 1, 7, 9, 6] * 4,
    "one_long_with_short": [700, 3, 40, 1, 90],
    "mixed": [17, 250, 64, 65, 128, 129, 33, 5],
}


def make_seqs(lengths: list[int], seed: int = 0, vocab: int = 4096) -> list[RenderedConversation]:
    rng = np.random.default_rng(seed)
    seqs = []
    for i, n in enumerate(lengths):
        mask = rng.random(n) < 0.6
        mask[-1] = True
        turn = turn_ids_from_mask(mask)
        ids = rng.integers(8, vocab, size=n, dtype=np.int64)
        seqs.append(RenderedConversation(i, ids, mask, turn, int(turn.max()) + 1))
    return seqs


def one_buffer(lengths: list[int], vocab: int = 4096) -> PackedBatch:
    (batch,) = pack(make_seqs(lengths, vocab=vocab), max_tokens=100_000)
    return batch


@pytest.fixture(scope="module")
def policy(tiny_dir) -> torch.nn.Module:
    return load_model("tiny", role="policy")  # float32, train mode, sdpa


def logprob_grads(model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(log-probs, entropies, parameter gradients) of a weighted loss over every token."""
    weights = torch.randn(batch.n_tokens, generator=torch.Generator().manual_seed(1))
    logp, ent = token_logprobs_and_entropy(model, batch, chunk_size=128)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logp * weights).sum() + 0.1 * ent.sum(), params)
    return logp.detach(), ent.detach(), list(grads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_varlen_equals_dense_mask_forward_and_gradients(policy, case: str) -> None:
    batch = one_buffer(CASES[case])
    assert supports_varlen(policy)
    new = logprob_grads(policy, batch)
    with dense_mask_path():
        assert not supports_varlen(policy)
        old = logprob_grads(policy, batch)
    torch.testing.assert_close(new[0], old[0], **TOL)
    torch.testing.assert_close(new[1], old[1], **TOL)
    for a, b in zip(new[2], old[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert policy.config._attn_implementation == "sdpa"  # switched back after every forward


@pytest.mark.parametrize("case", ["many_short", "one_long_with_short"])
def test_varlen_equals_per_sequence_forwards(policy, case: str) -> None:
    seqs = make_seqs(CASES[case])
    (batch,) = pack(seqs, max_tokens=100_000)
    with torch.no_grad():
        with packed_attention(policy, batch.cu_seqlens, "cpu") as switched:
            packed = policy(**model_inputs(batch)).logits[0]
        alone = torch.cat([policy(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0] for s in seqs])
    assert switched
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_no_dense_mask_is_built(policy, monkeypatch) -> None:
    """Fails before the varlen path: token_logprobs then had transformers build the [T, T] sdpa mask."""
    calls = []
    original = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("q_length"))
        return original(*args, **kwargs)

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    batch = one_buffer(CASES["mixed"])
    with torch.no_grad():
        token_logprobs_and_entropy(policy, batch)
        assert calls == []
        with dense_mask_path():
            token_logprobs_and_entropy(policy, batch)
    assert calls == [batch.n_tokens]


def test_plan_covers_every_token_once() -> None:
    lengths = [1, 2, 3, 4, 5, 8, 9, 300, 16, 17, 1]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    plan = build_plan(cu)
    reads = torch.cat([b.index for b in plan.buckets])
    assert torch.equal(reads[plan.restore], torch.arange(sum(lengths)))  # each token is read back from itself
    assert len(plan.buckets) == len({int(np.ceil(np.log2(n))) for n in lengths}) <= 10  # not one per sequence
    for b in plan.buckets:
        assert b.index.numel() == b.n * b.width
    assert build_plan(torch.tensor([0, 7])).buckets == []
    with pytest.raises(ValueError, match="empty"):
        build_plan(torch.tensor([0, 3, 3]))


def small_llama(attn: str, kv_heads: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("attn", "kv_heads"), [("sdpa", 2), ("eager", 4), ("eager", 1)])
def test_grouped_query_and_eager_models(attn: str, kv_heads: int) -> None:
    model = small_llama(attn, kv_heads)
    batch = one_buffer(CASES["mixed"], vocab=64)
    new = logprob_grads(model, batch)
    with dense_mask_path():
        old = logprob_grads(model, batch)
    for a, b in zip([new[0], new[1], *new[2]], [old[0], old[1], *old[2]], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert model.config._attn_implementation == attn


def test_value_model(tiny_dir) -> None:
    vm = load_model("tiny", role="value")
    seqs = make_seqs(CASES["one_long_with_short"])
    (batch,) = pack(seqs, max_tokens=100_000)
    with torch.no_grad(), packed_attention(vm, batch.cu_seqlens, "cpu") as switched:
        packed = vm(batch.input_ids[None], position_ids=batch.position_ids[None])[0]
    alone = torch.cat([vm(torch.from_numpy(s.input_ids)[None])[0].detach() for s in seqs])
    assert switched
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def test_what_does_not_switch(tiny_dir) -> None:
    model = small_llama("sdpa", 4)
    model.config.sliding_window = 16
    assert not supports_varlen(model)
    model.config.sliding_window = None
    assert supports_varlen(model)
    model.activation_checkpointing_enable()
    assert not supports_varlen(model)  # layers recomputed in backward, outside the switch
    assert not supports_varlen(torch.nn.Linear(2, 2))
    for attn in ("flash_attention_2", "flex_attention"):
        model.config._attn_implementation_internal = attn
        assert not supports_varlen(model)


def test_fails_loudly(policy) -> None:
    batch = one_buffer(CASES["mixed"])
    q = torch.zeros(1, 4, batch.n_tokens, 48)
    with pytest.raises(RuntimeError, match="outside"):
        varlen_attention_forward(policy.model.layers[0].self_attn, q, q, q, None)
    with pytest.raises(RuntimeError, match="ran no attention layer"):
        with packed_attention(policy, batch.cu_seqlens, "cpu"):
            pass  # no forward: a model bypassing the interface looks the same
    with pytest.raises(ZeroDivisionError), packed_attention(policy, batch.cu_seqlens, "cpu"):
        assert policy.config._attn_implementation == VARLEN
        _ = 1 / 0
    assert policy.config._attn_implementation == "sdpa"  # restored on errors too
    with pytest.raises(RuntimeError, match="expects one unmasked packed buffer"):
        with packed_attention(policy, batch.cu_seqlens, "cpu"):
            varlen_attention_forward(policy.model.layers[0].self_attn, q[:, :, :5], q, q, None)
