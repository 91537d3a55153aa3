"""The package's plan, checked: sub-packages in stage order, imports only down the flow, no cycles, small files.

The import graph is built from the source with ``ast`` (every ``import``/``from … import`` of an
``itpo_batch`` module, at any depth, including those inside functions and under ``TYPE_CHECKING``), so an
upward import hidden in a function body is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "itpo_batch"
# The declared flow, lowest first: a module may import its own stage and any stage before it.
STAGES = ("core", "data", "model", "credit", "rl", "sim", "run", "cli")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


def _imports(path: Path, name: str) -> set[str]:
    """``itpo_batch`` modules imported by the file (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "itpo_batch" or m.startswith("itpo_batch.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {m for m in _imports(path, name) if m in mods and m != name} for name, path in mods.items()}


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def test_every_module_lives_in_a_stage_package() -> None:
    loose = [m for m in _modules() if m != "itpo_batch" and _stage(m) is None and m != "itpo_batch.__main__"]
    assert not loose, f"modules outside the stage packages {STAGES}: {loose}"


def test_imports_point_only_down_the_flow() -> None:
    upward = [
        f"{src} ({STAGES[_stage(src)]}) imports {dst} ({STAGES[_stage(dst)]})"
        for src, dsts in _graph().items()
        for dst in dsts
        if _stage(src) is not None and _stage(dst) is not None and _stage(dst) > _stage(src)
    ]
    assert not upward, "imports that point up the stage order:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_is_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG.parent)} has {n} lines (> {MAX_LINES}): split it"
