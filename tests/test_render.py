"""Rendering: the fast paths against a plain-loop reference, on three chat-template families, plus edge cases."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from itpo_batch.core.errors import RenderError
from itpo_batch.model.loading import load_tokenizer
from itpo_batch.model.render import RenderConfig, model_context, render, turn_ids_from_mask
from itpo_batch.model.tiny_corpus import generate_corpus

# Qwen2.5-style ChatML (default system prompt, grouped tool responses), without generation markers.
CHATML = (
    "{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}@GEN@{{- message['content'] + '<|im_end|>' -}}@ENDGEN@{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]

# Llama-3-style: begin_of_text, header ids, trimmed content, <|eot_id|>; tool → ipython.
LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if role == 'assistant' -%}@GEN@{{- message['content'] | trim + '<|eot_id|>' -}}@ENDGEN@"
    "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen3-like reasoning template: earlier assistant turns lose their <think> part → not prefix-preserving.
DROPS_REASONING = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and not loop.last -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def with_markers(template: str, generation: bool) -> str:
    start, end = ("{%- generation -%}", "{%- endgeneration -%}") if generation else ("", "")
    return template.replace("@GEN@", start).replace("@ENDGEN@", end)


def make_tokenizer(tiny_dir: Path, template: str, specials: list[str]):
    """A copy of the tiny tokenizer with another chat template and its control tokens as special tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    if specials:
        tok.add_special_tokens({"extra_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def families(tiny_dir: Path, tiny_tokenizer) -> dict:
    return {
        "tiny": tiny_tokenizer,
        "chatml": make_tokenizer(tiny_dir, with_markers(CHATML, False), CHATML_SPECIALS),
        "chatml_gen": make_tokenizer(tiny_dir, with_markers(CHATML, True), CHATML_SPECIALS),
        "llama3": make_tokenizer(tiny_dir, with_markers(LLAMA3, False), LLAMA3_SPECIALS),
        "llama3_gen": make_tokenizer(tiny_dir, with_markers(LLAMA3, True), LLAMA3_SPECIALS),
    }


# ---------------------------------------------------------------- reference (slow, obviously right)


def reference_turn_ids(messages: list[dict], tok) -> tuple[list[int], list[int]]:
    """Token-level prefix diff: tokens added by each assistant message, minus trailing whitespace tokens."""

    def ids(conv: list[dict], gen: bool) -> list[int]:
        text = tok.apply_chat_template([conv], tokenize=False, add_generation_prompt=gen)[0]
        return tok(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    turn = [-1] * len(full)
    k = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head, tail = ids(messages[:i], True), ids(messages[: i + 1], False)
        assert full[: len(head)] == head and full[: len(tail)] == tail
        end = len(tail)
        while end > len(head) and tok.decode([tail[end - 1]]).strip() == "":
            end -= 1
        for j in range(len(head), end):
            turn[j] = k
        k += 1
    return full, turn


def random_conversation(
    rng: random.Random, lines: list[str], n_turns: int, system: bool, tools: bool
) -> list:
    msgs = [{"role": "system", "content": rng.choice(lines)}] if system else []
    for _ in range(n_turns):
        msgs.append({"role": "user", "content": rng.choice(lines)})
        if tools and rng.random() < 0.3:
            msgs.append({"role": "assistant", "content": "call: " + rng.choice(lines)})
            msgs.extend(
                {"role": "tool", "content": str(rng.randint(0, 999))} for _ in range(rng.randint(1, 2))
            )
        if rng.random() < 0.2:  # consecutive assistant messages
            msgs.append({"role": "assistant", "content": rng.choice(lines)})
        msgs.append({"role": "assistant", "content": rng.choice(lines)})
    return msgs


@pytest.fixture(scope="module")
def conversations() -> list[list[dict]]:
    rng = random.Random(0)
    lines = [*generate_corpus(3, 300), "  padded content  ", "line one\nline two\n", "naïve café, 3.5%!", "x"]
    convs = [random_conversation(rng, lines, rng.randint(1, 4), rng.random() < 0.5, True) for _ in range(24)]
    convs.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    convs.append(random_conversation(rng, lines, 30, True, False))  # long
    return convs


@pytest.mark.parametrize("family", ["tiny", "chatml", "chatml_gen", "llama3", "llama3_gen"])
def test_fast_path_matches_reference(families: dict, conversations: list, family: str) -> None:
    tok = families[family]
    result = render(conversations, tok, RenderConfig(max_length=100_000))
    assert result.method == (
        "generation" if family in ("tiny", "chatml_gen", "llama3_gen") else "prefix_diff"
    )
    assert [c.index for c in result.conversations] == list(range(len(conversations)))
    for conv, messages in zip(result.conversations, conversations, strict=True):
        ids, turn = reference_turn_ids(messages, tok)
        assert conv.input_ids.dtype == np.int64 and conv.turn_id.dtype == np.int32
        assert conv.assistant_mask.dtype == bool
        np.testing.assert_array_equal(conv.input_ids, ids)
        np.testing.assert_array_equal(conv.turn_id, turn)
        np.testing.assert_array_equal(conv.assistant_mask, np.asarray(turn) >= 0)
        assert conv.n_turns == sum(m["role"] == "assistant" for m in messages)


@pytest.mark.parametrize("family", ["tiny", "chatml_gen", "llama3_gen"])
def test_both_paths_agree(families: dict, conversations: list, family: str) -> None:
    tok = families[family]
    gen = render(conversations, tok, RenderConfig(max_length=100_000, method="generation"))
    diff = render(conversations, tok, RenderConfig(max_length=100_000, method="prefix_diff"))
    assert (gen.method, diff.method) == ("generation", "prefix_diff")
    for a, b in zip(gen.conversations, diff.conversations, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.turn_id, b.turn_id)


def test_chatml_with_and_without_markers_agree(families: dict, conversations: list) -> None:
    plain = render(conversations, families["chatml"], RenderConfig(max_length=100_000))
    marked = render(conversations, families["chatml_gen"], RenderConfig(max_length=100_000))
    assert (plain.method, marked.method) == ("prefix_diff", "generation")
    for a, b in zip(plain.conversations, marked.conversations, strict=True):
        np.testing.assert_array_equal(a.assistant_mask, b.assistant_mask)
        np.testing.assert_array_equal(a.turn_id, b.turn_id)


def test_marked_tokens_are_the_assistant_text(families: dict) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Do you have a fever?"},
        {"role": "assistant", "content": "No, I don't."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Thanks!"},
    ]
    expected = {
        "tiny": ["No, I don't.<|end|>", "Thanks!<|end|>"],
        "chatml": ["No, I don't.<|im_end|>", "Thanks!<|im_end|>"],
        "llama3": ["No, I don't.<|eot_id|>", "Thanks!<|eot_id|>"],
    }
    for family, texts in expected.items():
        tok = families[family]
        conv = render([msgs], tok).conversations[0]
        got = [tok.decode(conv.input_ids[conv.turn_id == k]) for k in range(conv.n_turns)]
        assert got == texts, family


@pytest.mark.parametrize("family", ["tiny", "chatml", "llama3"])
def test_edge_structures(families: dict, family: str) -> None:
    tok = families[family]
    one_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    system_first = [{"role": "system", "content": "You help."}, *one_turn]
    consecutive = [*one_turn, {"role": "assistant", "content": "anything else?"}]
    assistant_first = [{"role": "assistant", "content": "How can I help?"}, *one_turn]
    result = render([one_turn, system_first, consecutive, assistant_first], tok)
    assert [c.n_turns for c in result.conversations] == [1, 1, 2, 2]
    for conv in result.conversations:
        segments = np.flatnonzero(np.diff(conv.turn_id[conv.assistant_mask]))  # turn ids rise one by one
        assert len(segments) == conv.n_turns - 1
        assert set(np.unique(conv.turn_id)) == {-1, *range(conv.n_turns)}


@pytest.mark.parametrize("family", ["tiny", "chatml"])
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
            "assistant message 1 is empty",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}], "is empty"),
        ([{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "a"}], "unknown role"),
    ],
)
def test_bad_conversations_raise_with_index(families: dict, family: str, messages: list, match: str) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RenderError, match=f"conversation 1: .*{match}"):
        render([good, messages], families[family])


