"""The interface every simulated collaboration task implements (docs/method.md §9.1).

A :class:`Task` draws hidden cases and starts :class:`Episode` objects. An episode holds one
conversation against a rule-based user: it gives the opening messages, takes each assistant message
as free text, updates what the user has revealed and what the assistant has committed to, and answers
with a :class:`TurnResult`: the rule-based user's reply, the **oracle utility** of that assistant turn,
and whether the conversation is over. At the end, :meth:`Episode.result` gives the sparse outcome.

Design decisions:

* **State tracking is separate from the user's wording.** The episode parses the *assistant's* text
  (what it asked, what it answered) and updates the hidden state from the case itself. The user's
  reply text is then produced from that state: by templates (``TurnResult.reply``, the rule-based
  user) or by an LLM user simulator (:mod:`itpo_batch.sim.users`) that gets :meth:`Episode.user_brief`.
  The outcome and the oracle stay rule-based either way.
* **Outcome.** ``outcome = clip(score + cost, -1, 1)`` with ``score`` the task metric in [0, 1]
  (exact answer, BLEU, correct diagnosis) and ``cost = -word_cost × assistant words``, the official
  ``token_amount`` metric restricted to the assistant (the official code also counts the simulated
  user's words, which adds noise that the policy does not control: docs/method.md §9.3). Both parts are
  kept in ``metadata`` so the PRM can be trained on the score alone, as the official code does.
* **Oracle utility** of each assistant turn is defined per task (documented in each module) and is
  never shown to the algorithms; it measures whether turn credit agrees with the truth.
* **Termination.** The assistant commits (final answer / final draft / diagnosis), the user ends, or
  ``max_assistant_turns`` (5) assistant turns have been taken. Unlike the official loop, the last
  generated turn is kept (docs/method.md §9.4).
* **Randomness.** Every episode owns a ``numpy.random.Generator`` derived from the seed and the episode
  index, so episodes are reproducible one by one, whatever the batch they run in.

New tasks subclass :class:`Task` (and :class:`Episode`) in one module and are loaded by name from
:data:`TASKS` or as ``module:Class`` (:func:`load_task`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from itpo_batch.core.config import from_mapping
from itpo_batch.core.errors import ItpoError

Message = dict[str, str]


@dataclass
class TaskConfig:
    """Settings shared by every task."""

    max_assistant_turns: int = 5
    "Episode ends after this many assistant turns."
    word_cost: float = 5e-5
    "Cost per assistant word subtracted from the score (official token_amount weight)."
    user_noise: float = 0.05
    "Probability that the rule-based user answers a clear question wrongly or vaguely (tasks define how)."


@dataclass
class TurnResult:
    """What the environment says after one assistant message."""

    reply: str | None
    "The rule-based user's next message, or None when the conversation ends without a reply."
    utility: float
    "Oracle utility of this assistant turn (task-defined; 0 for a turn that achieves nothing)."
    done: bool
    "Whether the conversation is over."
    info: dict[str, Any] = field(default_factory=dict)
    "What the parser understood (e.g. {'asked': ['fever'], 'committed': False}); for tests and debugging."


@dataclass
class EpisodeResult:
    """The sparse outcome at the end of an episode."""

    score: float
    "Task metric in [0, 1]."
    cost: float
    "Word cost (<= 0)."
    outcome: float
    "clip(score + cost, -1, 1): the conversation's logged outcome."
    success: bool
    "Whether the task was solved (exact answer, correct diagnosis, BLEU above the task's threshold)."


class Episode(ABC):
    """One conversation with a hidden case. Subclasses implement the three abstract methods."""

    def __init__(self, task: Task, case: Any, rng: np.random.Generator):
        self.task, self.case, self.rng = task, case, rng
        self.messages: list[Message] = []
        self.utilities: list[float] = []
        self.assistant_words = 0
        self.done = False

    @abstractmethod
    def opening(self) -> list[Message]:
        """The first messages (optional system prompt, then the user's opening). Called once."""

    @abstractmethod
    def _assistant_turn(self, text: str) -> TurnResult:
        """Parse one assistant message, update the state, return reply, utility and done."""

    @abstractmethod
    def _score(self) -> tuple[float, bool]:
        """(task metric in [0, 1], success) of the finished conversation."""

    @abstractmethod
    def user_brief(self) -> str:
        """Plain-text description of the hidden case for an LLM user simulator (who the user is, what
        they know and want). The rule-based state tracking does not depend on it."""

    def start(self) -> list[Message]:
        self.messages = list(self.opening())
        return list(self.messages)

    def step(self, text: str) -> TurnResult:
        """Record an assistant message and let the environment answer (the template reply is appended;
        :meth:`replace_last_reply` swaps in an LLM user's wording)."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        self.messages.append({"role": "assistant", "content": text})
        self.assistant_words += count_words(text)
        res = self._assistant_turn(text)
        n_turns = len(self.utilities) + 1
        if n_turns >= self.task.config.max_assistant_turns:
            res.done = True
        if res.done:
            res.reply = None
        self.utilities.append(float(res.utility))
        self.done = res.done
        if res.reply is not None:
            self.messages.append({"role": "user", "content": res.reply})
        return res

    def replace_last_reply(self, text: str) -> None:
        """Use another user simulator's wording for the last user message (state is unchanged)."""
        assert self.messages and self.messages[-1]["role"] == "user"
        self.messages[-1] = {"role": "user", "content": text}

    def result(self) -> EpisodeResult:
        score, success = self._score()
        score = float(np.clip(score, 0.0, 1.0))  # e.g. sacrebleu can return 1.0000000000000004
        cost = -self.task.config.word_cost * self.assistant_words
        return EpisodeResult(score, cost, float(np.clip(score + cost, -1.0, 1.0)), success)


class Task(ABC):
    """A family of hidden cases and the episode class that plays them."""

    name: ClassVar[str]
    episode_cls: ClassVar[type[Episode]]
    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    "The task's settings: :class:`TaskConfig` or a subclass with the task's own knobs (difficulty)."

    def __init__(self, config: TaskConfig | None = None):
        if config is not None and not isinstance(config, self.config_cls):  # shared settings only: the
            config = self.config_cls(**dataclasses.asdict(config))  # task's own keep their defaults
        self.config = config or self.config_cls()

    @abstractmethod
    def sample_case(self, rng: np.random.Generator) -> Any:
        """Draw one hidden case."""

    @abstractmethod
    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        """The scripted behaviour policy's next assistant message. With probability ``skill`` it takes
        a useful action (asks for something still unknown, or commits when it knows enough); otherwise
        it guesses early or asks something irrelevant. Outcomes therefore vary within a group."""

    def episode(self, case: Any, rng: np.random.Generator) -> Episode:
        return self.episode_cls(self, case, rng)


def count_words(text: str) -> int:
    return len(text.split())


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens of free text (for keyword and synonym matching)."""
    return _WORD.findall(text.lower())


def fuzzy_has(text_words: list[str], keyword: str, max_typos: int | None = None) -> bool:
    """Whether ``keyword`` (one word or a phrase) occurs in ``text_words``, allowing small typos:
    exact for words under 4 letters, one edit for 4–9 letters, two from 10 letters; an edit is an
    insertion, deletion, substitution or swap of two neighbouring letters ("fevre" ~ "fever").
    Real words one edit from a keyword ("never" ~ "fever") are guarded against by the tasks'
    parsers (:mod:`itpo_batch.sim.envs.textparse`)."""
    parts = keyword.lower().split()
    n = len(parts)
    for i in range(len(text_words) - n + 1):
        if all(_close(text_words[i + j], parts[j], max_typos) for j in range(n)):
            return True
    return False


def _close(a: str, b: str, max_typos: int | None) -> bool:
    if a == b:
        return True
    limit = max_typos if max_typos is not None else (0 if len(b) < 4 else 1 if len(b) < 10 else 2)
    if limit == 0 or abs(len(a) - len(b)) > limit:
        return False
    return _edit_distance(a, b, limit) <= limit


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (Levenshtein plus adjacent swaps), cut off above ``limit``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            cur.append(d)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


TASKS: dict[str, str] = {
    "math": "itpo_batch.sim.envs.math:MathTutoring",
    "docwrite": "itpo_batch.sim.envs.docwrite:DocWriting",
    "medical": "itpo_batch.sim.envs.medical:MedicalDiagnosis",
    "clarify": "itpo_batch.sim.envs.clarify:Clarify",
}


def load_task(spec: str, config: TaskConfig | None = None, settings: Mapping[str, Any] | None = None) -> Task:
    """A built-in task by name (math, docwrite, medical, clarify) or a user's task as ``module:Class``.

    ``settings`` (``--set task_settings.KEY=VALUE``) builds the task's own config class
    (:attr:`Task.config_cls`); an unknown key is an error that lists the task's settings.
    """
    target = TASKS.get(spec, spec)
    if ":" not in target:
        raise ItpoError(f"unknown task {spec!r}: use one of {', '.join(TASKS)} or module:Class")
    module, cls_name = target.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ItpoError(f"cannot load task {spec!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ItpoError(f"{spec!r} is not a subclass of itpo_batch.sim.envs.base.Task")
    if settings:
        if config is not None:
            raise ItpoError("load_task: give a config or settings, not both")
        config = from_mapping(cls.config_cls, settings, where="task_settings.")
    return cls(config)


def episode_rng(seed: int, *index: int) -> np.random.Generator:
    """Generator for one case or episode: ``episode_rng(seed, group)`` draws the hidden case of a group,
    ``episode_rng(seed, group, member)`` drives one conversation of it (user noise, scripted policy)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *index]))


def play_scripted(task: Task, seed: int, group: int, member: int, skill: float) -> Episode:
    """Play one conversation of group ``group`` with the scripted policy, without any model (tests, benches).

    The case comes from ``episode_rng(seed, group)``; the episode and the policy share
    ``episode_rng(seed, group, member)``, as in :func:`itpo_batch.sim.rollout.rollout` with a scripted policy.
    """
    rng = episode_rng(seed, group, member)
    ep = task.episode(task.sample_case(episode_rng(seed, group)), rng)
    ep.start()
    while not ep.done:
        ep.step(task.scripted_reply(ep, rng, skill))
    return ep
