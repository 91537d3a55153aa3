"""The CUDA / bf16 path. Every ``gpu``-marked test skips without CUDA (``pytest -m gpu``; bench/gpu_check.sh).

On CUDA the product keeps float32 master weights and runs forwards and backwards under bf16 autocast, packed
buffers attend through PyTorch's flash varlen kernel (:mod:`itpo_batch.model.attention`), and generation runs
in float32 through the rollout engine. The tests compare each of these with a float32 reference:

- varlen attention (flash and length buckets) on random q/k/v against per-sequence float32 attention, outputs
  and gradients (relative error within bf16 rounding; attention across sequences would be O(1));
- packed log-probs and entropies of the tiny model on CUDA against the same model's float32 CPU forward;
- policy updates on CUDA raise the likelihood of positively-advantaged turns and keep float32 weights;
- the rollout engine's greedy decode on CUDA equals ``model.generate``, one conversation at a time;
- a short ``iterate`` end to end.

One test runs everywhere: the backend choice off CUDA (buckets; ``flash`` forced raises).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from itpo_batch.model import attention
from itpo_batch.model.attention import BACKEND_ENV, build_plan, varlen_attention_forward, varlen_backend

CUDA = torch.cuda.is_available()
LENGTHS = [1, 5, 300, 17, 64, 129, 2, 33]  # one buffer: singletons, powers of two and their neighbours
BF16_REL = 2e-2  # relative L2 error allowed against float32 (bf16 rounding of q/k/v gives ~4e-3)


def on_gpu(test):
    """Mark ``test`` ``gpu`` (selected by ``pytest -m gpu``) and skip it where torch sees no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(test))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_backend_choice_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 2, 8, 4)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert varlen_backend(q) == "buckets"
    monkeypatch.setenv(BACKEND_ENV, "flash")
    with pytest.raises(RuntimeError, match="no flash varlen kernel"):
        varlen_backend(q)
    monkeypatch.setenv(BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        varlen_backend(q)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """float32 causal attention of each sequence alone: ``[1, T, H, D]`` from ``[1, H(_kv), T, D]``."""
    n_rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float()
        ks, vs = ks.repeat_interleave(n_rep, dim=1), vs.repeat_interleave(n_rep, dim=1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ["flash", "buckets"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@on_gpu
def test_varlen_attention_on_cuda_matches_per_sequence_float32(
    backend: str, kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BACKEND_ENV, backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    total, heads, dim = sum(LENGTHS), 4, 64

    def leaf(h: int) -> torch.Tensor:
        x = torch.randn(1, h, total, dim, device="cuda", generator=gen)
        return x.requires_grad_(True)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(LENGTHS)]), dtype=torch.int32)
    plan = build_plan(cu, "cuda")
    token = attention._ACTIVE.set(plan)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=dim**-0.5)
    finally:
        attention._ACTIVE.reset(token)
    assert out.shape == (1, total, heads, dim) and out.dtype == torch.bfloat16
    assert plan.flash_calls == (1 if backend == "flash" else 0)
    ref = reference_attention(q, k, v, LENGTHS)
    assert rel_err(out, ref) < BF16_REL
    weights = torch.randn(ref.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, r) < BF16_REL, name


def _packed_tiny_batch(vocab: int):
    from itpo_batch.model.packing import pack
    from itpo_batch.model.render import RenderedConversation, turn_ids_from_mask

    rng = np.random.default_rng(0)
    seqs = []
    for i, n in enumerate(LENGTHS):
        mask = rng.random(n) < 0.6
        mask[-1] = True
        turn = turn_ids_from_mask(mask)
        seqs.append(RenderedConversation(i, rng.integers(8, vocab, n), mask, turn, int(turn.max()) + 1))
    (batch,) = pack(seqs, max_tokens=100_000)
    return batch


