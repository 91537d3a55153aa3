"""Packed, chunked log-probs (itpo_batch.model.logprobs) against the padded full-logits baseline on the tiny model."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from itpo_batch.model.loading import load_model
from itpo_batch.model.logprobs import (
    _affine_scale,
    _chunk_stats,
    _FusedHead,
    _logit_transform,
    assistant_token_logprobs,
    assistant_values,
    packed_to_padded,
    padded_token_logprobs,
    padded_token_logprobs_and_entropy,
    split_causal_lm,
    target_positions,
    token_logprobs,
    token_logprobs_and_entropy,
)
from itpo_batch.model.packing import pack, pad
from itpo_batch.model.render import RenderedConversation, render
from itpo_batch.model.tiny_corpus import generate_corpus

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def rendered(tiny_tokenizer) -> list[RenderedConversation]:
    """Five conversations of 1-3 assistant turns, 54-206 tokens (790 in all)."""
    lines = generate_corpus(seed=3, n_lines=200)
    rng = np.random.default_rng(0)
    convs = []
    for i in range(5):
        msgs = [{"role": "system", "content": "You help."}] if i % 2 else []
        for _ in range(1 + i % 3):
            msgs.append({"role": "user", "content": " ".join(rng.choice(lines, 1))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(lines, 1 + i % 2))})
        convs.append(msgs)
    return render(convs, tiny_tokenizer).conversations


@pytest.fixture(scope="module")
def model(tiny_dir) -> torch.nn.Module:
    return load_model("tiny", role="policy")  # float32 on CPU, train mode (no dropout in the tiny Llama)


@pytest.fixture(scope="module")
def padded(rendered, model, tiny_tokenizer) -> dict[str, torch.Tensor]:
    ids, attn, amask, _ = pad(rendered, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logp, ent = padded_token_logprobs_and_entropy(model, ids, attn)
    return {"ids": ids, "attn": attn.bool(), "amask": amask, "logp": logp, "entropy": ent}


@pytest.fixture(scope="module")
def packed(rendered, model) -> dict:
    """One packed forward of all conversations (chunk 64), shared by the comparisons below."""
    (batch,) = pack(rendered, max_tokens=100_000)
    with torch.no_grad():
        logp, ent = token_logprobs_and_entropy(model, batch, chunk_size=64)
    return {"batch": batch, "logp": logp, "entropy": ent}


def test_packed_equals_padded(packed, padded) -> None:
    torch.testing.assert_close(packed["logp"], padded["logp"][padded["attn"]], **TOL)
    torch.testing.assert_close(packed["entropy"], padded["entropy"][padded["attn"]], **TOL)
    pos = packed["batch"].position_ids
    assert (packed["logp"][pos == 0] == 0).all() and (packed["logp"][pos > 0] < 0).all()
    assert (packed["entropy"][pos > 0] > 0).all()


@pytest.mark.parametrize(("chunk_size", "n_convs"), [(1, 2), (7, 5), (100_000, 5)])
def test_chunk_sizes(rendered, model, padded, chunk_size: int, n_convs: int) -> None:
    """Chunk sizes 1 (on 2 conversations, 257 tokens, to stay fast), odd and > T (790 tokens)."""
    (batch,) = pack(rendered[:n_convs], max_tokens=100_000)
    assert chunk_size == 100_000 or chunk_size < batch.n_tokens
    with torch.no_grad():
        logp, ent = token_logprobs_and_entropy(model, batch, chunk_size=chunk_size)
    attn = padded["attn"][:n_convs]
    torch.testing.assert_close(logp, padded["logp"][:n_convs][attn], **TOL)
    torch.testing.assert_close(ent, padded["entropy"][:n_convs][attn], **TOL)


def test_several_buffers_back_to_padded_rows(rendered, model, padded) -> None:
    batches = pack(rendered, max_tokens=300)
    assert len(batches) > 2
    width = padded["ids"].shape[1]
    with torch.no_grad():
        rows = torch.cat([packed_to_padded(token_logprobs(model, b, 50), b, length=width) for b in batches])
    order = torch.cat([b.seq_index for b in batches])
    torch.testing.assert_close(rows[torch.argsort(order)], padded["logp"], **TOL)
    with pytest.raises(ValueError, match="shorter"):
        packed_to_padded(torch.zeros(batches[0].n_tokens), batches[0], length=1)


def test_assistant_only_targets(rendered, model, packed, padded) -> None:
    batch = packed["batch"]
    with torch.no_grad():
        asst = token_logprobs(model, batch, 32, targets="assistant")
    mask = batch.assistant_mask
    torch.testing.assert_close(asst[mask], packed["logp"][mask], **TOL)
    assert (asst[~mask] == 0).all()
    torch.testing.assert_close(assistant_values(asst, batch), padded["logp"][padded["amask"]], **TOL)
    (small,) = pack(rendered[:1], max_tokens=100_000)
    with torch.no_grad():
        values = assistant_token_logprobs(model, small, 8)
    torch.testing.assert_close(values, padded["logp"][0][padded["amask"][0]], **TOL)
    assert len(target_positions(batch, "assistant")) == int(mask.sum())  # no assistant token at position 0
    with pytest.raises(ValueError, match="targets"):
        target_positions(batch, "user")  # type: ignore[arg-type]


def test_temperature(rendered, model, padded) -> None:
    (batch,) = pack(rendered[:2], max_tokens=100_000)
    ids, attn, _, _ = pad(rendered[:2], 1)
    with torch.no_grad():
        packed = token_logprobs(model, batch, 16, temperature=0.7)
        naive = padded_token_logprobs(model, ids, attn, temperature=0.7)
    torch.testing.assert_close(packed, naive[attn.bool()], **TOL)
    assert not torch.allclose(packed, padded["logp"][padded["attn"]][: batch.n_tokens])


def test_gradients_match_padded(rendered, model, tiny_tokenizer) -> None:
    """Backward through the checkpointed chunks gives the padded path's parameter gradients."""
    seqs = [rendered[i] for i in (0, 1, 3)]  # 387 tokens
    (batch,) = pack(seqs, max_tokens=100_000)
    ids, attn, amask, _ = pad(seqs, tiny_tokenizer.pad_token_id)
    weights = torch.randn(batch.n_tokens, generator=torch.Generator().manual_seed(0))
    params = [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    logp, ent = token_logprobs_and_entropy(model, batch, chunk_size=16, targets="assistant")
    assert logp.requires_grad and ent.requires_grad
    packed = grads((logp * weights).sum() + 0.1 * ent.sum())
    naive_lp, naive_ent = padded_token_logprobs_and_entropy(model, ids, attn)
    mask = amask.to(naive_lp.dtype)
    w = torch.zeros_like(naive_lp)
    w[attn.bool()] = weights
    naive = grads((naive_lp * w * mask).sum() + 0.1 * (naive_ent * mask).sum())
    for a, b in zip(packed, naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not token_logprobs(model, batch, 16).requires_grad


def test_bad_arguments(tiny_dir, rendered, model) -> None:
    (batch,) = pack(rendered[:1], max_tokens=100_000)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, batch, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, batch, temperature=0.0)
    with pytest.raises(TypeError, match="causal LM"):
        split_causal_lm(load_model("tiny", role="value"))
    with pytest.raises(TypeError, match="causal LM"):
        split_causal_lm(torch.nn.Linear(2, 2))


def test_logit_transforms() -> None:
    x = torch.tensor([[-60.0, 0.0, 3.0]])
    capped = types.SimpleNamespace(config=types.SimpleNamespace(final_logit_softcapping=30.0))
    torch.testing.assert_close(_logit_transform(capped, 2.0)(x), torch.tanh(x / 30.0) * 30.0 / 2.0)
    granite = types.SimpleNamespace(config=types.SimpleNamespace(logits_scaling=4.0))
    torch.testing.assert_close(_logit_transform(granite, 1.0)(x), x / 4.0)
    cohere = types.SimpleNamespace(config=None, logit_scale=0.5)
    torch.testing.assert_close(_logit_transform(cohere, 1.0)(x), x * 0.5)
    plain = types.SimpleNamespace(config=types.SimpleNamespace())
    assert _logit_transform(plain, 1.0)(x) is x


class _Wrapper(torch.nn.Module):
    """Stands in for DDP / accelerate: holds the model as ``.module`` and counts forwards through it."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, **kwargs: object) -> object:
        self.calls += 1
        return self.module(**kwargs)


def test_forward_goes_through_wrappers(rendered, model, padded) -> None:
    (batch,) = pack(rendered[:1], max_tokens=100_000)
    wrapped = _Wrapper(model)
    with torch.no_grad():
        logp = token_logprobs(wrapped, batch, 16)
    assert wrapped.calls == 1
    torch.testing.assert_close(logp, padded["logp"][0][padded["attn"][0]], **TOL)


# ------------------------------------------------------------------------- fused head vs autograd, fallback


@pytest.mark.parametrize(("scale", "loss"), [(1.0, "both"), (0.5, "logp"), (1.7, "entropy"), (1.0, "logp")])
def test_fused_head_matches_autograd(scale: float, loss: str) -> None:
    """The hand-written backward of _FusedHead against autograd through _chunk_stats (log-softmax, gather)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    target = torch.randint(0, 50, (37,), generator=gen)
    w_logp, w_ent = torch.randn(37, generator=gen), torch.randn(37, generator=gen)

    def total(logp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        return {"both": (logp * w_logp).sum() + (ent * w_ent).sum(), "logp": (logp * w_logp).sum()}.get(
            loss, (ent * w_ent).sum()
        )

    fused = _FusedHead.apply(hidden, head.weight, target, scale, True)
    plain = _chunk_stats(hidden, target, head, lambda x: x * scale, True)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    got = torch.autograd.grad(total(*fused), [hidden, head.weight])
    want = torch.autograd.grad(total(*plain), [hidden, head.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    logp_only, empty = _FusedHead.apply(hidden, head.weight, target, scale, False)
    assert empty.numel() == 0
    torch.testing.assert_close(logp_only, plain[0], **TOL)


def test_which_heads_are_fused(model) -> None:
    head = model.lm_head
    cpu = torch.device("cpu")
    assert _affine_scale(model, head, 0.5, cpu) == 2.0
    assert _affine_scale(model, head, 1.0, torch.device("cuda")) is None  # bf16 autocast: checkpointed path
    capped = types.SimpleNamespace(config=types.SimpleNamespace(final_logit_softcapping=30.0))
    assert _affine_scale(capped, head, 1.0, cpu) is None
    granite = types.SimpleNamespace(config=types.SimpleNamespace(logits_scaling=4.0), logit_scale=2.0)
    assert _affine_scale(granite, head, 1.0, cpu) == 0.5
    assert _affine_scale(model, torch.nn.Linear(4, 4), 1.0, cpu) is None  # a bias
    assert _affine_scale(model, torch.nn.Linear(4, 4, bias=False).bfloat16(), 1.0, cpu) is None


def test_softcapped_fallback_matches_padded(rendered, model, tiny_tokenizer, monkeypatch) -> None:
    """A non-affine transform (softcapping) takes the checkpointed autograd path: forward and gradients."""
    monkeypatch.setattr(model.config, "final_logit_softcapping", 2.0, raising=False)
    seqs = [rendered[i] for i in (0, 3)]
    (batch,) = pack(seqs, max_tokens=100_000)
    ids, attn, _, _ = pad(seqs, tiny_tokenizer.pad_token_id)
    params = [model.lm_head.weight, model.model.layers[1].mlp.up_proj.weight]
    logp, ent = token_logprobs_and_entropy(model, batch, chunk_size=64)
    naive_lp, naive_ent = padded_token_logprobs_and_entropy(model, ids, attn)
    torch.testing.assert_close(logp, naive_lp[attn.bool()], **TOL)
    torch.testing.assert_close(ent, naive_ent[attn.bool()], **TOL)
    got = torch.autograd.grad(logp.sum() + ent.sum(), params)
    want = torch.autograd.grad(naive_lp.sum() + naive_ent[attn.bool()].sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
