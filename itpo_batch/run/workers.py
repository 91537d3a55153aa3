"""Arms in parallel: one worker process per arm (at most one per core), each on one torch thread.

On this 2-core CPU two threads in one process give only 1.3-1.5x over one, two processes nearly 2x
(issue 14), and the arms of ``iterate`` are independent: an arm-round is a pure function of what the arm's
previous round saved (every seed from ``derived_seed``), so an arm gives the same results whichever process
runs it and whenever. :func:`run_arms` runs ``fn(method, hook, round_done)`` (every remaining round of one
arm) for each arm in a pool of ``workers`` processes.

Design decisions:

- **Standard pool, spawn.** :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` context (no
  fork of a process holding OpenMP threads); arms beyond ``workers`` wait for a free worker. Each worker
  sets one torch thread before its first forward. :func:`worker_count` resolves ``"auto"``: one per
  core this process may use, at most one per arm; 1 means the caller runs the arms itself.
- **Who writes what.** Each arm writes only its own partitions (``method=M``) and checkpoints. Round 0's
  files (its logs, π_0's evaluation and log-probs) are written by the parent before any worker starts,
  and only read afterwards. ``metrics.jsonl`` lines go through :meth:`itpo_batch.data.store.RunDir.
  append_metrics`, which rewrites the file under an ``flock`` on the run directory, so two arms' commits
  never lose each other's lines.
- **Phases in step.** A worker sends each phase message to the parent and waits until the parent's
  ``hook`` has heard it (a reply per phase, milliseconds against seconds-long phases). The hook (progress
  display, the fault tests' kill switch) is therefore called where a sequential run calls it: an arm
  never runs ahead of what the parent heard.
- **Failure stops every arm at a phase boundary.** When an arm raises, or the hook raises in the parent,
  the other workers are told "stop" at their next phase and end there (their round is not committed and
  ``--resume`` redoes it, as after a crash); then the first error is raised in the parent. Errors cross
  the process boundary pickled (:class:`~itpo_batch.core.errors.NonFiniteError` by its fields); a bug in
  a worker is re-raised as ``RuntimeError`` carrying the worker's traceback. A worker that dies without
  a word (killed, out of memory) breaks the pool: an :class:`~itpo_batch.core.errors.ItpoError` names
  the arms it ran.
- **Not under a launcher.** Under ``accelerate launch`` every rank runs the arms one after the other
  (:func:`worker_count` is 1 whatever ``workers`` says): the ranks are the parallelism, each arm-round's
  forwards and rollouts are split over them, and spawning arm processes inside each rank would start
  processes outside the process group (they could not join its collectives) and oversubscribe the cores
  and devices the launcher gave each rank.
- **No orphans.** A worker dies with the parent (Linux ``PR_SET_PDEATHSIG``) and, elsewhere, notices the
  parent's death while it waits at a phase and exits: nothing keeps writing into a run that a
  ``--resume`` may be writing.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import queue
import signal
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from itpo_batch.core.errors import ItpoError, NonFiniteError

Hook = Callable[[str], None]
ArmFn = Callable[[str, Hook, Callable[[int], None]], None]
PR_SET_PDEATHSIG = 1
_POLL_S = 0.5

copyreg.pickle(NonFiniteError, lambda e: (NonFiniteError, (e.quantity, e.bad, e.total, e.where, e.hint)))


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(setting: int | str, n_arms: int) -> int:
    """Processes for ``n_arms`` arms: ``"auto"`` is one per core, never more than there are arms; 1 under
    ``accelerate launch`` (module docstring)."""
    from itpo_batch.model import dist  # imports torch: not at this module's import (spawned workers)

    if dist.launched():
        return 1
    wanted = available_cores() if setting == "auto" else int(setting)
    return max(1, min(wanted, n_arms))


class _Stop(Exception):
    """The parent told this worker to stop at the phase it announced."""


_CHANNEL: dict[str, Any] = {}


def _init_worker(events: Any, acks: dict[str, Any], parent: int) -> None:
    """Worker start: one torch thread, die with the parent, keep the channels to it."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    _CHANNEL.update(events=events, acks=acks, parent=parent)
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _phase(method: str, message: str) -> None:
    """A worker's hook: tell the parent, wait until it has heard (or says stop)."""
    _CHANNEL["events"].put((method, "phase", message))
    while True:
        try:
            answer = _CHANNEL["acks"][method].get(timeout=_POLL_S)
            break
        except queue.Empty:
            if os.getppid() != _CHANNEL["parent"]:
                os._exit(1)
    if answer == "stop":
        raise _Stop


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (user errors, interrupts); else a RuntimeError with the traceback."""
    if isinstance(e, ItpoError | KeyboardInterrupt):
        try:
            return pickle.loads(pickle.dumps(e))
        except Exception:  # any unpicklable error becomes its message
            return ItpoError(str(e)) if isinstance(e, ItpoError) else KeyboardInterrupt()
    text = "".join(traceback.format_exception(e))
    return RuntimeError(f"an arm failed in its worker process (pid {os.getpid()}):\n{text}")


def _work(fn: ArmFn, method: str) -> None:
    """One arm in a worker: ``fn`` with the relaying hook; its end (done, stopped, error) as an event."""
    events = _CHANNEL["events"]
    try:
        fn(method, lambda message: _phase(method, message), lambda r: events.put((method, "round", r)))
    except _Stop:
        events.put((method, "stopped", None))
    except BaseException as e:  # every failure is reported to the parent
        events.put((method, "error", _portable(e)))
    else:
        events.put((method, "done", None))


def run_arms(fn: ArmFn, methods: list[str], workers: int, hook: Hook, round_done: Callable[[], None]) -> None:
    """Run ``fn(method, hook, round_done)`` for every arm in ``workers`` spawned processes (module docstring).

    ``fn`` must pickle (a module-level function, or a ``functools.partial`` of one with picklable
    arguments). ``hook`` hears every phase of every arm, in the parent; ``round_done()`` is called in the
    parent after each arm-round. Raises the first error of any arm or of ``hook``.
    """
    ctx = multiprocessing.get_context("spawn")
    events, acks = ctx.Queue(), {m: ctx.Queue() for m in methods}
    failure: BaseException | None = None
    running, told = set(methods), False
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(events, acks, os.getpid())) as pool:  # fmt: skip
        futures = {pool.submit(_work, fn, m): m for m in methods}
        try:
            while running:
                try:
                    method, kind, payload = events.get(timeout=_POLL_S)
                except queue.Empty:
                    lost = _broken(futures, running)
                    failure = failure or lost
                    continue
                if kind == "phase":
                    if failure is None:
                        try:
                            hook(payload)
                        except BaseException as e:  # raised below, after the workers stop
                            failure = e
                    acks[method].put("go" if failure is None else "stop")
                elif kind == "round":
                    round_done()
                else:
                    running.discard(method)
                    if kind == "error" and failure is None:
                        failure = payload
                if failure is not None and not told:
                    told = True
                    for m in running - {method}:
                        acks[m].put("stop")  # read at the arm's next phase
        except BaseException:
            for m in running:
                acks[m].put("stop")
            raise
    if failure is not None:
        raise failure


def _broken(futures: dict[Future, str], running: set[str]) -> BaseException | None:
    """The first error of the arms whose worker ended without reporting (a broken pool); drops them all
    from ``running``."""
    lost = [m for f, m in futures.items() if m in running and f.done() and f.exception() is not None]
    running.difference_update(lost)
    if not lost:
        return None
    return ItpoError(
        f"the worker process of arm(s) {', '.join(sorted(lost))} ended abruptly (killed, or out of memory?); "
        "the rounds committed so far are kept and `iterate --resume` continues (--workers 1 runs the arms "
        "in one process)"
    )


__all__ = ["available_cores", "run_arms", "worker_count"]
