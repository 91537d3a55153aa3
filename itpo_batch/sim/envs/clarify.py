"""Clarify: the learning sanity task ("CartPole" of this toolkit; docs/method.md §9.1).

The user makes an **ambiguous request** ("Can you pick a drink for me?") with a hidden preference among
``n_options`` items of a category. Answering at once is a guess (success 1/n_options); asking one
clarifying question first reveals the preference, and naming it then succeeds. The better behaviour is
plain, one decision (the first words of the first turn) separates it from the worse one, and the tiny
model learns it in minutes: this is the check that the update path of every arm learns at all, and it
catches regressions no unit test can (``tests/test_sanity.py``).

**Cases.** A category (drink, colour, fruit, pet) and a preference drawn uniformly from its first
``n_options`` items (:data:`OPTIONS`); the user opens with one of :data:`OPENINGS`. With probability
``explicit_rate`` (0 by default) the request is not ambiguous: the opening also states the preference
("… I would like tea."). The sanity π_0 is imitated from logs with explicit requests, where it learns to
name a stated preference (the skill asking needs afterwards), and is evaluated on ambiguous ones.

**Parser** (one assistant message, split into sentences by ``textparse.sentences``):

* *Answer*: the first sentence that is **not a question** and names an option of the category commits
  to the option it names first ("Here is your tea."). The conversation ends.
* *Clarifying question*: otherwise, a message with a question ("Which drink would you like?", "Tea or
  coffee?") makes the user state the preference ("I would like tea."), or, with probability
  ``user_noise``, answer vaguely ("Anything is fine.") and reveal nothing.
* Anything else gets :data:`CONFUSED` and reveals nothing.

**Outcome.** ``score = 1`` if the committed option is the preference, else 0 (a wrong answer or none
within ``max_assistant_turns``, 3 by default). The word cost defaults to 0 here (:class:`ClarifyConfig`).

**Oracle utility** of an assistant turn (the same units as the medical task): the entropy drop of the
assistant's belief over the preference, in bits (``log2(n_options)`` for the turn whose question reveals
it, 0 otherwise), plus 1 for committing to the right option (0 for a wrong one).

**Scripted policy** (:meth:`Clarify.scripted_reply`). ``skill`` is the probability of asking before
answering: with probability ``skill`` an unrevealed preference is asked for, else an option is guessed
uniformly; a revealed (or stated) preference is always named. π_0 for the sanity check imitates this
policy at a low skill (:func:`itpo_batch.run.sanity.sanity_pi0`), so on ambiguous requests it starts near
``skill + (1 - skill) / n_options``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs import textparse as tp
from itpo_batch.sim.envs.base import Episode, Message, Task, TaskConfig, TurnResult, words

OPTIONS: dict[str, tuple[str, ...]] = {
    "drink": ("tea", "coffee", "juice", "water", "milk", "soda"),
    "colour": ("red", "blue", "green", "black", "white", "pink"),
    "fruit": ("apple", "banana", "grape", "lemon", "mango", "peach"),
    "pet": ("cat", "dog", "fish", "bird", "rabbit", "horse"),
}
OPENINGS = (
    "Can you pick a {category} for me?",
    "Please choose a {category} for me.",
    "I need a {category}. Which one should I take?",
)
CONFUSED = "Sorry, I do not understand. I just want a {category}."
VAGUE = "Anything is fine, I guess."
ASK = "Which {category} would you like?"
STATED = "I would like {option}."
ANSWER = "Here is your {option}."


@dataclass
class ClarifyConfig(TaskConfig):
    """Clarify's settings (``--set task_settings.…``); the shared ones come from :class:`TaskConfig`."""

    max_assistant_turns: int = 3
    "A clarifying question and an answer fit; a third turn allows one more question after a vague reply."
    word_cost: float = 0.0
    "No word cost: length is not what this task tests (with it, GRPO's per-group z-score turns the 1e-4 cost differences of a group that all succeeded into ±1 advantages for the shortest reply, i.e. for guessing)."
    n_options: int = 5
    "Options per category (2–6): a guess succeeds with probability 1/n_options."
    explicit_rate: float = 0.0
    "Share of requests that already state the preference (not ambiguous; naming it succeeds at once)."

    def __post_init__(self) -> None:
        if not 2 <= self.n_options <= 6:
            raise ItpoError(f"task setting n_options must be in 2..6, got {self.n_options}")
        if not 0.0 <= self.explicit_rate <= 1.0:
            raise ItpoError(f"task setting explicit_rate must be in [0, 1], got {self.explicit_rate}")


