"""Render chat messages into model-ready token arrays, with assistant masks and turn ids built at render time.

Every downstream stage (log-probs, implicit PRM, turn credit) needs, per conversation, ``input_ids``, an
``assistant_mask`` (tokens the policy produced) and a ``turn_id`` (which assistant turn a token belongs
to). Recovering them after tokenisation is error-prone (transformers#34172: templates without
``{% generation %}`` silently give all-zero masks), so they are produced together here and checked.

Design decisions:

- **Two paths, one contract.**
  (a) ``generation``: the chat template contains ``{% generation %}`` → one batched
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` call; turn ids are the cumsum of the
  mask's 0→1 edges. (b) ``prefix_diff``: any other template → for assistant message *i* the characters
  between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])`` are that
  turn's span; trailing whitespace of the span is trimmed (it is the template's separator, e.g. ChatML's
  ``"\\n"`` after ``<|im_end|>``, not something the policy must emit), so end-of-turn tokens such as
  ``<|im_end|>`` / ``<|eot_id|>`` are included. All full texts are tokenised in ONE batched fast-tokenizer
  call with offsets, and a token belongs to a turn iff its start offset lies in the turn's span
  (``np.searchsorted``; no Python loop over tokens). For templates whose generation block covers content
  plus end token, both paths give identical masks (tested).
- **What the generation path trusts.** It relies on the template's markers; the segment count is checked,
  but two marked blocks with no token between them merge into one segment (the count check then fails
  loudly, unless the template also marks non-assistant text right next to an assistant turn).
- **Prefix preservation is required** for (b): every partial render must be a prefix of the full render.
  Templates that rewrite history (e.g. Qwen3 dropping earlier reasoning) raise :class:`RenderError`.
- **Loud failures.** A conversation without an assistant message, an empty assistant message, a turn that
  gets no tokens, or a mask whose segment count differs from the number of assistant messages raises
  :class:`RenderError` naming the conversation index. Jinja errors are re-raised the same way.
- **Overflow.** ``max_length`` defaults to the tokenizer's ``model_max_length`` (the tiny model sets it to
  its context), else to the model's ``max_position_embeddings`` (:func:`resolve_max_length`; absurd
  sentinel values mean "no limit"). Tokenisation runs with ``verbose=False``: transformers' "sequence
  length is longer than the specified maximum" warning would repeat, in its words, what the caller
  reports from ``n_dropped_overlength``/``n_truncated``. ``drop`` skips longer conversations;
  ``truncate`` cuts right after the last assistant turn that ends within ``max_length`` (whole leading
  turns, tokens of the full render, so kept turns see exactly the context they had). If even the first
  assistant turn does not fit the conversation is dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import RenderError
from itpo_batch.data.summary import describe

Message = Mapping[str, str]
Method = Literal["generation", "prefix_diff"]
ROLES = frozenset({"system", "user", "assistant", "tool"})
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_NO_LIMIT = 10**8  # tokenizers report int(1e30) when they do not know their context


@dataclass
class RenderConfig:
    """How conversations become token arrays."""

    max_length: int | None = None  # token budget per conversation; None → tokenizer.model_max_length
    overflow: Literal["drop", "truncate"] = "drop"  # what to do with conversations over max_length
    method: Literal["auto", "generation", "prefix_diff"] = "auto"  # auto: generation iff template has markers


@dataclass
class RenderedConversation:
    """One conversation's tokens. ``turn_id`` is the 0-based assistant-turn index, −1 off assistant tokens."""

    index: int  # position in the input list
    input_ids: np.ndarray  # int64 [T]
    assistant_mask: np.ndarray  # bool [T]
    turn_id: np.ndarray  # int32 [T]
    n_turns: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RenderResult:
    """Rendered conversations (input order, dropped ones skipped) plus what happened to the others."""

    conversations: list[RenderedConversation]
    method: Method
    max_length: int | None
    n_dropped_overlength: int = 0
    n_truncated: int = 0
    dropped: list[int] = field(default_factory=list)  # input indices of dropped conversations


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks assistant output with ``{% generation %}``."""
    return bool(_GENERATION_RE.search(template))


def resolve_max_length(config: RenderConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The context every stage renders to: ``config.max_length``, else the tokenizer's ``model_max_length``,
    else the model's own context from the ``config.json`` next to the tokenizer, else None (no limit).

    Many checkpoints leave ``model_max_length`` out of ``tokenizer_config.json`` (transformers then reports
    a sentinel of ~1e30), while their ``config.json`` states ``max_position_embeddings``; without this
    fallback such a model would be rendered with no limit at all. The config is read as plain JSON (no
    ``AutoConfig``, so models with custom code need no ``trust_remote_code`` here).
    """
    if config.max_length is not None:
        return int(config.max_length)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and 0 < limit < _NO_LIMIT:
        return int(limit)
    return model_context(getattr(tokenizer, "name_or_path", None))


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(model_dir: str | os.PathLike[str] | None) -> int | None:
    """The context length a model directory's ``config.json`` states (also inside ``text_config``), or None."""
    if not model_dir:
        return None
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for cfg in (raw, raw.get("text_config")) if isinstance(raw, dict) else ():
        for key in _CONTEXT_KEYS if isinstance(cfg, dict) else ():
            n = cfg.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and 0 < n < _NO_LIMIT:
                return n
    return None


