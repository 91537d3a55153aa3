"""Every section reference in the code and the docs resolves to something in this repository.

A *section reference* is the section sign followed by a number (``<sign>4.2``, or a range ``<sign>1.3–1.6``;
the sign is written as an escape in this file so that it has none of its own). What names its target is
the text **right before it on the same line**, where only quotes, backticks, spaces, commas, semicolons,
``and`` and other section numbers may stand in between:

- a Markdown file of this repository (``docs/method.md <sign>4.2``, path from the repository root, or from
  the citing file's folder): the file must exist and have a heading numbered like every section cited
  (``## 4.`` or ``### 4.2``, both ends of a range);
- a paper (``arXiv 2511.21638 <sign>3``): its arXiv id must be one of the references of
  ``docs/method.md``, which is where a reader looks it up;
- nothing, in a Markdown file: the file itself. In Python, a bare section number is an error, since no
  one can tell which document it means.

Markdown anchors (a ``.md`` path, ``#`` and a heading's slug, as in a link) are checked the same way: the
file must have a heading whose GitHub slug is the anchor. Scanned: the ``.py`` files of ``itpo_batch/``, ``cli/``, ``tests/`` and
``bench/``, ``README.md`` and every ``.md`` under ``docs/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("itpo_batch", "cli", "tests", "bench")
METHOD_DOC = Path("docs/method.md")
SIGN = "\u00a7"
NUM = r"\d+(?:\.\d+)*"
RANGE = rf"(?P<first>{NUM})(?:\s?[-\u2013]\s?(?P<last>{NUM}))?"
SECTION = re.compile(rf"{SIGN}\s?{RANGE}")
MD_PATH = r"(?:[\w.-]+/)*[\w.-]+\.md"
# A target, then only glue up to the end of the text before the sign.
GLUE = rf"(?:[`'\"\s,;(]|and|{SIGN}\s?{NUM}(?:\s?[-\u2013]\s?{NUM})?)*"
TARGET_BEFORE = re.compile(rf"(?:(?P<path>{MD_PATH})|arXiv[: ](?P<arxiv>\d{{4}}\.\d{{4,5}})(?:v\d+)?){GLUE}$")
ANCHOR = re.compile(rf"(?P<path>{MD_PATH})#(?P<anchor>[\w-]+)")
URL_BEFORE = re.compile(r"\S*://\S*$")
HEADING = re.compile(r"^(#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
HEADING_NUMBER = re.compile(rf"^(?P<num>{NUM})\.?(?:\s|$)")


def scanned_files(root: Path) -> list[Path]:
    """The files whose references must resolve (see the module docstring), sorted."""
    files = [p for d in CODE_DIRS for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts]
    files += list((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    files += [root / "README.md"] if (root / "README.md").is_file() else []
    return sorted(files)


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@cache
def headings(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """``(section numbers, anchors)`` of a Markdown file's headings, outside fenced code blocks."""
    numbers, anchors, fenced = set(), set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m is None:
            continue
        title = m["title"]
        anchors.add(slug(title.replace("`", "")))
        num = HEADING_NUMBER.match(title)
        if num is not None:
            numbers.add(num["num"])
    return frozenset(numbers), frozenset(anchors)


def _resolve(root: Path, source: Path, rel: str) -> Path | None:
    """``rel`` from the repository root, else from the citing file's folder; None if neither exists."""
    for base in (root, source.parent):
        candidate = (base / rel).resolve()
        if candidate.is_file() and candidate.is_relative_to(root.resolve()):
            return candidate
    return None


def _section_problems(root: Path, source: Path, line: str, papers: str) -> Iterable[str]:
    for m in SECTION.finditer(line):
        cited = m.group(0)
        target = TARGET_BEFORE.search(line[: m.start()])
        if target is not None and target["arxiv"]:
            if f"arXiv {target['arxiv']}" not in papers:
                yield f"{cited}: arXiv {target['arxiv']} is not among the references of {METHOD_DOC}"
            continue
        if target is None and source.suffix != ".md":
            yield f"{cited}: names no document (write e.g. '{METHOD_DOC} {cited}')"
            continue
        doc = source if target is None else _resolve(root, source, target["path"])
        if doc is None:
            yield f"{cited}: {target['path'] if target else source} is not a file of this repository"
            continue
        numbers, _ = headings(doc)
        for number in filter(None, (m["first"], m["last"])):
            if number not in numbers:
                yield f"{cited}: {doc.relative_to(root.resolve())} has no heading numbered {number}"


