"""The log buffer an arm fits its credit on: round-0 logs plus every round's own (docs/method.md §8.4).

ITPO's implicit PRM and Iterative PPO's turn Q-model learn *outcome models* (which turns lead to a good
outcome); the policy update is on-policy. Refitting the credit model each round on that round's 32–128
conversations alone gives credit close to noise (issue 15: Spearman with the oracle 0.05–0.3, against
0.4–0.6 for the same PRM fitted on a few hundred conversations). So:

- **What is fitted on what.** The PRM (``itpo``, ``itpo_norm``, ``prime``) and the Q-model
  (``iterative_ppo``) of an arm are fitted on its **buffer**: the round-0 logs and the logs that the arm's
  own policies collected in every round so far, newest first, capped at ``max_conversations``. Both stay
  warm-started from the previous round (they were already). The **update** stays on the round's own logs
  (on-policy, with the PPO ratio to the collecting policy); reusing older logs there would need
  off-policy corrections that the issue did not ask for and I did not show to help.
- **Cap and weighting.** Newest conversations first, whole files, until ``max_conversations``
  (default 1,024); every kept conversation has weight 1 (a uniform mixture over the policies that
  collected them). An outcome model is valid on any policy's data; its errors on the *current* policy's
  states are what the credit uses, and the newest logs are always in the buffer.
- **Held out by conversation.** A fixed share (``holdout``) of conversations is never fitted on, chosen
  by a hash of the conversation id alone, so a conversation held out in one round is held out in every
  later round: ``prm/holdout/…`` measures the warm-started PRM on conversations it never saw. The
  Q-model keeps its own split (``q.holdout``, by conversation).
- **No extra π_0 forward.** π_0's log-probs of each logs file are kept beside it
  (:mod:`itpo_batch.run.logprob_cache`); the buffer's are gathered from them, and only a file without a
  valid cache makes the PRM run π_0 on the buffer.
- ``scope="round"`` restores the old behaviour (fit on the round's logs only), for comparisons.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.validate import Logs, read_logs
from itpo_batch.model.packing import gather_segments
from itpo_batch.run.logprob_cache import LogsLogprobs


@dataclass
class BufferConfig:
    """Which logs the PRM and the Q-model of an arm are fitted on (module docstring)."""

    scope: Literal["buffer", "round"] = "buffer"
    "'buffer': round-0 logs + every round's logs of the arm (capped); 'round': the round's logs only."
    max_conversations: int = 1024
    "Cap on the buffer: the newest conversations (whole files) up to this many."
    holdout: float = 0.1
    "Share of conversations never fitted on by the PRM (by a hash of the conversation id), for prm/holdout/…."

    def __post_init__(self) -> None:
        if self.scope not in ("buffer", "round"):
            raise ItpoError(f"buffer.scope must be 'buffer' or 'round', not {self.scope!r}")
        if self.max_conversations < 1 or not 0.0 <= self.holdout < 1.0:
            raise ItpoError("buffer.max_conversations must be >= 1 and buffer.holdout in [0, 1)")


@dataclass
class FitLogs:
    """The logs a credit model is fitted on, split by conversation, with π_0's log-probs where known."""

    train: Logs
    holdout: Logs | None
    train_ref: torch.Tensor | None  # float32 [A] of train's conversations, in order; None: run π_0
    holdout_ref: torch.Tensor | None
    files: int

    @property
    def all(self) -> Logs:
        """Train then hold-out conversations (the Q-model splits them itself)."""
        if self.holdout is None:
            return self.train
        parts = (self.train, self.holdout)
        return Logs(pl.concat([p.conversations for p in parts]), pl.concat([p.messages for p in parts]),
                    self.train.report)  # fmt: skip

    def metrics(self) -> dict[str, float]:
        held = 0 if self.holdout is None else self.holdout.conversations.height
        return {"buffer/conversations": float(self.train.conversations.height + held),
                "buffer/holdout": float(held), "buffer/files": float(self.files)}  # fmt: skip


def held_out(ids: Sequence[str], share: float) -> np.ndarray:
    """bool ``[N]``: whether each conversation id is in the hold-out share (a hash of the id alone)."""
    digest = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids]
    return np.asarray(digest, dtype=np.float64) / 2.0**64 < share


def subset(logs: Logs, keep: np.ndarray) -> Logs:
    """The conversations of ``logs`` where ``keep`` (conversation order), with their messages."""
    ids = logs.conversations.filter(pl.Series(keep))["conversation_id"]
    return Logs(logs.conversations.filter(pl.Series(keep)),
                logs.messages.filter(pl.col("conversation_id").is_in(ids.implode())), logs.report)  # fmt: skip


def _ref_subset(caches: Sequence[LogsLogprobs], keep: np.ndarray) -> torch.Tensor:
    """π_0's flat log-probs of the kept conversations, from the per-file caches in file order."""
    ref = torch.cat([c.ref_logp for c in caches])
    lengths = torch.cat([c.offsets.diff() for c in caches])
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return ref[gather_segments(offsets, torch.from_numpy(np.flatnonzero(keep)))]


def fit_logs(
    paths: Sequence[Path], cfg: BufferConfig, cache: Callable[[Path], LogsLogprobs | None]
) -> FitLogs:
    """Read the buffer ``paths`` (newest first), capped at whole files (their row counts: one row per
    conversation in the nested logs a run writes), split by conversation; ``cache(path)`` gives a file's
    kept log-probs. The files are read and validated together (:func:`read_logs`: one conversation id
    per buffer)."""
    kept, total = [], 0
    for path in paths:
        if kept and total >= cfg.max_conversations:
            break
        kept.append(path)
        total += pq.read_metadata(path).num_rows
    logs = read_logs(kept)
    caches = [cache(path) for path in kept]
    ids = logs.conversations["conversation_id"].to_list()
    usable = all(c is not None for c in caches) and [i for c in caches for i in c.conversation_ids] == ids  # type: ignore[union-attr]
    hold = held_out(ids, cfg.holdout)
    if hold.all():  # a tiny buffer must still have something to fit on
        hold[:] = False
    ref = (lambda keep: _ref_subset(caches, keep)) if usable else (lambda _keep: None)  # type: ignore[arg-type]
    holdout = subset(logs, hold) if hold.any() else None
    return FitLogs(subset(logs, ~hold), holdout, ref(~hold), ref(hold) if hold.any() else None, len(kept))
