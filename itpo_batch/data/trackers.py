"""Experiment trackers (``--report-to``): TensorBoard, Weights & Biases and Trackio get a copy of ``metrics.jsonl``.

``sft``, ``score`` and ``iterate`` write their metrics as before; with ``--report-to`` the CLI also hands
each recorded line to the trackers named (:class:`MetricsForwarder`).

Design decisions:

- **metrics.jsonl is the source of truth; a tracker is a copy.** What a tracker receives is read back
  from the file the command wrote, never from the values in memory, so the names are the file's keys and
  the values the file's numbers (a NaN the file records as ``null`` is a gap in the tracker). ``iterate``'s
  arms may run in worker processes; the main process reading the file is what sees every arm's lines.
  Every finite number of a line is sent, except the fields that say *which* line it is
  (:data:`IDENTITY`: ``method``, ``round``, ``epoch``, ``seed``); strings (``task``, ``estimator``) are not
  metrics. TensorBoard stores scalars as float32; the others keep float64.
- **Step and series.** The step is the line's ``round`` (``iterate``, ``score``: round 0) or ``epoch``
  (``sft``). One series per arm: the line's ``method`` (``score``: ``score``; ``sft``: ``sft``). TensorBoard
  gets one run folder per series (``<output>/tb/<method>/``), so the arms are overlaid in one chart per
  metric under the metric's own name; W&B and Trackio get one run per series, named ``<run>/<method>`` and
  grouped by the run name (the output folder's name), with the command's config.
- **Offline and local only.** TensorBoard event files under ``<output>/tb/``; W&B in ``mode="offline"``
  under ``<output>/wandb/`` (``wandb sync`` uploads them later, if wanted); Trackio's local SQLite store
  under ``<output>/trackio/`` (``TRACKIO_DIR``, unless already set; ``trackio show`` views it). Nothing is
  sent anywhere by this tool.
- **Checked before any output.** :func:`parse_report_to` checks the names and that each backend's package
  is importable (without importing it) before a command reads or writes anything; a missing one is an
  :class:`~itpo_batch.core.errors.ItpoError` (exit 2) naming ``pip install 'itpo-batch[NAME]'``. Backends
  are optional extras, never base dependencies. Trackers write nothing until their first line, so an
  ``iterate`` that fails on its inputs leaves no tracker folder either.
- **Several at once**: comma-separated (``--report-to tensorboard,wandb``), like ``--methods``;
  ``none`` (the default) alone means no tracker.
- **Each line once per tracker folder.** A forwarder starts by counting as sent the lines already in the
  file whose tracker folder exists (an ``iterate --resume`` that reported before), so resuming adds only the
  new rounds; a tracker first named on a resume (its folder absent) gets the earlier rounds too.
- **Rank 0 reports.** Under ``accelerate launch`` only the process with ``RANK`` 0 (or no ``RANK``) opens
  trackers; the others get none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.store import RunDir

NONE = "none"
# backend -> the module that must be importable (the extra has the backend's own name)
BACKENDS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
IDENTITY = frozenset({"method", "round", "epoch", "seed"})
PROJECT = "itpo-batch"


@dataclass(frozen=True)
class TrackerConfig:
    """``--report-to``'s default: no tracker (comma-separated backend names, or ``none``)."""

    report_to: str = NONE


class TrackerError(ItpoError):
    """``--report-to`` names an unknown backend, or one whose package is not installed."""