def _anchor_problems(root: Path, source: Path, line: str) -> Iterable[str]:
    for m in ANCHOR.finditer(line):
        if URL_BEFORE.search(line[: m.start()]):
            continue  # part of a web address, not a file of this repository
        doc = _resolve(root, source, m["path"])
        if doc is None:
            yield f"{m.group(0)}: {m['path']} is not a file of this repository"
        elif m["anchor"] not in headings(doc)[1]:
            yield f"{m.group(0)}: {m['path']} has no heading with that anchor"


def problems(root: Path = ROOT, files: Iterable[Path] | None = None) -> list[str]:
    """``path:line: what is wrong`` for every reference that does not resolve."""
    root = root.resolve()
    method = root / METHOD_DOC
    papers = method.read_text(encoding="utf-8") if method.is_file() else ""
    out = []
    for path in scanned_files(root) if files is None else files:
        path = path.resolve()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SIGN not in line and ".md#" not in line:
                continue
            found = [*_section_problems(root, path, line, papers), *_anchor_problems(root, path, line)]
            out += [f"{path.relative_to(root)}:{n}: {p}" for p in found]
    return out


def test_every_reference_resolves() -> None:
    found = problems()
    assert not found, f"{len(found)} references do not resolve:\n" + "\n".join(found)


def test_method_doc_numbers_each_section_once() -> None:
    text = (ROOT / METHOD_DOC).read_text(encoding="utf-8")
    numbers = [HEADING_NUMBER.match(m["title"]) for m in map(HEADING.match, text.splitlines()) if m]
    cited = [n["num"] for n in numbers if n is not None]
    assert len(cited) > 10 and len(cited) == len(set(cited)), cited


def test_checker_flags_each_kind_of_broken_reference(tmp_path: Path) -> None:
    """A small tree with good and broken references of every kind: exactly the broken ones are reported."""
    s, h = SIGN, "#"  # no literal anchors in this file: the real scan reads it too
    (tmp_path / "docs").mkdir()
    (tmp_path / "itpo_batch").mkdir()
    (tmp_path / "docs" / "method.md").write_text(
        f"# Doc\n\n## 1. One\n\n### 1.2 Two `x`\n\n```\n## 9. in a fence\n```\n\n"
        f"See {s}1.2 and {s}3.\n\n## 2. References\n\n- arXiv 2511.21638\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "notes.md").write_text(f"# Notes\n\nAs method.md {s}1.2 says (and {s}1).\n")
    (tmp_path / "itpo_batch" / "mod.py").write_text(
        "\n".join(
            [
                f'"""Good: ``docs/method.md`` {s}1.2, {s}2 and {s}1.2–2; (arXiv 2511.21638, {s}4).',
                f"Good: docs/method.md{h}12-two-x and https://example.org/README.md{h}nowhere.",
                f"Bad: bare {s}1.2; docs/nothing.md {s}1; docs/method.md {s}9; docs/method.md {s}1–7",
                f'Bad: arXiv 1234.56789 {s}2; docs/method.md{h}3-three."""',
            ]
        ),
        encoding="utf-8",
    )
    expected = [
        f"docs/method.md:11: {s}3: docs/method.md has no heading numbered 3",
        f"docs/notes.md:3: {s}1: docs/notes.md has no heading numbered 1",
        f"itpo_batch/mod.py:3: {s}1.2: names no document (write e.g. 'docs/method.md {s}1.2')",
        f"itpo_batch/mod.py:3: {s}1: docs/nothing.md is not a file of this repository",
        f"itpo_batch/mod.py:3: {s}9: docs/method.md has no heading numbered 9",
        f"itpo_batch/mod.py:3: {s}1–7: docs/method.md has no heading numbered 7",
        f"itpo_batch/mod.py:4: {s}2: arXiv 1234.56789 is not among the references of docs/method.md",
        f"itpo_batch/mod.py:4: docs/method.md{h}3-three: docs/method.md has no heading with that anchor",
    ]
    assert problems(tmp_path) == expected
