"""Math tutoring: the student's word problem lacks quantities the assistant must ask for (docs/method.md §9.1).

**Case generator** (:meth:`MathTutoring.sample_case`). Draw one of the 13 templates of
:mod:`itpo_batch.sim.envs.math_problems` (apples in bags, notebooks, train speed × time, garden area,
savings, cookie boxes, farm legs, money left after pencils, pages read, bus seats, marbles shared,
pizza slices left, wages), its 2–3 integer quantities (``max_value`` caps them) and a name; then hide
1 or 2 quantities (never more than the template has), uniformly. The opening states the known
quantities, replaces each hidden one by a vague sentence ("Anna buys some bags of apples."), and ends
with the question. The answer is an exact non-negative integer.

**Parser** (one assistant message). The message is split into sentences (``textparse.sentences``).

* *Answer*: a sentence that is **not a question** (does not end with ``?``) commits when either
  (a) the word ``answer`` or ``=`` is followed by a number (digits, or number words below 1000): the
  value is the first number after the last such marker that has one ("The answer is 24 apples, from
  4 bags" -> 24; "4 x 6 = 24 is the answer" -> 24; "The answer is twenty-four." -> 24); or (b) it
  contains ``answer``, ``=``, ``total``, ``altogether``, ``in all`` or ``therefore``, or starts with
  ``so``, and a number in **digits**: the value is its last digit number ("So she has 24 apples in
  total." -> 24; "24 is the answer." -> 24). Number words do not count in (b), so "Add the two numbers
  to get the total." does not commit. If several sentences commit, the **last** one counts. A
  statement without a marker ("She has 24 apples.") does not commit.
* *Questions*: in the other sentences, every keyword phrase of a quantity of this problem (typos
  tolerated by ``base.fuzzy_has``) counts as asking for it; several per message are fine.
* *Student reply*: a newly asked hidden quantity is answered with its sentence ("Anna buys four bags of
  apples."), the number in digits or words (even odds); with probability ``config.user_noise`` the
  student is vague instead ("I don't remember exactly, quite a few.") and the quantity stays hidden
  (asking again may work). A quantity already known is repeated ("As I said: ..."). A message that asks
  for no quantity and does not commit gets ``CONFUSED``.

**Outcome.** ``score = 1`` if the committed value equals the true answer, else 0 (wrong answer, or no
answer within ``max_assistant_turns``); ``success = score == 1``; ``outcome = clip(score + cost)``.

**Oracle utility** of an assistant turn: ``1 / n_hidden`` for each hidden quantity the student reveals
in reply to it (0 for a quantity already known, a vague reply, or an irrelevant question), plus 1 if the
turn commits to the correct answer (0 for a wrong one). Never negative; an episode that asks for
everything and answers right totals 2. Quantities asked in a committing message are still revealed.

**Scripted policy** (:meth:`MathTutoring.scripted_reply`). With probability ``skill``: ask for the first
still-hidden quantity with its template question, or, when all are known (or on the last allowed
turn), answer "The answer is {n}." with the value computed from what is known (hidden ones guessed).
Otherwise, with probability ``guess_rate`` answer a plausible wrong number now (the formula with
random values for hidden quantities, or the right value off by a few), else waste the turn (small
talk, or re-ask a known quantity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs import textparse as tp
from itpo_batch.sim.envs.base import Episode, Message, Task, TaskConfig, TurnResult, words
from itpo_batch.sim.envs.math_problems import PROBLEMS, Problem, Values

CONFUSED = "I'm not sure what you mean. Can you help me solve the problem?"
VAGUE = "I don't remember exactly, quite a few."
NAMES = ("Anna", "Ben", "Maria", "Omar", "Lena", "Ravi", "Sofia", "Tom", "Yuki", "Kofi", "Emma", "Lucas")
PREFIXES = ("", "Can you help me with this problem? ", "I need help with my homework. ")
SMALL_TALK = ("Do you like math?", "What grade are you in?", "How was your day?")
ANSWER_TEMPLATE = "The answer is {n}."
_VALUE_AFTER = re.compile(r"\banswer\b|=")
_MARKER = re.compile(r"\btotal\b|\baltogether\b|\bin all\b|\btherefore\b")
_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class MathCase:
    """A hidden problem: template index, all values, which are hidden, the name and the opening."""

    problem: int
    values: tuple[tuple[str, int], ...]
    hidden: tuple[str, ...]
    name: str
    opening: str

    @property
    def template(self) -> Problem:
        return PROBLEMS[self.problem]

    @property
    def answer(self) -> int:
        return self.template.solve(dict(self.values))


def fact(problem: Problem, key: str, value: int | str, name: str) -> str:
    """The sentence that states quantity ``key`` ("Anna buys 4 bags of apples.")."""
    q = next(q for q in problem.quantities if q.key == key)
    return q.known.format(v=value, name=name)


def parse_answer(text: str) -> float | None:
    """The committed value of a message by the answer rule of the module docstring, or None."""
    value = None
    for sent, is_question in tp.sentences(text):
        v = None if is_question else _sentence_value(sent.lower())
        value = v if v is not None else value
    return value


def _sentence_value(low: str) -> float | None:
    """Rules (a) then (b) of the module docstring for one lower-cased statement."""
    for end in reversed([m.end() for m in _VALUE_AFTER.finditer(low)]):
        tail = tp.numbers(low[end:])
        if tail:
            return tail[0]
    digits = _DIGITS.findall(low)
    if digits and (_VALUE_AFTER.search(low) or _MARKER.search(low) or words(low)[0] == "so"):
        return float(digits[-1].replace(",", ""))
    return None


@lru_cache(maxsize=1 << 14)
def parse_message(text: str, problem: int) -> tuple[tuple[str, ...], float | None]:
    """(quantities asked, committed value or None) of one assistant message about ``PROBLEMS[problem]``."""
    table = {q.key: q.keywords for q in PROBLEMS[problem].quantities}
    committed = parse_answer(text)
    asked: list[str] = []
    for sent, _ in tp.sentences(text):
        if committed is not None and parse_answer(sent) is not None:
            continue
        asked += tp.keys_in(words(sent), table)
    return tuple(dict.fromkeys(asked)), committed


class MathEpisode(Episode):
    case: MathCase

    def __init__(self, task: Task, case: MathCase, rng: np.random.Generator):
        super().__init__(task, case, rng)
        self.known: dict[str, int] = {k: v for k, v in case.values if k not in case.hidden}
        "Quantities the assistant has been told (stated in the opening or revealed since)."
        self.committed: float | None = None

    def opening(self) -> list[Message]:
        return [{"role": "user", "content": self.case.opening}]

    @property
    def still_hidden(self) -> list[str]:
        return [k for k in self.case.hidden if k not in self.known]

    def _assistant_turn(self, text: str) -> TurnResult:
        asked, committed = parse_message(text, self.case.problem)
        values, parts, revealed = dict(self.case.values), [], []
        for key in asked:
            v = values[key]
            if key in self.known:
                parts.append("As I said: " + fact(self.case.template, key, v, self.case.name))
            elif self.rng.random() < self.task.config.user_noise:
                parts.append(VAGUE)
            else:
                self.known[key] = v
                revealed.append(key)
                shown = tp.number_to_words(v) if self.rng.random() < 0.5 else str(v)
                parts.append(fact(self.case.template, key, shown, self.case.name))
        utility = len(revealed) / len(self.case.hidden)
        info = {"asked": list(asked), "revealed": revealed, "committed": committed}
        if committed is not None:
            self.committed = committed
            return TurnResult(None, utility + float(committed == self.case.answer), True, info)
        return TurnResult(" ".join(parts) if parts else CONFUSED, utility, False, info)

    def _score(self) -> tuple[float, bool]:
        ok = self.committed is not None and self.committed == self.case.answer
        return float(ok), ok

    def user_brief(self) -> str:
        c, p = self.case, self.case.template
        full = " ".join(fact(p, k, v, c.name) for k, v in c.values) + " " + p.question.format(name=c.name)
        missing = " ".join(fact(p, k, v, c.name) for k, v in c.values if k in c.hidden)
        return (
            "You are a student asking an AI tutor for help with a math word problem. "
            f"The full problem is: {full} "
            f"But you only wrote: {c.opening} "
            f"If the tutor asks for what you left out, tell them: {missing} "
            "Answer only what is asked, briefly. You do not know the answer and never solve the problem "
            "yourself. If a question has nothing to do with the problem, say you are not sure what they mean."
        )


@dataclass
class MathConfig(TaskConfig):
    """Math's settings (``--set task_settings.…``); the defaults are the task as documented above.

    Difficulty knobs: ``n_problems`` plays only the first n templates (fewer problem kinds to learn),
    ``max_hidden`` hides 1 to this many quantities (1: one question always suffices), ``max_value`` caps
    the quantities (fewer distinct answers: a small model must compute the answer, e.g. a product, and
    ``max_value=4`` on the first template leaves 9 products to learn instead of 64), ``user_noise``
    (shared) is the share of vague student replies.
    """

    n_problems: int = len(PROBLEMS)
    "Templates in play: the first n of math_problems.PROBLEMS (1–13)."
    max_hidden: int = 2
    "Most hidden quantities per problem (1 or 2)."
    max_value: int | None = None
    """Largest value of an independently drawn quantity (None: each quantity's own range). A range that
    starts above the cap keeps only its first value; the templates that draw their quantities jointly
    (money left, marbles shared, pizza slices) keep their own ranges."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_problems <= len(PROBLEMS) or self.max_hidden not in (1, 2):
            raise ItpoError(f"task settings: n_problems must be in 1..{len(PROBLEMS)}, max_hidden 1 or 2")
        if self.max_value is not None and self.max_value < 2:
            raise ItpoError(
                f"task settings: max_value must be >= 2 (the smallest quantity), got {self.max_value}"
            )


class MathTutoring(Task):
    """Word problem with hidden quantities; ask for them, then answer (module docstring)."""

    name: ClassVar[str] = "math"
    episode_cls: ClassVar[type[Episode]] = MathEpisode
    config_cls: ClassVar[type[TaskConfig]] = MathConfig
    config: MathConfig
    guess_rate: ClassVar[float] = 0.3
    "Share of the scripted policy's non-useful actions that are early wrong answers (the rest waste the turn)."

    def sample_case(self, rng: np.random.Generator) -> MathCase:
        i = int(rng.integers(self.config.n_problems))
        p = PROBLEMS[i]
        values = p.draw(rng, self.config.max_value)
        n_hidden = int(rng.integers(1, min(self.config.max_hidden, len(p.quantities)) + 1))
        hidden = [p.quantities[j].key for j in sorted(rng.choice(len(p.quantities), n_hidden, replace=False))]
        name = NAMES[int(rng.integers(len(NAMES)))]
        text = [q.unknown if q.key in hidden else q.known for q in p.quantities]
        body = " ".join(t.format(v=values[q.key], name=name) for t, q in zip(text, p.quantities, strict=True))
        opening = PREFIXES[int(rng.integers(len(PREFIXES)))] + body + " " + p.question.format(name=name)
        return MathCase(i, tuple(values.items()), tuple(hidden), name, opening)

    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        assert isinstance(episode, MathEpisode)
        case, hidden = episode.case, episode.still_hidden
        last = len(episode.utilities) + 1 >= self.config.max_assistant_turns
        if rng.random() < skill:
            if hidden and not last:
                q = next(q for q in case.template.quantities if q.key == hidden[0])
                return q.ask.format(name=case.name)
            return ANSWER_TEMPLATE.format(n=_guess(case, episode.known, rng, False, self.config.max_value))
        if rng.random() < self.guess_rate:
            return ANSWER_TEMPLATE.format(n=_guess(case, episode.known, rng, True, self.config.max_value))
        known = [q for q in case.template.quantities if q.key in episode.known]
        if known and rng.random() < 0.5:
            return known[int(rng.integers(len(known)))].ask.format(name=case.name)
        return SMALL_TALK[int(rng.integers(len(SMALL_TALK)))]


def _guess(case: MathCase, known: Values, rng: np.random.Generator, wrong: bool, cap: int | None) -> int:
    """The answer computed from ``known`` with random values for the rest; with ``wrong``, never the
    true answer (off by 1–3 when the formula happens to give it)."""
    p = case.template
    values = p.draw(rng, cap) | known
    n = max(p.solve(values), 0)
    if wrong and n == case.answer:
        n += int(rng.integers(1, 4)) * (1 if n < 3 or rng.random() < 0.5 else -1)
    return n
