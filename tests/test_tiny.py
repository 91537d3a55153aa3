"""The embedded tiny model: determinism, size, tokenizer, chat template and the atomic cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import itpo_batch.model.tiny as tiny
from itpo_batch.model.tiny import SPECIAL_TOKENS, TinySpec, build_tiny, init_weights_, tiny_config, tiny_path
from itpo_batch.model.tiny_corpus import generate_corpus


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_bit_identical(tmp_path: Path, tiny_dir: Path) -> None:
    a = build_tiny(tmp_path / "a")
    b = build_tiny(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha(a / name) == _sha(b / name), name
        assert _sha(a / name) == _sha(tiny_dir / name), name  # cache entry built by the same recipe


def test_seed_changes_weights(tiny_tokenizer) -> None:
    spec = TinySpec()
    models = []
    for seed in (0, 1):
        model = LlamaForCausalLM(tiny_config(spec, tiny_tokenizer))
        init_weights_(model, seed, spec.num_layers)
        models.append(model)
    w0, w1 = (m.model.layers[0].self_attn.q_proj.weight for m in models)
    assert not torch.equal(w0, w1)
    assert abs(w0.std().item() - 0.02) < 0.002


def test_init_does_not_touch_global_rng(tiny_tokenizer) -> None:
    model = LlamaForCausalLM(tiny_config(TinySpec(), tiny_tokenizer))
    state = torch.get_rng_state()
    init_weights_(model, 0, 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_parameter_count_and_config(tiny_dir: Path) -> None:
    from itpo_batch.model.loading import load_model

    model = load_model("tiny", role="policy")
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    assert n_params == 2_557_632
    cfg = model.config
    assert cfg.tie_word_embeddings and cfg.vocab_size == 4096 and cfg.max_position_embeddings == 2048
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id) == (2, 1, 7)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_vocab_and_special_tokens(tiny_tokenizer) -> None:
    assert len(tiny_tokenizer) == 4096  # the corpus reaches the full target vocabulary
    assert tiny_tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(8))
    assert tiny_tokenizer.eos_token == "<|end|>" and tiny_tokenizer.pad_token == "<pad>"
    assert tiny_tokenizer.bos_token == "<bos>" and tiny_tokenizer.model_max_length == 2048
    ids = tiny_tokenizer("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 4 and ids[-1] == 7  # special tokens are never split


@pytest.mark.parametrize(
    "text",
    [
        "Do you have a fever? Yes, for 3 days.",
        "Sam has 12 apples and $4.50; how many are left?",
        "café  naïve\n\tok",
    ],
)
def test_tokenizer_round_trip(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_task_words_are_single_tokens(tiny_tokenizer) -> None:
    for word in (" fever", " diagnosis", " audience", " apples", " draft", " symptoms", " hello"):
        assert len(tiny_tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_chat_template_renders(tiny_tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Do you have a fever?"},
        {"role": "assistant", "content": "No."},
        {"role": "tool", "content": "42"},
    ]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<bos><|system|>\nBe brief.<|end|>\n<|user|>\nDo you have a fever?<|end|>\n"
        "<|assistant|>\nNo.<|end|>\n<|tool|>\n42<|end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    out = tiny_tokenizer.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tiny_tokenizer.decode(marked) == "No.<|end|>"


def test_chat_template_rejects_unknown_role(tiny_tokenizer) -> None:
    with pytest.raises(Exception, match="Unknown role"):
        tiny_tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_corpus_is_deterministic() -> None:
    assert generate_corpus(0, 200) == generate_corpus(0, 200)
    assert generate_corpus(0, 200) != generate_corpus(1, 200)
    text = " ".join(generate_corpus(0, 2000)).lower()
    for word in ("fever", "diagnosis", "audience", "tone", "draft", "how many", "missing number", "hello"):
        assert word in text, word


def test_tiny_path_is_cached(tiny_dir: Path) -> None:
    assert tiny_dir.name == f"tiny-v1-{TinySpec().short_hash()}"
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert tiny_path() == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before
    record = json.loads((tiny_dir / "tiny_spec.json").read_text())
    assert record["recipe"] == "v1" and record["hidden_size"] == 192
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_spec_hash_depends_on_every_field() -> None:
    base = TinySpec()
    assert base.short_hash() == TinySpec().short_hash()
    names = [f.name for f in dataclasses.fields(TinySpec)]
    assert all(isinstance(getattr(base, n), int) for n in names)  # each is bumped by one below
    hashes = {n: dataclasses.replace(base, **{n: getattr(base, n) + 1}).short_hash() for n in names}
    unmoved = [n for n, h in hashes.items() if h == base.short_hash()]
    assert not unmoved and len(set(hashes.values())) == len(names), unmoved  # each field moves the hash


def test_crashed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITPO_BATCH_CACHE", str(tmp_path))

    def crash(out_dir: Path, spec: TinySpec) -> Path:
        (out_dir / "config.json").write_text("{}")  # half-written output
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_path(TinySpec(seed=7))
    assert list(tmp_path.iterdir()) == []


def test_losing_a_concurrent_build_race_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITPO_BATCH_CACHE", str(tmp_path))
    spec = TinySpec(seed=8)
    final = tmp_path / f"tiny-v1-{spec.short_hash()}"

    def racing_build(out_dir: Path, spec: TinySpec) -> Path:
        (out_dir / "marker").write_text("mine")
        final.mkdir()  # another process finished first
        (final / "marker").write_text("theirs")
        return out_dir

    monkeypatch.setattr(tiny, "build_tiny", racing_build)
    assert tiny_path(spec) == final
    assert (final / "marker").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
