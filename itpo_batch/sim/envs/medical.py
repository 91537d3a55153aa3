"""Medical recommendation: ask about symptoms, then name a diagnosis (docs/method.md §9.1).

**Knowledge.** ``medical_kb.json`` (next to this module) lists 14 common diseases and 29 symptoms with
``P(symptom | disease)`` (unlisted pairs: ``background`` = 0.03), a mildly non-uniform prior (common cold
0.14 ... pneumonia 0.03), the keyword phrases the parser accepts for each symptom and disease, and the
wording the assistant (``ask``) and the patient (``have``) use. Illustrative numbers, not clinical data.

**Case generator** (:meth:`MedicalDiagnosis.sample_case`). Draw the disease from the prior; each symptom
is present independently with ``P(symptom | disease)`` (redrawn until at least one is present); the
*complaint* is a present symptom drawn uniformly, and the patient opens with it in one of a few templates
("Hi doctor, I have a fever. What could it be?"). Members of a group share the case and the opening.

**Parser** (one assistant message). The message is split into sentences (``textparse.sentences``).

* *Diagnosis*: a sentence that is **not a question** (does not end with ``?``) and names a disease
  (any keyword, typos tolerated by ``base.fuzzy_has``) commits. The first such sentence counts, and within
  it the disease named first ("It is not the flu, it is strep throat" commits to the flu). Questions
  that name a disease ("Could it be covid?") do not commit.
* *Symptom questions*: every symptom keyword in the sentences that do not commit, after removing the
  words of disease names ("Could it be strep throat?" asks nothing), counts as asked; several per
  message are fine. A sentence need not be a question ("Tell me if you have a fever").
* *Patient reply*: the patient answers the first ``max_answers`` (3) symptoms a message names and
  ignores the rest (listing every symptom in one message does not pay). Each newly asked symptom is answered truthfully from the hidden profile, flipped with
  probability ``config.user_noise``; the answer is remembered, so asking again gets the same answer
  ("As I said, ..."). The complaint is always answered "yes". A message that asks about no known symptom
  and commits to nothing gets ``CONFUSED`` ("I'm not sure what you mean. I just feel unwell.").

**Outcome.** ``score = 1`` if the committed disease is the hidden one, else 0 (wrong diagnosis, or no
diagnosis within ``max_assistant_turns``); ``success = score == 1``; ``outcome = clip(score + cost)``.

**Oracle utility** of an assistant turn = ``H(before) - H(after)`` (bits), the entropy of the naive-Bayes
posterior over diseases given the answers the patient actually gave, before and after this turn, plus 1
if the turn commits to the right disease (0 for a wrong one). The posterior (:func:`posterior`) uses the
prior, the complaint as an observed present symptom (likelihood ``P(s | d)``), and each answer with the
noisy likelihood ``q = P(s|d)(1-noise) + (1-P(s|d)) noise`` for "yes" (``1 - q`` for "no"). A turn that
learns nothing new (an already answered symptom, chit-chat, a confused reply) has utility exactly 0.
Symptoms named in the committing sentence are not asked; questions in the other sentences of a
committing message are answered (silently) and their information is added to the turn's utility.
**Negative utilities:** a surprising answer (e.g. a symptom unusual for the leading disease) can make
the posterior flatter, so ``H(after) > H(before)`` and the information term is negative. It is kept
signed, so the utilities of an episode sum to ``H(start) - H(end)`` plus the diagnosis bonus;
``TurnResult.info["expected_gain"]`` gives the expected information gain of the turn's new questions
(:func:`question_gain`, never negative), for analyses that want the value of the question rather than
of the answer.

**Scripted policy** (:meth:`MedicalDiagnosis.scripted_reply`). With probability ``skill``: diagnose the
most probable disease if its posterior is at least ``commit_threshold`` (0.8) or this is the last
allowed turn, else ask about ``symptoms_per_question`` (3) not-yet-asked symptoms, picked greedily to
maximise the question's expected information gain ("Do you have a fever, a cough or a sore throat?").
Otherwise, with probability ``guess_rate`` (0.3) diagnose now a disease drawn from the posterior or
(half of those times) uniformly, else waste the turn (small talk, or re-ask an answered symptom).
Diagnoses read "Based on your symptoms, the most likely diagnosis is {name}."
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs import textparse as tp
from itpo_batch.sim.envs.base import Episode, Message, Task, TaskConfig, TurnResult, words

CONFUSED = "I'm not sure what you mean. I just feel unwell."
OPENINGS = (
    "Hi doctor, I have {have}. What could it be?",
    "Hello, I'm not feeling well. I have {have}.",
    "I have {have} and I feel unwell. What do I have?",
    "Doctor, I have {have}. Can you help me?",
)
SMALL_TALK = ("Do you like sports?", "How is the weather today?", "What do you do for work?")
COMMIT_TEMPLATE = "Based on your symptoms, the most likely diagnosis is {name}."


@dataclass(frozen=True)
class Knowledge:
    """The disease × symptom table, as arrays, plus the parser's keyword tables."""

    diseases: tuple[str, ...]
    symptoms: tuple[str, ...]
    prior: np.ndarray  # [D], sums to 1
    p: np.ndarray  # [D, S] P(symptom | disease)
    disease_keywords: dict[str, list[str]]
    symptom_keywords: dict[str, list[str]]
    disease_name: dict[str, str]  # "the flu"
    ask: dict[str, str]  # "a fever"
    have: dict[str, str]  # patient's "I have ..." wording


