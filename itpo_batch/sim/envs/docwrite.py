"""Document writing: a hidden target document, elicited by questions and drafts, scored by word BLEU.

The counterpart of the paper's document-writing task (docs/method.md §9.1), rebuilt without an LLM user
or judge, and with word-level BLEU instead of the official character-level one (docs/method.md §9.5).

**Case generator.** A case (:class:`DocCase`) is one of six scenarios (:data:`SCENARIOS`: announcement,
product update, thank-you note, invitation, blog intro, reminder; each a document kind, a topic and a pool
of six key points), an audience (:data:`AUDIENCES`, six), a tone (:data:`TONES`: formal, friendly,
enthusiastic, casual), a length (``short``: no closing line; ``detailed``: the tone's closing line) and 2–4
distinct key points of the scenario's pool, in order, all drawn uniformly. :func:`render_document` turns
these attributes into the target deterministically: an opening sentence (tone greeting, audience address,
scenario purpose), one sentence per key point in the tone's frame, then the closing line if ``detailed``
(3–6 sentences). The user's opening names the kind, the topic and the first key point, nothing else; the
*hidden attributes* are tone, audience, length and the other 1–3 points (``n_hidden`` = 2 + #points).

**Parser** (an assistant message is read in this order):

1. *Draft.* The text before the first ``:`` has 1–6 words, one of them ``draft`` or ``version``, and at
   least 3 words follow the colon. The document is everything after the colon, stripped. The draft is
   *final* (a commit) if that head also has ``final`` (``Final draft: ...``). Head words match with
   :func:`fuzzy_has` typo tolerance.
2. *Question.* Otherwise every category whose keywords (:data:`KEYWORDS`: synonyms and phrases such as
   "who will read", "how should it sound") occur in the message is asked: tone, audience, points, length.
   A keyword word of 6+ letters tolerates typos as :func:`fuzzy_has` does (1 edit for 6–7 letters, 2 for
   longer); shorter ones must match exactly, because one edit turns "tone" into "one", "cover" into
   "over" and "long" into "along" (:func:`has_keyword`).
3. *Irrelevant question.* No category, but a ``?``: the user says it does not matter.
4. *Unparseable.* Anything else: a confused reply.

**User.** A question reveals every asked attribute; a points question reveals all remaining points at
once (or says there is nothing more). A non-final draft gets feedback naming the *first* thing still
wrong, in this order: tone, a missing point, audience, an extra point, length (judged from tone marker
phrases, point keywords, the audience's address word and closing phrases in the draft), and the feedback
reveals that attribute (an extra point is marked rejected); a draft with nothing wrong is approved. With
probability ``config.user_noise`` a question or a draft gets a vague reply that reveals nothing.

**Outcome.** ``score`` = word-level BLEU of the final draft against the target: sacrebleu's
``sentence_bleu`` with its defaults (13a tokenisation, case-sensitive, exp smoothing, effective order)
divided by 100. Without a final draft (turn limit) the *last* draft counts; without any draft the score
is 0. ``success`` = score ≥ :data:`SUCCESS_BLEU` = 0.7: right tone and nearly all points. (At 0.5 a draft
with the wrong tone, or half the points missing, could pass, and a policy that drafts at random
succeeded about half the time.) The base class adds the word cost.

**Oracle utility** of an assistant turn:

* question: (hidden attributes newly revealed by it) / ``n_hidden``, so the question utilities of an
  episode sum to at most 1; 0 for an irrelevant, repeated or vaguely answered question;
* draft, final or not: ``max(0, BLEU(draft) − best BLEU of the earlier drafts)`` (the best is 0 before
  any draft). What its feedback reveals is *not* credited: a draft is worth the progress of the document;
* unparseable: 0.

**Scripted policy** (:meth:`DocWriting.scripted_reply`; it reads the revealed state from the episode).
With probability ``skill``: ask about the next unknown category (tone, audience, points, length, with the
:data:`ASK` templates) or, when all are known or only one turn is left, send ``Final draft: `` plus the
document rendered from what is known (unknown points left out, other unknowns guessed). Otherwise: an
irrelevant question (40 %), ``Draft: `` (30 %) or ``Final draft: `` (30 %) with a document rendered from
what is known, unknowns guessed at random (plus one guessed point while points are unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs.base import Episode, Message, Task, TaskConfig, TurnResult, fuzzy_has, words
from itpo_batch.sim.envs.docwrite_content import (
    ASK,
    AUDIENCES,
    CATEGORIES,
    CONFUSED,
    IRRELEVANT,
    KEYWORDS,
    LENGTHS,
    SCENARIOS,
    SYSTEM,
    TONES,
    VAGUE,
    VAGUE_FEEDBACK,
)

SUCCESS_BLEU = 0.7
"BLEU (in [0, 1]) from which a final draft counts as a success."
P_IRRELEVANT, P_DRAFT = 0.4, 0.3
"Scripted policy, unskilled branch: irrelevant question, early draft, else early final draft."


_BLEU = BLEU(effective_order=True)  # the metric object behind sacrebleu.sentence_bleu, built once


@dataclass(frozen=True)
class DocCase:
    scenario: int
    "Index into SCENARIOS."
    audience: str
    tone: str
    length: str
    points: tuple[int, ...]
    "Indices into the scenario's points, in the order of the document."

    @property
    def attrs(self) -> dict[str, str]:
        return {"audience": self.audience, "tone": self.tone, "length": self.length}

    @property
    def target(self) -> str:
        return render_document(self.scenario, self.audience, self.tone, self.length, list(self.points))


def render_document(scenario: int, audience: str, tone: str, length: str, points: list[int]) -> str:
    """The document these attributes describe (targets and scripted drafts share this template)."""
    sc, t = SCENARIOS[scenario], TONES[tone]
    sentences = [t.opening.format(address=AUDIENCES[audience].address, purpose=sc.purpose)]
    sentences += [t.point.format(clause=sc.points[p][1]) for p in points]
    if length == "detailed":
        sentences.append(t.closing)
    return " ".join(sentences)


def bleu(hypothesis: str, reference: str) -> float:
    """Word-level sentence BLEU in [0, 1] (sacrebleu defaults), not the official character-level one.
    Clipped, since sacrebleu's exp/log arithmetic can return 100.00000000000004 for an exact match."""
    return min(1.0, _BLEU.sentence_score(hypothesis, [reference]).score / 100.0)