@pytest.mark.parametrize("backend", ["flash", "buckets"])
@on_gpu
def test_packed_logprobs_bf16_on_cuda_match_float32_cpu(
    tiny_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from itpo_batch.model.loading import load_model
    from itpo_batch.model.logprobs import token_logprobs_and_entropy

    monkeypatch.setenv(BACKEND_ENV, backend)
    cpu = load_model("tiny", role="reference", device="cpu", dtype=torch.float32)
    gpu = copy.deepcopy(cpu).to("cuda")
    assert next(gpu.parameters()).dtype == torch.float32  # master weights; bf16 only inside autocast
    batch = _packed_tiny_batch(int(cpu.config.vocab_size))
    with torch.no_grad():
        logp_ref, ent_ref = token_logprobs_and_entropy(cpu, batch, chunk_size=256)
        logp, ent = token_logprobs_and_entropy(gpu, batch.to("cuda"), chunk_size=256)
    assert logp.dtype == torch.float32 and logp.device.type == "cuda"
    diff = (logp.cpu() - logp_ref).abs()
    # per-token log-probs of ~ -8.3 (vocabulary 4096): bf16 matmuls move them by a few 1e-3 on average
    # (bf16 autocast on CPU: mean 0.001, max 0.005; attending across sequences: mean 0.17, max 0.97)
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1, (float(diff.mean()), float(diff.max()))
    assert rel_err(ent, ent_ref) < BF16_REL
    assert float(logp[batch.position_ids.to("cuda") == 0].abs().max()) == 0.0


@on_gpu
def test_policy_update_on_cuda_raises_likelihood_in_float32_master_weights(tiny_dir: Path) -> None:
    from itpo_batch.model.loading import load_model, load_tokenizer
    from itpo_batch.model.render import RenderConfig, render
    from itpo_batch.rl.update import UpdateConfig, UpdateData, flat_offsets, recompute_logprobs, update_policy

    chats = [
        [{"role": "user", "content": "I have a fever."}, {"role": "assistant", "content": "Any cough?"},
         {"role": "user", "content": "Yes, dry."}, {"role": "assistant", "content": "It is the flu."}],
        [{"role": "user", "content": "My head hurts."}, {"role": "assistant", "content": "Since when?"}],
    ]  # fmt: skip
    rendered = render(chats, load_tokenizer("tiny"), RenderConfig()).conversations
    model = load_model("tiny", role="policy", dtype=torch.float32)  # as the stages load it
    assert next(model.parameters()).device.type == "cuda"
    offsets = flat_offsets(rendered)
    old = recompute_logprobs(model, rendered)
    data = UpdateData(rendered, torch.ones(int(offsets[-1])), old, offsets, None)
    metrics = update_policy(model, data, UpdateConfig(lr=1e-3, epochs=3, mini_batch=1))
    assert metrics["update/steps"] >= 1 and math.isfinite(metrics["update/loss"])
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    new = recompute_logprobs(model, rendered)
    assert float(new.sum()) > float(old.sum()) + 1.0  # on CPU this update gains about 50 nats


@on_gpu
def test_engine_greedy_decode_on_cuda_equals_generate(tiny_dir: Path) -> None:
    from itpo_batch.model import generation as hf
    from itpo_batch.model.engine import RolloutEngine, generate
    from itpo_batch.model.generation import SamplingConfig
    from itpo_batch.model.loading import load_model, load_tokenizer
    from itpo_batch.model.tiny_corpus import generate_corpus

    tok = load_tokenizer("tiny", padding_side="left")
    model = load_model("tiny", "reference", dtype=torch.float32)  # the policy's dtype in iterate's rollouts
    assert next(model.parameters()).device.type == "cuda"
    eos = torch.zeros(model.config.vocab_size, device="cuda")
    eos[tok.eos_token_id] = 1.0
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to("cuda")
    r /= r.norm()  # the eos hook of tests/test_engine.py: replies stop after 1 to 14 tokens
    model.lm_head.register_forward_hook(lambda _m, i, out: out + (1.0 + 4.0 * (i[0] @ r)[..., None]) * eos)
    assert RolloutEngine(model, hf.eos_token_ids(model, tok)).supported  # no silent fallback to generate
    convs = [[{"role": "user", "content": line}] for line in generate_corpus(seed=4, n_lines=12)[:12]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=14)
    new = generate(model, tok, convs, greedy, seed=1, width=5)
    for conv, reply in zip(convs, new, strict=True):
        (old,) = hf.generate(model, tok, [conv], greedy, seed=0)
        assert reply.token_ids == old.token_ids and reply.stopped == old.stopped
        torch.testing.assert_close(
            torch.tensor(reply.logprobs), torch.tensor(old.logprobs), atol=1e-3, rtol=0
        )
    assert len({len(g.token_ids) for g in new}) >= 2  # rows left the batch at different steps


@on_gpu
def test_short_iterate_on_cuda_bf16(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.core.config import from_mapping
    from itpo_batch.model.loading import default_device, default_dtype
    from itpo_batch.run.config import IterateConfig
    from itpo_batch.run.rounds import iterate

    assert default_device().type == "cuda"
    assert default_dtype(default_device()) == torch.bfloat16
    cfg = from_mapping(IterateConfig, {
        "rounds": 1, "methods": ["itpo_norm", "iterative_ppo"], "model": str(tiny_dir), "n": 16,
        "group_size": 4, "max_new_tokens": 16, "eval": {"n": 8, "max_new_tokens": 16},
        "ippo": {"max_states": 8, "samples_per_state": 2, "max_new_tokens": 16}, "q": {"epochs": 1},
    })  # fmt: skip
    run = iterate(cfg, tmp_path / "gpu")
    metrics = {(r["method"], r["round"]): r for r in run.read_metrics()}
    for method in ("itpo_norm", "iterative_ppo"):
        last = metrics[(method, 1)]
        assert last["update/steps"] >= 1
        assert math.isfinite(last["update/loss"]) and math.isfinite(last["policy/kl_pi0"])
        assert (run.checkpoint_dir(method, 1, "policy") / "model.safetensors").is_file()