def parse_report_to(value: str | Iterable[str]) -> tuple[str, ...]:
    """The backends named (comma-separated, in order, once each; ``()`` for ``none``), checked installed."""
    parts = [value] if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n.strip().lower() for p in parts for n in p.split(",") if n.strip()))
    if names in ([], [NONE]):
        return ()
    if NONE in names:
        raise TrackerError(f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise TrackerError(
            f"--report-to: unknown tracker {', '.join(map(repr, unknown))}; choose none or "
            f"{', '.join(BACKENDS)} (comma-separated for several)"
        )
    missing = [n for n in names if importlib.util.find_spec(BACKENDS[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise TrackerError(
            f"--report-to {','.join(names)}: the {' and '.join(missing)} package{'s are' if len(missing) > 1 else ' is'} "
            f"not installed; install {'them' if len(missing) > 1 else 'it'} with: pip install 'itpo-batch[{extras}]'"
        )
    return tuple(names)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one metrics.jsonl line: every finite number but the identity fields."""
    out = {}
    for key, value in record.items():
        if key in IDENTITY or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    """One backend. ``folder``: where it writes (absent until its first :meth:`log`)."""

    folder: Path

    def log(self, metrics: Mapping[str, float], step: int, series: str) -> None: ...

    def close(self) -> None: ...


def _series_name(series: str) -> str:
    """A series name safe as one folder name."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in series)
    return safe if safe.strip(".") else "_"


class TensorBoardTracker:
    """Event files, one run folder per series: ``<out>/tb/<series>/events.out.tfevents.*``."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = Path(out_dir) / "tb"
        self._writers: dict[str, Any] = {}

    def log(self, metrics: Mapping[str, float], step: int, series: str) -> None:
        writer = self._writers.get(series)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            writer = self._writers[series] = SummaryWriter(str(self.folder / _series_name(series)))
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class WandbTracker:
    """Offline W&B runs under ``<out>/wandb/``, one per series (``<run>/<series>``, group ``<run>``)."""

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        self.out_dir, self.run_name, self.config = Path(out_dir), run_name, dict(config)
        self.folder = self.out_dir / "wandb"
        self._runs: dict[str, Any] = {}

    def log(self, metrics: Mapping[str, float], step: int, series: str) -> None:
        run = self._runs.get(series)
        if run is None:
            import wandb

            self.out_dir.mkdir(parents=True, exist_ok=True)
            run = self._runs[series] = wandb.init(
                project=PROJECT, name=f"{self.run_name}/{series}", group=self.run_name, dir=str(self.out_dir),
                mode="offline", config=self.config, reinit="create_new",
                settings=wandb.Settings(console="off"),  # our progress bars and output stay ours
            )  # fmt: skip
        run.log(dict(metrics), step=step)

    def close(self) -> None:
        for run in self._runs.values():
            run.finish()
        self._runs.clear()


class TrackioTracker:
    """Trackio's local store under ``<out>/trackio/`` (``TRACKIO_DIR`` unless set), one run per series.

    Trackio holds one active run per process (``trackio.init`` finishes the previous one), so a line of
    another series re-opens that series' run with ``resume="allow"``. Trackio's notices go to stderr, so a
    command's stdout stays its own.
    """

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        self.run_name, self.config = run_name, dict(config)
        self.folder = Path(os.environ.get("TRACKIO_DIR") or Path(out_dir).resolve() / "trackio")
        self._run: Any = None
        self._series: str | None = None

    def log(self, metrics: Mapping[str, float], step: int, series: str) -> None:
        if self._series != series:
            os.environ.setdefault("TRACKIO_DIR", str(self.folder))  # read by trackio when imported
            import trackio

            with contextlib.redirect_stdout(sys.stderr):
                self._run = trackio.init(
                    project=PROJECT, name=f"{self.run_name}/{series}", group=self.run_name,
                    config=self.config, resume="allow", auto_log_gpu=False, auto_log_cpu=False, embed=False,
                )  # fmt: skip
            self._series = series
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._run is not None:
            with contextlib.redirect_stdout(sys.stderr):
                self._run.finish()
        self._run, self._series = None, None


class Trackers:
    """The trackers of one command; :meth:`log` goes to each. A context manager that closes them."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, metrics: Mapping[str, float], step: int, series: str) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step, series)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(config: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as JSON-able nested dicts (paths and other objects as strings)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    return json.loads(json.dumps(data, default=str))


def open_trackers(names: Iterable[str], out_dir: Path, run_name: str, config: Any = None) -> Trackers:
    """The trackers ``names`` (from :func:`parse_report_to`) writing under ``out_dir``; nothing is written
    until the first line. Not rank 0 of a multi-process launch: none."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return Trackers([])
    plain = _plain(config)
    make = {
        "tensorboard": lambda: TensorBoardTracker(out_dir),
        "wandb": lambda: WandbTracker(out_dir, run_name, plain),
        "trackio": lambda: TrackioTracker(out_dir, run_name, plain),
    }
    return Trackers([make[n]() for n in names])


class MetricsForwarder:
    """Sends the lines of a folder's ``metrics.jsonl`` to trackers, each line once per tracker.

    ``step_key``: the field that is the step (``round``, ``epoch``); the series is the line's ``method``,
    else ``series``. A line is known by (series, step). A tracker whose folder exists already counts the
    lines in the file now as sent (see the module docstring).
    """

    def __init__(self, trackers: Trackers, folder: Path, step_key: str, series: str) -> None:
        self.trackers, self.run, self.step_key, self.series = trackers, RunDir(folder), step_key, series
        self.before = {self._key(r) for r in self.run.read_metrics()} if trackers.trackers else set()
        self.sent = [set(self.before) if t.folder.exists() else set() for t in trackers.trackers]

    def _key(self, record: Mapping[str, Any]) -> tuple[str, int]:
        return str(record.get("method") or self.series), int(record.get(self.step_key) or 0)

    def sync(self, new_only: bool = False) -> int:
        """Forward the lines not sent yet; returns how many (line, tracker) pairs were sent.

        ``new_only``: only lines recorded since this forwarder was made (after a failure: a command refused
        on a folder that is not its own must not report that folder's older lines).
        """
        if not self.trackers.trackers:
            return 0
        count = 0
        for record in self.run.read_metrics():
            key = self._key(record)
            if new_only and key in self.before:
                continue
            for tracker, sent in zip(self.trackers.trackers, self.sent, strict=True):
                if key not in sent:
                    tracker.log(scalars(record), key[1], key[0])
                    sent.add(key)
                    count += 1
        return count