def has_keyword(ws: list[str], keyword: str) -> bool:
    """``fuzzy_has`` per word, but exact for words under 6 letters (see the module docstring)."""
    parts = keyword.split()
    return any(
        all(_word_match(ws[i + j], p) for j, p in enumerate(parts)) for i in range(len(ws) - len(parts) + 1)
    )


def _word_match(word: str, part: str) -> bool:
    if word == part:
        return True
    if len(part) < 6 or abs(len(word) - len(part)) > 2:  # fast exits before the edit distance
        return False
    return fuzzy_has([word], part)


def parse_draft(text: str) -> tuple[str, bool] | None:
    """(document, is_final) if the message is a draft (rule 1 of the module docstring), else None."""
    head, sep, body = text.partition(":")
    head_ws = words(head)
    if not sep or not 1 <= len(head_ws) <= 6 or len(body.split()) < 3:
        return None
    if not (fuzzy_has(head_ws, "draft") or fuzzy_has(head_ws, "version")):
        return None
    return body.strip(), fuzzy_has(head_ws, "final")


def asked_categories(text: str) -> list[str]:
    ws = words(text)
    return [c for c in CATEGORIES if any(has_keyword(ws, k) for k in KEYWORDS[c])]


class DocEpisode(Episode):
    case: DocCase

    def __init__(self, task: Task, case: DocCase, rng: np.random.Generator):
        super().__init__(task, case, rng)
        self.known: dict[str, str] = {}
        "Revealed audience / tone / length."
        self.known_points: list[int] = [case.points[0]]
        "Revealed points, in the order they were revealed."
        self.rejected: set[int] = set()
        "Points the user asked to drop."
        self.drafts: list[str] = []
        self.best_bleu = 0.0
        self.final: str | None = None
        self.n_hidden = 2 + len(case.points)

    # -- state -----------------------------------------------------------------------------------
    def unknown(self) -> list[str]:
        """Categories with something still hidden, in the scripted policy's asking order."""
        points_known = len(self.known_points) == len(self.case.points)
        return [c for c in CATEGORIES if c not in self.known and not (c == "points" and points_known)]

    def opening(self) -> list[Message]:
        sc = SCENARIOS[self.case.scenario]
        first = sc.points[self.case.points[0]][1]
        ask = f"Can you help me write {sc.kind} about {sc.topic}? It should say that {first}."
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]

    def user_brief(self) -> str:
        c, sc = self.case, SCENARIOS[self.case.scenario]
        pts = "; ".join(sc.points[p][1] for p in c.points)
        size = "short, without a closing line" if c.length == "short" else "with a closing line"
        return (
            f"You want {sc.kind} about {sc.topic} for {AUDIENCES[c.audience].described}. "
            f"It should sound {c.tone} and be {size}. Key points, in order: {pts}. You have only told the "
            f"assistant the first point. Answer only what you are asked; when shown a draft, name one thing "
            f"that is still wrong."
        )

    # -- one assistant turn ----------------------------------------------------------------------
    def _assistant_turn(self, text: str) -> TurnResult:
        draft = parse_draft(text)
        if draft is not None:
            return self._draft(*draft)
        asked = asked_categories(text)
        if asked:
            return self._question(asked)
        if "?" in text:
            return TurnResult("That doesn't matter to me.", 0.0, False, {"act": "irrelevant"})
        return TurnResult(CONFUSED, 0.0, False, {"act": "confused"})

    def _question(self, asked: list[str]) -> TurnResult:
        info: dict[str, Any] = {"act": "question", "asked": asked, "revealed": []}
        if self.rng.random() < self.task.config.user_noise:
            return TurnResult(VAGUE, 0.0, False, info)
        replies = [self._reveal(c, info["revealed"]) for c in asked]
        return TurnResult(" ".join(replies), len(info["revealed"]) / self.n_hidden, False, info)

    def _reveal(self, category: str, revealed: list[str]) -> str:
        """Reveal one category (appending what is new to ``revealed``) and say it."""
        c, sc = self.case, SCENARIOS[self.case.scenario]
        if category == "points":
            todo = [p for p in c.points if p not in self.known_points]
            if not todo:
                return "That's all I want to mention."
            self.known_points += todo
            revealed += [f"point:{p}" for p in todo]
            return "Please mention that " + ", and that ".join(sc.points[p][1] for p in todo) + "."
        if category not in self.known:
            self.known[category] = c.attrs[category]
            revealed.append(category)
        if category == "audience":
            return f"It's for {AUDIENCES[c.audience].described}."
        if category == "tone":
            return f"Make it {c.tone}."
        return "Keep it short, no closing line." if c.length == "short" else "Please end with a closing line."

    def _draft(self, doc: str, final: bool) -> TurnResult:
        score = bleu(doc, self.case.target)
        gain = max(0.0, score - self.best_bleu)
        self.drafts.append(doc)
        self.best_bleu = max(self.best_bleu, score)
        info = {"act": "final" if final else "draft", "bleu": score}
        if final:
            self.final = doc
            return TurnResult(None, gain, True, info)
        if self.rng.random() < self.task.config.user_noise:
            return TurnResult(VAGUE_FEEDBACK, gain, False, info)
        return TurnResult(self._feedback(doc, info), gain, False, info)

    def _feedback(self, doc: str, info: dict[str, Any]) -> str:
        """Name the first thing still wrong in the draft and reveal it (order: module docstring)."""
        c, sc, ws = self.case, SCENARIOS[self.case.scenario], words(doc)
        in_doc = [p for p in range(len(sc.points)) if has_keyword(ws, sc.points[p][0])]
        counts = {t: sum(has_keyword(ws, m) for m in TONES[t].markers) for t in TONES}
        if counts[c.tone] == 0 or max(counts.values()) > counts[c.tone]:
            self.known["tone"], info["wrong"] = c.tone, "tone"
            return f"Please make it more {c.tone}."
        missing = [p for p in c.points if p not in in_doc]
        if missing:
            info["wrong"] = "points"
            if missing[0] not in self.known_points:
                self.known_points.append(missing[0])
            return f"Also mention that {sc.points[missing[0]][1]}."
        if not has_keyword(ws, AUDIENCES[c.audience].marker):
            self.known["audience"], info["wrong"] = c.audience, "audience"
            return f"It should be addressed to {AUDIENCES[c.audience].described}."
        extra = [p for p in in_doc if p not in c.points]
        if extra:
            self.rejected.add(extra[0])
            info["wrong"] = "extra"
            return f"Please drop the part about {sc.points[extra[0]][0]}."
        closing = any(has_keyword(ws, t.markers[-1]) for t in TONES.values())
        if closing != (c.length == "detailed"):
            self.known["length"], info["wrong"] = c.length, "length"
            return "Please end with a closing line." if not closing else "Keep it short, no closing line."
        return "This looks good to me."

    def _score(self) -> tuple[float, bool]:
        doc = self.final if self.final is not None else (self.drafts[-1] if self.drafts else None)
        score = 0.0 if doc is None else bleu(doc, self.case.target)
        return score, score >= SUCCESS_BLEU