@cache
def _raw() -> dict:
    return json.loads((Path(__file__).with_name("medical_kb.json")).read_text())


@cache
def knowledge() -> Knowledge:
    """Load ``medical_kb.json`` once."""
    raw = _raw()
    dis, sym = tuple(raw["diseases"]), tuple(raw["symptoms"])
    p = np.full((len(dis), len(sym)), float(raw["background"]))
    for i, d in enumerate(dis):
        for s, v in raw["diseases"][d]["symptoms"].items():
            p[i, sym.index(s)] = v
    prior = np.array([raw["diseases"][d]["prior"] for d in dis], dtype=float)
    return Knowledge(
        diseases=dis,
        symptoms=sym,
        prior=prior / prior.sum(),
        p=p,
        disease_keywords={d: [d, *raw["diseases"][d]["keywords"]] for d in dis},
        symptom_keywords={s: [s, *raw["symptoms"][s]["keywords"]] for s in sym},
        disease_name={d: raw["diseases"][d]["name"] for d in dis},
        ask={s: raw["symptoms"][s]["ask"] for s in sym},
        have={s: raw["symptoms"][s]["have"] for s in sym},
    )


@dataclass
class MedicalConfig(TaskConfig):
    """Medical's settings (``--set task_settings.…``); the defaults are the task as documented above.

    Difficulty knobs: ``n_diseases`` keeps the most common diseases (fewer candidates: easier),
    ``distinctiveness`` scales every ``P(symptom | disease)`` away from the background rate
    (``background + d · (p − background)``, clipped to [0.01, 0.99]; above 1 symptoms tell diseases
    apart better, below 1 worse), and ``user_noise`` (shared) is the patient's answer noise.
    """

    n_diseases: int = 14
    "Diseases in play: the n most common (2–14), prior renormalised."
    distinctiveness: float = 1.0
    "Scale of P(symptom | disease) − background (1: the knowledge base as written)."

    def __post_init__(self) -> None:
        if not 2 <= self.n_diseases <= len(knowledge().diseases):
            raise ItpoError(f"task setting n_diseases must be in 2..{len(knowledge().diseases)}")
        if self.distinctiveness <= 0:
            raise ItpoError("task setting distinctiveness must be > 0")


@lru_cache(maxsize=32)
def scaled_knowledge(n_diseases: int, distinctiveness: float) -> Knowledge:
    """:func:`knowledge` restricted to the ``n_diseases`` most common diseases, with symptom
    probabilities scaled by ``distinctiveness`` (:class:`MedicalConfig`). The parser keeps every
    disease's keywords: naming a disease out of play is a (wrong) diagnosis."""
    kb = knowledge()
    if n_diseases == len(kb.diseases) and distinctiveness == 1.0:
        return kb
    keep = np.sort(np.argsort(-kb.prior, kind="stable")[:n_diseases])
    background = float(_raw()["background"])
    p = np.clip(background + distinctiveness * (kb.p[keep] - background), 0.01, 0.99)
    prior = kb.prior[keep] / kb.prior[keep].sum()
    return Knowledge(tuple(kb.diseases[i] for i in keep), kb.symptoms, prior, p, kb.disease_keywords,
                     kb.symptom_keywords, kb.disease_name, kb.ask, kb.have)  # fmt: skip


def answer_likelihood(p: np.ndarray, noise: float) -> np.ndarray:
    """P(patient says "yes" | disease) for symptom probabilities ``p``, with answers flipped w.p. noise."""
    return p * (1.0 - noise) + (1.0 - p) * noise


