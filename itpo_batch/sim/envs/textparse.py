"""Free-text helpers shared by the rule-based users of the simulated tasks.

The tasks read a model's free text with three small tools, all built on :func:`base.words` and
:func:`base.fuzzy_has` (so typos are tolerated the same way everywhere):

* :func:`sentences` splits a message into sentences and says which are questions (end with ``?``).
  A full stop inside a number (``2.5``) does not split.
* :func:`spans` finds every occurrence of the keyword phrases of a table ``{key: [phrase, ...]}`` in a
  word list, as ``(start, end, key)``; overlapping matches of the same key are kept once, the longest
  first. Tasks use it to find which symptom / quantity / disease a sentence names and where. A word
  of :data:`COMMON_WORDS` (frequent English words such as "never", "with", "step", "case") is never
  read as a typo of a keyword ("fever", "width", "strep", "face"): it matches only exactly.
* :func:`numbers` reads the numbers of a text in order: digits (``24``, ``1,200``, ``2.5``) and number
  words from zero to nine hundred ninety-nine (``twenty-four``, ``one hundred and five``).
  :func:`number_to_words` is its inverse for the user's replies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from itpo_batch.sim.envs.base import fuzzy_has, words

_SENTENCE = re.compile(r"(?:[^.!?\n]|\.(?=\d))*(?:[.!?]+|\n|$)")


def sentences(text: str) -> list[tuple[str, bool]]:
    """``(sentence, is_question)`` for each non-empty sentence of ``text``, in order."""
    out = []
    for m in _SENTENCE.finditer(text):
        s = m.group(0).strip()
        if s and words(s):
            out.append((s, s.rstrip().endswith("?")))
    return out


def find_all(ws: Sequence[str], phrase: str) -> list[int]:
    """Start indices where ``phrase`` occurs in ``ws``: fuzzy as :func:`base.fuzzy_has`, except that a
    word of :data:`COMMON_WORDS` only matches itself."""
    first, *rest = phrase.lower().split()
    return [
        i
        for i in range(len(ws) - len(rest))
        if _word_close(ws[i], first) and all(_word_close(ws[i + 1 + j], w) for j, w in enumerate(rest))
    ]


# Frequent English words that sit one or two edits away from a task keyword ("never" ~ "fever", "with"
# ~ "width", "step" ~ "strep", "case" ~ "face"). A real word is not a typo, so these match only exactly.
COMMON_WORDS = frozenset(
    """
    about above acting after again along also always another around away back been before being best
    better both bring call came come could does doing done down each even ever every fact feel felt
    fewer find fine fired first from gave give going gone good great half hand hands have hear heard
    help here hired hold home hope hour hours into just keep kind know last late least less like line
    little live long look lost made make many mind more most much must name near need never next nice
    none note okay once only open other over part past pick place plan play please point post race
    rather read real really reach ride right rough same says seem seen send sent shall short should
    show side since some soon sort sound spend step still stuff such sunny funny sure take teach tell
    than thank thanks that their them then there these they thing things think this those though
    threat three time times told tough couch true turn under until upon very want wash water week weeks
    well went were what when where which while whole wife will wise wish with within without word words
    work would year years your yours case cases
    """.split()
)


@lru_cache(maxsize=1 << 18)
def _word_close(word: str, keyword: str) -> bool:
    """One word against one keyword word (cached: a task's vocabulary is small). Words of
    :data:`COMMON_WORDS` only match exactly."""
    if word in COMMON_WORDS and word != keyword:
        return False
    return fuzzy_has([word], keyword)


def spans(ws: Sequence[str], table: Mapping[str, Sequence[str]]) -> list[tuple[int, int, str]]:
    """Every ``(start, end, key)`` where a phrase of ``table[key]`` occurs, sorted by start (longest
    first on ties). A key that matches several overlapping phrases at one place is reported once, and
    an exact match wins over a fuzzy match of another key on the same words ("sneezing" is not a typo
    of "wheezing" when both are keys)."""
    hits: list[tuple[int, int, str, bool]] = []
    for key, phrases in table.items():
        end = -1
        for s, e, exact in sorted(_matches(ws, phrases), key=lambda h: (h[0], -h[1], not h[2])):
            if s >= end:
                hits.append((s, e, key, exact))
                end = e
    exact = [(s, e, k) for s, e, k, x in hits if x]
    kept = [
        (s, e, k)
        for s, e, k, x in hits
        if x or not any(k2 != k and s < e2 and s2 < e for s2, e2, k2 in exact)
    ]
    return sorted(kept, key=lambda h: (h[0], -(h[1] - h[0])))


def _matches(ws: Sequence[str], phrases: Sequence[str]) -> list[tuple[int, int, bool]]:
    """``(start, end, exact)`` of every occurrence of any of ``phrases`` in ``ws``."""
    out = []
    for p in phrases:
        parts = p.split()
        out += [(i, i + len(parts), list(ws[i : i + len(parts)]) == parts) for i in find_all(ws, p)]
    return out


def keys_in(ws: Sequence[str], table: Mapping[str, Sequence[str]]) -> list[str]:
    """The keys of ``table`` named in ``ws``, in order of first appearance, without repeats."""
    return list(dict.fromkeys(k for _, _, k in spans(ws, table)))


_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1000 (``24`` -> ``twenty-four``); digits beyond that."""
    if not 0 <= n < 1000:
        return str(n)
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens - 2] + (f"-{_UNITS[unit]}" if unit else "")
    hundreds, rest = divmod(n, 100)
    return f"{_UNITS[hundreds]} hundred" + (f" and {number_to_words(rest)}" if rest else "")


_TOKEN = re.compile(r"\d[\d,]*(?:\.\d+)?|[a-z]+")


def numbers(text: str) -> list[float]:
    """The numbers in ``text`` in order of appearance (digits or number words below 1000)."""
    out: list[float] = []
    run: int | None = None  # value of the number-word run being read
    for tok in _TOKEN.findall(text.lower()):
        if tok in _WORD_VALUE:
            v = _WORD_VALUE[tok]
            if run is not None and _joins(run, v):
                run += v
                continue
            _flush(out, run)
            run = v
        elif tok == "hundred" and run is not None and 0 < run < 10:
            run *= 100
        elif not (tok == "and" and run is not None and run >= 100 and run % 100 == 0):
            _flush(out, run)
            run = None
            if tok[0].isdigit():
                out.append(float(tok.replace(",", "")))
    _flush(out, run)
    return out


def _joins(run: int, v: int) -> bool:
    """Whether number word ``v`` continues the run (``hundred`` + 5, ``twenty`` + 4)."""
    return (run >= 100 and run % 100 == 0 and v < 100) or (
        run >= 20 and run % 10 == 0 and run % 100 and v < 10
    )


def _flush(out: list[float], run: int | None) -> None:
    if run is not None:
        out.append(float(run))