def test_non_prefix_preserving_template_raises(tiny_dir: Path) -> None:
    tok = make_tokenizer(tiny_dir, DROPS_REASONING, CHATML_SPECIALS)
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm</think>hello"}]
    bad = [
        *ok,
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "<think>so</think>done"},
    ]
    assert render([ok], tok).conversations[0].n_turns == 1  # a single turn is still fine
    with pytest.raises(RenderError, match="conversation 1: chat template is not prefix-preserving"):
        render([ok, bad], tok)


def test_template_error_names_the_conversation(tiny_dir: Path) -> None:
    strict = (
        "{%- for m in messages -%}{%- if m['role'] == 'tool' -%}{{ raise_exception('no tools') }}{%- endif -%}"
        "{{- m['role'] + ': ' -}}{%- generation -%}{{- m['content'] + '\\n' -}}{%- endgeneration -%}{%- endfor -%}"
    )
    tok = make_tokenizer(tiny_dir, strict, [])
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [*good, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RenderError, match=r"conversation 2: chat template failed.*no tools"):
        render([good, good, bad], tok)


def test_mask_segment_mismatch_raises(tiny_dir: Path) -> None:
    # Marks user messages too: two mask segments for one assistant message.
    over = (
        "{%- for m in messages -%}{{- m['role'] + ': ' -}}{%- generation -%}{{- m['content'] + '<|end|>' -}}"
        "{%- endgeneration -%}{{- '\\n' -}}{%- endfor -%}"
    )
    tok = make_tokenizer(tiny_dir, over, [])
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RenderError, match="conversation 0: assistant mask has"):
        render([conv], tok)


