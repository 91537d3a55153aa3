"""Diagnostics of an implicit PRM: cross-entropy, within-group pairwise ranking accuracy, sign accuracy.

All functions take the conversation-level implicit reward ``z = β·Σ_t log-ratio`` (the PRM's logit), the
BCE labels ``y ∈ [0, 1]`` and, for ranking, a group per conversation. They are vectorised (no Python loop
over conversations or pairs); ``tests/test_prm.py`` checks them against plain loops.

Differences from the official logging (``prime_core_algos.py``, docs/method.md §1.7):

- **Pairwise accuracy** ``compute_dpo_accuracy`` weights every pair by ``|Δy|`` and takes contiguous
  blocks of ``n`` rows as groups. Here groups come from an explicit ``group_id`` (docs/method.md §4.1), and pairs are
  **unweighted** by default (``weighted=True`` gives the official ``|Δy|`` weighting; the two agree for
  binary labels). A pair counts when both conversations share a group and their labels differ; it is
  correct when the higher label has the higher ``z``, and a tie in ``z`` counts one half. Groups of one
  contribute no pair; with no pair at all the accuracy is NaN (undefined), never a fake 0 or 1.
- **Sign accuracy** ``compute_dpo_abs_accuracy`` compares the sign of the *normalised* reward sum with
  ``2y − 1``. Here: ``σ(z) > 0.5 ⇔ y > 0.5`` (the normaliser is a positive scalar, so the sign is the
  same); ``z = 0`` predicts "below 0.5".
- **Cost.** Ranking pads the groups into a ``[G, n_max]`` grid and compares ``G·n_max²`` pairs in blocks of
  about 4M (a loop over blocks of group members, never over pairs), so one huge group is slow but safe.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

PAIR_BLOCK = 1 << 22  # pair comparisons materialised at once


def group_codes(groups: object, n: int) -> torch.Tensor:
    """Dense int64 codes ``[n]`` for any group labels (strings, ints); ``None`` puts everything in one group."""
    if groups is None:
        return torch.zeros(n, dtype=torch.int64)
    values = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups, dtype=object)
    if values.shape != (n,):
        raise ValueError(f"expected {n} group labels, got shape {values.shape}")
    _, inverse = np.unique(values.astype(str), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def _group_grid(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(group, slot-in-group) of each element, number of groups, largest group size."""
    n_groups = int(codes.max()) + 1
    counts = torch.bincount(codes, minlength=n_groups)
    order = torch.sort(codes, stable=True).indices
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(codes)
    slot[order] = torch.arange(codes.numel()) - starts[codes[order]]
    return codes, slot, n_groups, int(counts.max())


def pairwise_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, groups: object = None, weighted: bool = False
) -> tuple[float, int]:
    """(accuracy, number of pairs) of ordering within groups; see the module docstring. NaN when no pair."""
    z, y = logits.detach().double().cpu(), labels.detach().double().cpu()
    n = int(z.numel())
    if n == 0:
        return math.nan, 0
    group, slot, n_groups, width = _group_grid(group_codes(groups, n))
    gz = torch.zeros(n_groups, width, dtype=torch.float64).index_put_((group, slot), z)
    gy = torch.zeros(n_groups, width, dtype=torch.float64).index_put_((group, slot), y)
    valid = torch.zeros(n_groups, width, dtype=torch.bool).index_put_(
        (group, slot), torch.ones(n, dtype=torch.bool)
    )
    num = den = 0.0
    n_pairs = 0
    step = max(1, PAIR_BLOCK // (n_groups * width))
    for lo in range(0, width, step):  # blocks of "first" members bound memory to ~PAIR_BLOCK entries
        sl = slice(lo, lo + step)
        dy = gy[:, sl, None] - gy[:, None, :]  # [G, b, n]: entry (i, j) with y_i > y_j is one unordered pair
        dz = gz[:, sl, None] - gz[:, None, :]
        pair = (dy > 0) & valid[:, sl, None] & valid[:, None, :]
        weight = torch.where(pair, dy if weighted else torch.ones_like(dy), 0.0)
        correct = (dz > 0).double() + 0.5 * (dz == 0).double()
        num, den, n_pairs = (
            num + float((weight * correct).sum()),
            den + float(weight.sum()),
            n_pairs + int(pair.sum()),
        )
    return (num / den if den > 0 else math.nan), n_pairs


def sign_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of conversations with ``(σ(z) > 0.5) == (y > 0.5)``; NaN for an empty batch."""
    if logits.numel() == 0:
        return math.nan
    hit = (logits.detach().cpu() > 0) == (labels.detach().cpu() > 0.5)
    return float(hit.double().mean())


def mean_bce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of ``σ(z)`` against (soft) labels ``y``; NaN for an empty batch."""
    if logits.numel() == 0:
        return math.nan
    z, y = logits.detach().double().cpu(), labels.detach().double().cpu()
    return float(F.binary_cross_entropy_with_logits(z, y))


def prm_diagnostics(
    logits: torch.Tensor, labels: torch.Tensor, groups: object = None, prefix: str = "prm/"
) -> dict[str, float]:
    """``{prefix}loss``, ``pair_acc``, ``pair_acc_weighted``, ``n_pairs``, ``sign_acc``, ``reward_mean``."""
    acc, n_pairs = pairwise_accuracy(logits, labels, groups)
    acc_w, _ = pairwise_accuracy(logits, labels, groups, weighted=True)
    z = logits.detach().double().cpu()
    return {
        f"{prefix}loss": mean_bce(logits, labels),
        f"{prefix}pair_acc": acc,
        f"{prefix}pair_acc_weighted": acc_w,
        f"{prefix}n_pairs": float(n_pairs),
        f"{prefix}sign_acc": sign_accuracy(logits, labels),
        f"{prefix}reward_mean": float(z.mean()) if z.numel() else math.nan,
        f"{prefix}n_conversations": float(z.numel()),
    }