@dataclass(frozen=True)
class ClarifyCase:
    category: str
    preference: str
    opening: str
    explicit: bool = False
    "The opening states the preference (nothing to ask)."


def committed_option(text: str, options: tuple[str, ...]) -> tuple[str | None, bool]:
    """(option committed to, whether the message asks something), by the parser rules above."""
    table = {o: [o] for o in options}
    asked = False
    for sent, is_question in tp.sentences(text):
        named = tp.spans(words(sent), table)
        if is_question:
            asked = True
        elif named:
            return named[0][2], asked
    return None, asked


class ClarifyEpisode(Episode):
    case: ClarifyCase
    task: Clarify

    def __init__(self, task: Task, case: ClarifyCase, rng: np.random.Generator):
        super().__init__(task, case, rng)
        self.revealed = case.explicit
        self.committed: str | None = None

    @property
    def options(self) -> tuple[str, ...]:
        return OPTIONS[self.case.category][: self.task.config.n_options]

    def opening(self) -> list[Message]:
        return [{"role": "user", "content": self.case.opening}]

    def _assistant_turn(self, text: str) -> TurnResult:
        option, asked = committed_option(text, self.options)
        info = {"committed": option, "asked": asked}
        if option is not None:
            self.committed = option
            return TurnResult(None, float(option == self.case.preference), True, info)
        if not asked:
            return TurnResult(CONFUSED.format(category=self.case.category), 0.0, False, info)
        if self.revealed:
            return TurnResult("As I said, " + STATED.format(option=self.case.preference), 0.0, False, info)
        if self.rng.random() < self.task.config.user_noise:
            return TurnResult(VAGUE, 0.0, False, info)
        self.revealed = True
        gain = float(np.log2(len(self.options)))
        return TurnResult(STATED.format(option=self.case.preference), gain, False, info)

    def _score(self) -> tuple[float, bool]:
        ok = self.committed == self.case.preference
        return float(ok), ok

    def user_brief(self) -> str:
        return (
            f"You want the assistant to pick a {self.case.category} for you. You secretly prefer "
            f"{self.case.preference}. If asked what you would like, say so briefly."
        )


class Clarify(Task):
    """An ambiguous request: ask which option the user wants, then name it (module docstring)."""

    name: ClassVar[str] = "clarify"
    episode_cls: ClassVar[type[Episode]] = ClarifyEpisode
    config_cls: ClassVar[type[TaskConfig]] = ClarifyConfig
    config: ClarifyConfig

    def sample_case(self, rng: np.random.Generator) -> ClarifyCase:
        categories = sorted(OPTIONS)
        category = categories[int(rng.integers(len(categories)))]
        preference = OPTIONS[category][int(rng.integers(self.config.n_options))]
        opening = OPENINGS[int(rng.integers(len(OPENINGS)))].format(category=category)
        explicit = bool(rng.random() < self.config.explicit_rate)
        if explicit:
            opening += " " + STATED.format(option=preference)
        return ClarifyCase(category, preference, opening, explicit)

    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        assert isinstance(episode, ClarifyEpisode)
        if episode.revealed:
            return ANSWER.format(option=episode.case.preference)
        if rng.random() < skill:
            return ASK.format(category=episode.case.category)
        options = episode.options
        return ANSWER.format(option=options[int(rng.integers(len(options)))])
