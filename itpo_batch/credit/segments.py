"""Assistant turns as runs of the flat ``[B·L]`` array: segmentation, per-turn sums, and back to tokens.

The layout is :mod:`itpo_batch.credit.turns`'s: a padded ``[B, L]`` assistant mask (one conversation per row) and
a ``[B, K]`` turn grid. Design decisions:

- **Runs, not token lists.** A turn is a run ``[start, end)`` of the row-major flat array. One pass finds the
  mask's changes (``!=`` against itself shifted by one), one ``nonzero`` lists them (two per turn, not one per
  token); a run that ends a row and one that starts the next meet at the same flat position, so those are
  added from ``mask[:-1, -1] & mask[1:, 0]``. The runs cut the flat array into gap / turn / gap / ...
  segments (``TurnSegments.bounds``): per-turn sums are one segment reduction over that cut (gaps, which may
  hold NaN, are never read), and the way back to tokens is one ``repeat`` of per-segment values.
  The per-token index lists (``positions``, ``slot``) are built only when something asks for them.
- **Index arithmetic on the host.** The edge list (``2N`` numbers for ``N`` turns) is turned into grid slots,
  lengths and counts in numpy and sent back to the mask's device: one host sync, which the grid width ``K``
  needs anyway.
- **numpy kernels on CPU.** For CPU tensors outside autograd the flat kernels run in numpy
  (``flatnonzero``, ``add.reduceat``, ``repeat``): 3-7x faster here than torch's CPU ``nonzero`` /
  ``segment_reduce`` / ``repeat_interleave`` at 128 × 4096 (``bench/credit_vs_loop.py``). On CUDA, or for
  values that require grad, the same cut goes through ``nonzero``, ``segment_reduce`` and
  ``repeat_interleave`` (differentiable). Tests run both kernels against the plain-loop references.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TurnSegments:
    """Assistant turns of a padded ``[B, L]`` batch as runs of the flat ``[B·L]`` array (``N`` turns in all)."""

    bounds: torch.Tensor  # int64 [2N+2]: 0, start_1, end_1, ..., start_N, end_N, B·L (flat, row-major)
    turn_slot: torch.Tensor  # int64 [N], turn-grid index row*K + turn of each run, ascending
    n_turns: torch.Tensor  # int64 [B]
    lengths: torch.Tensor  # int64 [B, K], tokens per turn (0 on invalid slots)
    valid: torch.Tensor  # bool [B, K], k < n_turns
    n_cols: int  # L

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, K)``."""
        return (int(self.valid.shape[0]), int(self.valid.shape[1]))

    @property
    def starts(self) -> torch.Tensor:
        """int64 ``[N]``: flat index of each turn's first token."""
        return self.bounds[1:-1:2]

    @property
    def ends(self) -> torch.Tensor:
        """int64 ``[N]``: flat index one past each turn's last token."""
        return self.bounds[2:-1:2]

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """int64 ``[A]``: flat index of every assistant token, ascending (built on first use)."""
        run = self.ends - self.starts
        shift = self.starts - (torch.cumsum(run, 0) - run)  # flat start − rank of the run's first token
        return torch.repeat_interleave(shift, run) + torch.arange(int(run.sum()), device=run.device)

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        """int64 ``[A]``: turn-grid index ``row*K + turn`` of every assistant token (built on first use)."""
        return torch.repeat_interleave(self.turn_slot, self.ends - self.starts)

    def turn_id(self) -> torch.Tensor:
        """int64 ``[B, L]``: 0-based turn index on assistant tokens, −1 elsewhere (as ``render`` builds it)."""
        b, k = self.shape
        grid = torch.arange(k, device=self.valid.device).expand(b, k)
        return turns_to_tokens(grid, self, fill=-1)


def _numpy_ok(x: torch.Tensor) -> bool:
    """Whether the numpy kernels may serve ``x``: a CPU tensor outside autograd (numpy kernels: see the module docstring)."""
    return x.device.type == "cpu" and not x.requires_grad and x.dtype != torch.bfloat16