def _turns(n: int) -> list[dict]:
    msgs = []
    for k in range(n):
        msgs += [
            {"role": "user", "content": f"question {k}"},
            {"role": "assistant", "content": f"answer {k} is {k * 7}"},
        ]
    return msgs


def test_overflow_drop_and_truncate(tiny_tokenizer) -> None:
    convs = [_turns(1), _turns(8), _turns(3), [{"role": "user", "content": "long " * 80}, *_turns(1)[1:]]]
    full = render(convs, tiny_tokenizer, RenderConfig(max_length=10_000)).conversations
    lengths = [len(c) for c in full]
    limit = lengths[2] + 1  # conv 0 and 2 fit; conv 1 is longer; conv 3's only turn does not fit
    assert lengths[0] < limit < lengths[1] and lengths[3] > limit

    dropped = render(convs, tiny_tokenizer, RenderConfig(max_length=limit, overflow="drop"))
    assert [c.index for c in dropped.conversations] == [0, 2]
    assert (dropped.n_dropped_overlength, dropped.n_truncated, dropped.dropped) == (2, 0, [1, 3])

    cut = render(convs, tiny_tokenizer, RenderConfig(max_length=limit, overflow="truncate"))
    assert [c.index for c in cut.conversations] == [0, 1, 2]
    assert (cut.n_dropped_overlength, cut.n_truncated, cut.dropped) == (1, 1, [3])
    short, whole = cut.conversations[1], full[1]
    assert 0 < short.n_turns < whole.n_turns and len(short) <= limit
    np.testing.assert_array_equal(
        short.input_ids, whole.input_ids[: len(short)]
    )  # a prefix of the full render
    np.testing.assert_array_equal(short.turn_id, whole.turn_id[: len(short)])
    assert short.assistant_mask[-1] and short.turn_id[-1] == short.n_turns - 1  # ends right after a turn
    next_turn_end = np.flatnonzero(whole.turn_id == short.n_turns).max() + 1
    assert next_turn_end > limit  # ...and it is the last turn that fits


def test_default_max_length_is_model_context(tiny_tokenizer) -> None:
    long_conv = [{"role": "user", "content": "word " * 2100}, {"role": "assistant", "content": "ok"}]
    result = render([long_conv, _turns(1)], tiny_tokenizer)
    assert result.max_length == 2048
    assert result.n_dropped_overlength == 1 and [c.index for c in result.conversations] == [1]


def test_model_context_from_config_json(tmp_path: Path) -> None:
    def context(cfg: object) -> int | None:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return model_context(tmp_path)

    assert context({"max_position_embeddings": 4096}) == 4096
    assert context({"n_positions": 1024, "model_type": "gpt2"}) == 1024
    assert context({"model_type": "llava", "text_config": {"max_position_embeddings": 8192}}) == 8192
    assert context({"max_position_embeddings": 10**30}) is None and context({"hidden_size": 8}) is None
    assert (
        context([1, 2]) is None and model_context(tmp_path / "nowhere") is None and model_context("") is None
    )


@pytest.mark.parametrize("method", ["generation", "prefix_diff"])
def test_overlength_is_ours_to_report_not_the_tokenizers(tiny_dir: Path, method: str) -> None:
    tok = load_tokenizer(tiny_dir)  # a fresh copy: transformers warns once per tokenizer
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        long_conv = [{"role": "user", "content": "word " * 2100}, {"role": "assistant", "content": "ok"}]
        result = render([long_conv], tok, RenderConfig(method=method))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert result.n_dropped_overlength == 1
    assert not [r for r in seen if "longer than the specified maximum" in r.getMessage()]


def test_empty_input(tiny_tokenizer) -> None:
    result = render([], tiny_tokenizer)
    assert result.conversations == [] and result.n_dropped_overlength == 0


def test_turn_ids_from_mask() -> None:
    mask = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    np.testing.assert_array_equal(turn_ids_from_mask(mask), [-1, 0, 0, -1, -1, 1, -1, 2, 2, 2])
    np.testing.assert_array_equal(turn_ids_from_mask(np.ones(3, dtype=bool)), [0, 0, 0])