def resolve_method(config: RenderConfig, tokenizer: PreTrainedTokenizerBase) -> Method:
    """Pick the rendering path; ``generation`` requires markers in the template."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:
        raise RenderError(f"tokenizer has no usable chat template: {exc}") from exc
    marked = has_generation_markers(template)
    if config.method == "generation" and not marked:
        raise RenderError("method='generation' needs a chat template with {% generation %} markers")
    if config.method == "auto":
        return "generation" if marked else "prefix_diff"
    return config.method


def _check_messages(index: int, messages: Sequence[Message]) -> int:
    """Validate the role structure this module relies on; return the number of assistant messages."""
    n_assistant = 0
    for pos, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RenderError.at(index, f"message {pos} has unknown role {role!r}")
        if not isinstance(content, str):
            raise RenderError.at(index, f"message {pos} content is not a string")
        if role == "assistant":
            if not content.strip():
                raise RenderError.at(index, f"assistant message {pos} is empty")
            n_assistant += 1
    if n_assistant == 0:
        raise RenderError.at(index, "no assistant message, nothing to assign credit to")
    return n_assistant


def _template_error(index: int, exc: Exception) -> RenderError:
    return RenderError.at(index, f"chat template failed: {type(exc).__name__}: {exc}")


def turn_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Turn id per token from a boolean mask: cumsum of 0→1 edges minus one, −1 off the mask."""
    mask = mask.astype(bool)
    starts = mask & ~np.concatenate(([False], mask[:-1]))
    return np.where(mask, np.cumsum(starts) - 1, -1).astype(np.int32)


def _finish(
    index: int, ids: np.ndarray, turn: np.ndarray, n_assistant: int, max_length: int | None, overflow: str
) -> tuple[RenderedConversation | None, bool]:
    """Check the masks and apply the overflow policy; returns (conversation or None if dropped, truncated)."""
    mask = turn >= 0
    if not mask.any():
        raise RenderError.at(index, "empty assistant mask (the template marks no assistant tokens)")
    counts = np.bincount(turn[mask], minlength=n_assistant)
    if counts.shape[0] != n_assistant or not counts.all():
        raise RenderError.at(
            index,
            f"assistant mask has {int((counts > 0).sum())} turn segments "
            f"but the conversation has {n_assistant} assistant messages",
        )
    if max_length is None or ids.shape[0] <= max_length:
        return RenderedConversation(index, ids, mask, turn, n_assistant), False
    if overflow == "drop":
        return None, False
    # last token index of each turn (turns are contiguous and increasing)
    turn_end = np.zeros(n_assistant, dtype=np.int64)
    np.maximum.at(turn_end, turn[mask], np.nonzero(mask)[0])
    n_keep = int(np.searchsorted(turn_end + 1, max_length, side="right"))
    if n_keep == 0:
        return None, False
    cut = int(turn_end[n_keep - 1]) + 1
    kept_turn = turn[:cut]
    return RenderedConversation(index, ids[:cut], kept_turn >= 0, kept_turn, n_keep), True


