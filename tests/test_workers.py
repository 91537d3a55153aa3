"""Arms in worker processes (itpo_batch.run.workers): phases heard in step, errors of any arm or of the hook
raised in the parent with the other arms stopped at a phase boundary, a worker that dies breaks the run
with a message. The iterate-level check (a parallel run equals a sequential one): tests/test_iterate.py."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import pytest

from itpo_batch.core.errors import ItpoError, NonFiniteError
from itpo_batch.run.workers import available_cores, run_arms, worker_count

METHODS = ["a", "b", "c"]


def toy_arm(fault: str, method: str, hook: Callable[[str], None], done: Callable[[int], None]) -> None:
    """Two 'rounds' of one arm; arm ``b`` fails as ``fault`` says (runs in a spawned worker)."""
    for round_ in (1, 2):
        hook(f"round {round_} · {method}: start")
        if method == "b" and fault == "exit":
            os._exit(3)  # dies without a word, as when killed
        if method == "b" and round_ == 2 and fault == "nan":
            raise NonFiniteError("policy-update loss", 1, 4).at(f"iterate, method b, round {round_}")
        if method == "b" and fault == "bug":
            raise ZeroDivisionError("a bug in the arm")
        time.sleep(1.0 if (method, round_) == ("a", 2) else 0.05)
        hook(f"round {round_} · {method}: end")
        done(round_)


class Recorder:
    """The parent's hook and round counter; raises at ``stop_at`` like a test's kill switch."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.heard: list[str] = []
        self.rounds = 0
        self.stop_at = stop_at

    def hook(self, message: str) -> None:
        self.heard.append(message)
        if message == self.stop_at:
            raise KeyError("stopped by the hook")

    def done(self) -> None:
        self.rounds += 1


def _run(fault: str, rec: Recorder, workers: int = 2) -> None:
    run_arms(functools.partial(toy_arm, fault), METHODS, workers, rec.hook, rec.done)


def test_every_phase_is_heard_in_each_arms_order() -> None:
    rec = Recorder()
    _run("none", rec)
    for m in METHODS:
        mine = [h for h in rec.heard if f"· {m}:" in h]
        assert mine == [f"round {r} · {m}: {what}" for r in (1, 2) for what in ("start", "end")]
    assert rec.rounds == 6


def test_an_arms_error_is_raised_and_the_others_stop_at_a_phase() -> None:
    rec = Recorder()
    with pytest.raises(NonFiniteError, match=r"iterate, method b, round 2: policy-update loss") as info:
        _run("nan", rec)
    assert (info.value.bad, info.value.total) == (1, 4)  # the error crossed the process boundary whole
    assert "round 2 · a: end" not in rec.heard  # a was told to stop at its next phase (it sleeps in round 2)
    assert "round 1 · c: start" not in rec.heard  # c waited for a's worker and stopped at its first phase
    # b's first round, and a's unless a's worker started late (a loaded machine spawns slowly): never more
    assert 1 <= rec.rounds <= 2


def test_the_hooks_error_stops_that_arm_before_its_next_step() -> None:
    rec = Recorder(stop_at="round 1 · a: end")
    with pytest.raises(KeyError, match="stopped by the hook"):
        _run("none", rec)
    assert "round 2 · a: start" not in rec.heard  # a stopped where the hook raised, never ran ahead
    assert rec.rounds <= 1  # at most b's first round; a's did not count


def test_a_bug_in_a_worker_carries_its_traceback() -> None:
    with pytest.raises(RuntimeError, match="ZeroDivisionError: a bug in the arm") as info:
        _run("bug", Recorder())
    assert "toy_arm" in str(info.value)


def test_a_worker_that_dies_breaks_the_run_with_a_message() -> None:
    with pytest.raises(ItpoError, match=r"arm\(s\) .*b.* ended abruptly.*--resume"):
        _run("exit", Recorder())


def test_worker_count() -> None:
    assert worker_count("auto", 4) == min(available_cores(), 4)
    assert worker_count("auto", 1) == 1
    assert worker_count(3, 2) == 2 and worker_count(1, 5) == 1