def posterior(kb: Knowledge, complaint: str, answers: dict[str, bool], noise: float) -> np.ndarray:
    """Naive-Bayes posterior over ``kb.diseases`` given the complaint (an observed present symptom)
    and the patient's answers (noisy yes/no)."""
    logp = np.log(kb.prior) + np.log(kb.p[:, kb.symptoms.index(complaint)])
    for s, yes in answers.items():
        q = answer_likelihood(kb.p[:, kb.symptoms.index(s)], noise)
        logp += np.log(q if yes else 1.0 - q)
    post = np.exp(logp - logp.max())
    return post / post.sum()


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits along the last axis (0 log 0 = 0)."""
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log2(safe)).sum(axis=-1)


def question_gain(post: np.ndarray, q: np.ndarray) -> float:
    """Expected information gain (bits) of asking the symptoms of ``q`` [D, k] (P(yes | d) of each) in
    one question: all 2^k answer combinations, independent given the disease (naive Bayes)."""
    joint = post[:, None]  # [D, outcomes so far]
    for j in range(q.shape[1]):
        joint = np.concatenate([joint * q[:, j : j + 1], joint * (1.0 - q[:, j : j + 1])], axis=1)
    p_o = joint.sum(0)
    cond = entropy_bits((joint / np.maximum(p_o, 1e-300)).T)
    return max(float(entropy_bits(post) - (p_o * cond).sum()), 0.0)


def greedy_question(post: np.ndarray, q: np.ndarray, candidates: list[int], k: int) -> list[int]:
    """Up to ``k`` symptom indices (columns of ``q``) picked greedily to maximise :func:`question_gain`."""
    chosen: list[int] = []
    for _ in range(min(k, len(candidates))):
        rest = [c for c in candidates if c not in chosen]
        chosen.append(max(rest, key=lambda c: question_gain(post, q[:, [*chosen, c]])))
    return chosen


@dataclass(frozen=True)
class MedicalCase:
    """A hidden patient: the disease, the present symptoms, the opening complaint and its wording."""

    disease: str
    present: tuple[str, ...]
    complaint: str
    opening: str


@dataclass(frozen=True)
class Parsed:
    """What the parser understood in one assistant message."""

    asked: tuple[str, ...]
    committed: str | None


@lru_cache(maxsize=1 << 14)
def parse_message(text: str) -> Parsed:
    """Apply the parser rules of the module docstring to one assistant message (cached: scripted
    policies repeat their templates)."""
    kb = knowledge()
    asked: list[str] = []
    committed: str | None = None
    for sent, is_question in tp.sentences(text):
        ws = words(sent)
        named = tp.spans(ws, kb.disease_keywords)
        if named and not is_question and committed is None:
            committed = named[0][2]
            continue
        taken = {i for s, e, _ in named for i in range(s, e)}
        rest = [w if i not in taken else "" for i, w in enumerate(ws)]
        asked += tp.keys_in(rest, kb.symptom_keywords)
    return Parsed(tuple(dict.fromkeys(asked)), committed)


class MedicalEpisode(Episode):
    case: MedicalCase

    def __init__(self, task: Task, case: MedicalCase, rng: np.random.Generator):
        super().__init__(task, case, rng)
        self.kb = task.kb  # type: ignore[attr-defined]
        self.answers: dict[str, bool] = {}
        "Symptom -> the patient's answer (as given, possibly noisy), in order of asking."
        self.committed: str | None = None

    def opening(self) -> list[Message]:
        return [{"role": "user", "content": self.case.opening}]

    def posterior(self) -> np.ndarray:
        return posterior(self.kb, self.case.complaint, self.answers, self.task.config.user_noise)

    def known(self, symptom: str) -> bool:
        return symptom == self.case.complaint or symptom in self.answers

    def _assistant_turn(self, text: str) -> TurnResult:
        parsed = parse_message(text)
        asked = list(parsed.asked[: self.task.max_answers])
        post = self.posterior()
        new = [s for s in asked if not self.known(s)]
        q = answer_likelihood(
            self.kb.p[:, [self.kb.symptoms.index(s) for s in new]], self.task.config.user_noise
        )
        exp_gain = question_gain(post, q)
        for s in new:
            flip = self.rng.random() < self.task.config.user_noise
            self.answers[s] = (s in self.case.present) != flip
        gain = float(entropy_bits(post) - entropy_bits(self.posterior())) if new else 0.0
        info = {
            "asked": asked,
            "new": new,
            "committed": parsed.committed,
            "expected_gain": exp_gain,
        }
        if parsed.committed is not None:
            self.committed = parsed.committed
            return TurnResult(None, gain + float(parsed.committed == self.case.disease), True, info)
        reply = self._reply(asked, new) if asked else CONFUSED
        return TurnResult(reply, gain, False, info)

    def _answer(self, s: str) -> bool:
        return True if s == self.case.complaint else self.answers[s]

    def _reply(self, asked: list[str], new: list[str]) -> str:
        yes = [self.kb.have[s] for s in asked if self._answer(s)]
        no = [_bare(self.kb.ask[s]).replace("your", "my") for s in asked if not self._answer(s)]
        parts = []
        if yes:
            parts.append("Yes, I have " + _join(yes, "and") + ".")
        if no:
            parts.append(("But no " if yes else "No, no ") + _join(no, "or") + ".")
        prefix = "" if new else "As I said: "
        return prefix + " ".join(parts)

    def _score(self) -> tuple[float, bool]:
        ok = self.committed == self.case.disease
        return float(ok), ok

    def user_brief(self) -> str:
        kb = self.kb
        present = [_you(kb.have[s]) for s in kb.symptoms if s in self.case.present]
        absent = [_bare(kb.ask[s]) for s in kb.symptoms if s not in self.case.present]
        return (
            "You are a patient talking to a doctor. You do not know your diagnosis; never guess it. "
            f"You came in because you have {_you(kb.have[self.case.complaint])}. "
            f"Your symptoms: you have {_join(present, 'and')}. "
            f"You do not have {_join(absent, 'or')}. "
            "Answer each question about a symptom truthfully and briefly. If a question is not about your "
            "symptoms, say you are not sure what they mean and that you just feel unwell."
        )


def _bare(phrase: str) -> str:
    """Noun phrase without its article ("a sore throat" -> "sore throat")."""
    for art in ("a ", "an "):
        if phrase.startswith(art):
            return phrase[len(art) :]
    return phrase


def _you(phrase: str) -> str:
    """The patient's first-person wording addressed to them ("lost my sense" -> "lost your sense")."""
    return f" {phrase} ".replace(" my ", " your ").replace(" I ", " you ").strip()