def _render_generation(
    conversations: Sequence[Sequence[Message]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Path (a): one batched render+tokenise; returns (input_ids, assistant_mask) per conversation."""
    batch = [[dict(m) for m in conv] for conv in conversations]
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    kwargs["tokenizer_kwargs"] = {"verbose": False}  # over-length is ours to report (module docstring)
    try:
        out = tokenizer.apply_chat_template(batch, **kwargs)
    except Exception:
        for i, conv in enumerate(batch):  # find the culprit for a precise message
            try:
                tokenizer.apply_chat_template(conv, **kwargs)
            except Exception as exc:
                raise _template_error(i, exc) from exc
        raise
    return [
        (np.asarray(ids, dtype=np.int64), np.asarray(m, dtype=bool))
        for ids, m in zip(out["input_ids"], out["assistant_masks"], strict=True)
    ]


def _assistant_spans(
    index: int, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, np.ndarray]:
    """Path (b), one conversation: full text and the ``[n_turns, 2]`` char spans of its assistant turns."""
    msgs = [dict(m) for m in messages]
    positions = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        heads = tokenizer.apply_chat_template(
            [msgs[:i] for i in positions], tokenize=False, add_generation_prompt=True
        )
        tails = tokenizer.apply_chat_template([msgs[: i + 1] for i in positions], tokenize=False)
    except Exception as exc:
        raise _template_error(index, exc) from exc
    spans = np.empty((len(positions), 2), dtype=np.int64)
    prev_end = 0
    for k, (pos, head, tail) in enumerate(zip(positions, heads, tails, strict=True)):
        if not (full.startswith(head) and full.startswith(tail) and tail.startswith(head)):
            raise RenderError.at(
                index,
                f"chat template is not prefix-preserving (rendering the first "
                f"{pos + 1} messages is not a prefix of the full conversation), so assistant tokens cannot be "
                "located; use a template with {% generation %} markers",
            )
        start, end = len(head), len(tail.rstrip())
        if end <= start or start < prev_end:
            raise RenderError.at(index, f"assistant message {pos} renders to an empty or overlapping span")
        spans[k] = (start, end)
        prev_end = end
    return full, spans


def _turns_from_spans(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Turn id per token: the span containing the token's start offset, −1 if none."""
    tok_start = offsets[:, 0]
    k = np.searchsorted(spans[:, 0], tok_start, side="right") - 1
    inside = (k >= 0) & (tok_start < spans[np.clip(k, 0, None), 1])
    return np.where(inside, k, -1).astype(np.int32)


def _render_prefix_diff(
    conversations: Sequence[Sequence[Message]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Path (b): per-conversation Jinja renders, one batched tokenisation; returns (input_ids, turn_id)."""
    if not getattr(tokenizer, "is_fast", False):
        raise RenderError("prefix-diff rendering needs a fast tokenizer (character offsets)")
    texts, all_spans = [], []
    for index, messages in enumerate(conversations):
        full, spans = _assistant_spans(index, messages, tokenizer)
        texts.append(full)
        all_spans.append(spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out = []
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans, strict=True):
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        out.append((np.asarray(ids, dtype=np.int64), _turns_from_spans(off, spans)))
    return out


def render(
    conversations: Sequence[Sequence[Message]],
    tokenizer: PreTrainedTokenizerBase,
    config: RenderConfig | None = None,
    names: Sequence[str] | None = None,
) -> RenderResult:
    """Render ``conversations`` (lists of ``{"role", "content"}``) into token arrays with masks and turn ids.

    ``names`` (e.g. conversation ids) only improve error messages: a failing conversation is named by
    its id instead of its position.
    """
    try:
        return _render(conversations, tokenizer, config or RenderConfig())
    except RenderError as e:
        if names is None or e.index is None:
            raise
        raise RenderError(f"conversation {names[e.index]!r}: {e.reason}", e.index, e.reason) from None


def _render(
    conversations: Sequence[Sequence[Message]], tokenizer: PreTrainedTokenizerBase, config: RenderConfig
) -> RenderResult:
    if config.overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', not {config.overflow!r}")
    method = resolve_method(config, tokenizer)
    max_length = resolve_max_length(config, tokenizer)
    n_assistant = [_check_messages(i, conv) for i, conv in enumerate(conversations)]
    result = RenderResult([], method, max_length)
    if not conversations:
        return result
    if method == "generation":
        pairs = [(ids, turn_ids_from_mask(m)) for ids, m in _render_generation(conversations, tokenizer)]
    else:
        pairs = _render_prefix_diff(conversations, tokenizer)
    for index, ((ids, turn), n) in enumerate(zip(pairs, n_assistant, strict=True)):
        conv, truncated = _finish(index, ids, turn, n, max_length, config.overflow)
        if conv is None:
            result.n_dropped_overlength += 1
            result.dropped.append(index)
        else:
            result.conversations.append(conv)
            result.n_truncated += int(truncated)
    return result


def token_summary(logs: Any, tokenizer: Any, cfg: Any) -> dict[str, Any]:
    """Token counts per conversation after rendering with ``tokenizer``'s chat template.

    ``logs`` is a :class:`~itpo_batch.data.validate.Logs`; ``cfg`` a :class:`~itpo_batch.model.render.RenderConfig`.
    Conversations over the context are dropped or truncated as ``cfg.overflow`` says, and counted.
    """
    res = render(logs.chats(), tokenizer, cfg, names=logs.conversations["conversation_id"].to_list())
    lengths = pl.Series("n", [len(c) for c in res.conversations], dtype=pl.Int64)
    asst = pl.Series("n", [int(c.assistant_mask.sum()) for c in res.conversations], dtype=pl.Int64)
    return {
        "method": res.method,
        "max_length": res.max_length,
        "overflow": cfg.overflow,
        "dropped": res.n_dropped_overlength,
        "truncated": res.n_truncated,
        "total_tokens": int(lengths.sum()),
        "tokens_per_conversation": describe(lengths),
        "assistant_tokens_per_conversation": describe(asst),
    }