def _run_edges(m: torch.Tensor) -> np.ndarray:
    """Flat row-major run boundaries of a bool ``[B, L]`` mask, sorted: start_1, end_1, start_2, ... (ends
    exclusive). Changes along the flat array, plus a start at 0 / an end at ``B·L`` and, where a run ends a
    row and another starts the next, the end and the start at the same flat position."""
    b, length = m.shape
    if b * length == 0:
        return np.zeros(0, dtype=np.int64)
    flat = m.reshape(-1)
    change, joined, rims = flat[1:] != flat[:-1], m[:-1, -1] & m[1:, 0], flat[[0, -1]]
    if m.device.type == "cpu":
        inner, joins, rims = np.flatnonzero(change.numpy()), np.flatnonzero(joined.numpy()), rims.numpy()
    else:
        inner, joins = (x.nonzero()[:, 0].cpu().numpy() for x in (change, joined))
        rims = rims.cpu().numpy()
    joins = (joins + 1) * length
    outer = np.array([0, b * length])[rims]  # a run starting at flat 0, a run ending at B·L
    return np.sort(np.concatenate([inner + 1, joins, joins, outer]))


def segment_turns(assistant_mask: torch.Tensor, min_turns: int = 1) -> TurnSegments:
    """Turn segmentation of a ``[B, L]`` assistant mask; the grid has ``max(K, min_turns, 1)`` columns.

    A turn starts where the mask goes 0→1 (a 0 is assumed before column 0 and after column L−1).
    ``min_turns`` widens the grid (e.g. to stack several batches); it never drops turns. The edge pass runs
    on the mask's device; the arithmetic on the edge list (``2N`` numbers) runs in numpy on the host, the
    result goes back to the device (one host sync, which the grid width needs anyway).
    """
    m = assistant_mask.bool()
    b, length = m.shape
    edges = _run_edges(m)
    row = edges[0::2] // max(length, 1)
    bounds = np.concatenate([[0], edges, [b * length]])  # 0, start_1, end_1, ..., B·L
    n_turns = np.bincount(row, minlength=b)
    k = max(int(n_turns.max()) if b else 0, min_turns, 1)
    turn_slot = row * k + np.arange(row.size) - (np.cumsum(n_turns) - n_turns)[row]  # row·K + turn
    lengths = np.zeros(b * k, dtype=np.int64)
    lengths[turn_slot] = edges[1::2] - edges[0::2]
    valid = np.arange(k) < n_turns[:, None]
    parts = (bounds, turn_slot, n_turns, lengths.reshape(b, k), valid)
    return TurnSegments(*(torch.from_numpy(x).to(m.device) for x in parts), length)


def turn_sum(values: torch.Tensor, seg: TurnSegments) -> torch.Tensor:
    """Per-turn sums ``[B, K]`` of token ``values [B, L]`` (off-mask values are never read, even NaN)."""
    b, k = seg.shape
    flat = values.reshape(-1)
    if seg.turn_slot.numel() == 0:
        return values.new_zeros(b, k)
    if _numpy_ok(flat):  # runs [start, end): reduceat over start, end, start, ... (the last end may be B·L)
        cut = seg.bounds[1:-1].numpy()
        sums = np.add.reduceat(flat.numpy(), cut[:-1] if cut[-1] == flat.numel() else cut)[0::2]
        grid = np.zeros(b * k, dtype=sums.dtype)
        grid[seg.turn_slot.numpy()] = sums
        return torch.from_numpy(grid).view(b, k)
    sums = torch.segment_reduce(flat, "sum", offsets=seg.bounds)[1::2]  # gap / turn / gap ...: gaps unread
    return values.new_zeros(b * k).index_put((seg.turn_slot,), sums).view(b, k)


def turns_to_tokens(turn_values: torch.Tensor, seg: TurnSegments, fill: float = 0.0) -> torch.Tensor:
    """Broadcast per-turn ``turn_values [B, K]`` to the tokens of each turn: ``[B, L]``, ``fill`` off-mask."""
    b, _ = seg.shape
    if _numpy_ok(turn_values):  # segments: gap, turn, gap, ..., gap
        run = np.diff(seg.bounds.numpy())
        per_segment = np.full(run.size, fill, dtype=turn_values.numpy().dtype)
        per_segment[1::2] = turn_values.numpy().reshape(-1)[seg.turn_slot.numpy()]
        return torch.from_numpy(np.repeat(per_segment, run)).view(b, seg.n_cols)
    run = seg.bounds[1:] - seg.bounds[:-1]
    per_segment = turn_values.new_full((run.numel(),), fill)
    per_segment[1::2] = turn_values.reshape(-1).index_select(0, seg.turn_slot)
    return torch.repeat_interleave(per_segment, run, output_size=b * seg.n_cols).view(b, seg.n_cols)