def _join(items: list[str], conj: str) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {conj} " + items[-1]


class MedicalDiagnosis(Task):
    """Hidden disease with a symptom profile; ask about symptoms, then diagnose (module docstring)."""

    name: ClassVar[str] = "medical"
    episode_cls: ClassVar[type[Episode]] = MedicalEpisode
    config_cls: ClassVar[type[TaskConfig]] = MedicalConfig
    config: MedicalConfig
    max_answers: ClassVar[int] = 3
    "The patient answers at most this many symptoms per message (the first named; the rest are ignored)."
    commit_threshold: ClassVar[float] = 0.8
    "The scripted policy diagnoses once the most probable disease reaches this posterior."
    symptoms_per_question: ClassVar[int] = 3
    "How many symptoms one scripted question asks about (picked greedily by expected information gain)."
    guess_rate: ClassVar[float] = 0.3
    "Share of the scripted policy's non-useful actions that are early guesses (the rest waste the turn)."

    @property
    def kb(self) -> Knowledge:
        """The knowledge in play (:func:`scaled_knowledge` of the settings)."""
        return scaled_knowledge(self.config.n_diseases, self.config.distinctiveness)

    def sample_case(self, rng: np.random.Generator) -> MedicalCase:
        kb = self.kb
        d = int(rng.choice(len(kb.diseases), p=kb.prior))
        present: list[str] = []
        while not present:
            draws = rng.random(len(kb.symptoms)) < kb.p[d]
            present = [s for s, on in zip(kb.symptoms, draws, strict=True) if on]
        complaint = present[int(rng.integers(len(present)))]
        opening = OPENINGS[int(rng.integers(len(OPENINGS)))].format(have=kb.have[complaint])
        return MedicalCase(kb.diseases[d], tuple(present), complaint, opening)

    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        assert isinstance(episode, MedicalEpisode)
        kb, post = episode.kb, episode.posterior()
        last = len(episode.utilities) + 1 >= self.config.max_assistant_turns
        if rng.random() < skill:
            unasked = [i for i, s in enumerate(kb.symptoms) if not episode.known(s)]
            if last or post.max() >= self.commit_threshold or not unasked:
                return _commit(kb, int(post.argmax()))
            q = answer_likelihood(kb.p, self.config.user_noise)
            chosen = greedy_question(post, q, unasked, self.symptoms_per_question)
            return f"Do you have {_join([kb.ask[kb.symptoms[i]] for i in chosen], 'or')}?"
        if rng.random() < self.guess_rate:
            guess_p = post if rng.random() < 0.5 else None
            return _commit(kb, int(rng.choice(len(kb.diseases), p=guess_p)))
        answered = [episode.case.complaint, *episode.answers]
        if rng.random() < 0.5:
            return f"Do you have {kb.ask[answered[int(rng.integers(len(answered)))]]}?"
        return SMALL_TALK[int(rng.integers(len(SMALL_TALK)))]


def _commit(kb: Knowledge, d: int) -> str:
    return COMMIT_TEMPLATE.format(name=kb.disease_name[kb.diseases[d]])