@dataclass
class DocWriteConfig(TaskConfig):
    """Docwrite's settings (``--set task_settings.…``); the defaults are the task as documented above.

    Difficulty knobs: ``n_tones`` and ``n_audiences`` keep the first n of :data:`TONES` and
    :data:`AUDIENCES` (fewer to guess from), ``max_points`` caps the key points (2 to this many, so
    1 to max−1 hidden). The drafts' guesses follow the same pools.
    """

    n_tones: int = len(TONES)
    "Tones in play (1–4)."
    n_audiences: int = len(AUDIENCES)
    "Audiences in play (1–6)."
    max_points: int = 4
    "Most key points per document (2–4)."

    def __post_init__(self) -> None:
        if not (1 <= self.n_tones <= len(TONES) and 1 <= self.n_audiences <= len(AUDIENCES)
                and 2 <= self.max_points <= 4):  # fmt: skip
            raise ItpoError(
                f"task settings: n_tones 1..{len(TONES)}, n_audiences 1..{len(AUDIENCES)}, max_points 2..4"
            )


class DocWriting(Task):
    """Write a short document whose audience, tone, length and key points the user reveals when asked."""

    name = "docwrite"
    episode_cls = DocEpisode
    config_cls = DocWriteConfig
    config: DocWriteConfig

    def sample_case(self, rng: np.random.Generator) -> DocCase:
        scenario = int(rng.integers(len(SCENARIOS)))
        cfg = self.config
        audience = str(rng.choice(list(AUDIENCES)[: cfg.n_audiences]))
        tone = str(rng.choice(list(TONES)[: cfg.n_tones]))
        length = str(rng.choice(LENGTHS))
        n = int(rng.integers(2, cfg.max_points + 1))
        points = tuple(int(p) for p in rng.choice(len(SCENARIOS[scenario].points), n, replace=False))
        return DocCase(scenario, audience, tone, length, points)

    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        assert isinstance(episode, DocEpisode)
        last = len(episode.utilities) >= self.config.max_assistant_turns - 1
        if rng.random() < skill:
            unknown = episode.unknown()
            if unknown and not last:
                return ASK[unknown[0]]
            return "Final draft: " + self._draft_from_state(episode, rng, guess_point=False)
        r = rng.random()
        if r < P_IRRELEVANT:
            return str(rng.choice(IRRELEVANT))
        marker = "Draft: " if r < P_IRRELEVANT + P_DRAFT else "Final draft: "
        return marker + self._draft_from_state(episode, rng, guess_point=True)

    @staticmethod
    def _draft_from_state(ep: DocEpisode, rng: np.random.Generator, guess_point: bool) -> str:
        """Render what is known; guess unknown audience/tone/length, and maybe one unknown point."""
        cfg = ep.task.config
        assert isinstance(cfg, DocWriteConfig)
        guess = {"audience": list(AUDIENCES)[: cfg.n_audiences], "tone": list(TONES)[: cfg.n_tones],
                 "length": list(LENGTHS)}  # fmt: skip
        attrs = {k: ep.known.get(k) or str(rng.choice(v)) for k, v in guess.items()}
        points = list(ep.known_points)
        pool = [p for p in range(len(SCENARIOS[ep.case.scenario].points)) if p not in [*points, *ep.rejected]]
        if guess_point and "points" in ep.unknown() and pool:
            points.append(int(rng.choice(pool)))
        return render_document(ep.case.scenario, attrs["audience"], attrs["tone"], attrs["length"], points)
