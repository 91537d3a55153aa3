"""Small vectorised statistics shared by the evaluation code (Q-value metrics, turn-credit vs oracle).

- **Average ranks** as scipy's ``rankdata(method="average")``: one stable ``argsort``, then
  ``unique_consecutive`` over the sorted values gives each tie group its count; the group's rank is the
  mean of the 1-based positions it spans, ``end − (count − 1) / 2``. No Python loop, no scipy dependency.
- **Spearman** is the Pearson correlation of the average ranks (the definition that stays exact with
  ties). When a side is constant the correlation is undefined (scipy returns NaN); a constant ranks
  nothing, so we return 0, which keeps metrics JSON-valid. Non-finite inputs raise instead of producing a
  plausible-looking number.
"""

from __future__ import annotations

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x [N]`` (float64); tied values share the average of their ranks."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    group_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    return out.index_put_((order,), group_rank[inverse])


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation of ``x [N]`` and ``y [N]`` (Pearson of average ranks); 0 if a side is constant."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(
            f"spearman needs two 1-D tensors of one length, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("spearman got non-finite values")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if float(denom) > 0 else 0.0
