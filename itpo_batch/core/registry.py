"""Name → function registries (turn rewards, advantage estimators, …), one mechanism for all of them.

Each registry is a plain dict; :func:`registrar` makes the decorator that fills it and refuses a name
registered twice, so a typo or an import-order accident cannot silently replace an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F], kind: str) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory ``register(name)`` that adds a function to ``table`` under ``name``."""

    def register(name: str) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn

        return wrap

    return register
