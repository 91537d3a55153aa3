"""The optimiser step and learning-rate schedule shared by the fine-tuning stages (SFT, Q-model).

AdamW with linear warm-up then cosine decay to 10 % of the peak, gradient-norm clipping. The schedule
needs the exact number of steps in advance; with shuffled epochs and greedy packing that number depends
on each epoch's order, so callers plan their epochs first (:func:`itpo_batch.model.packing.count_buffers`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10 % of it."""
    warm = max(1, int(total * warmup_ratio))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_step(
    opt: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    loss: torch.Tensor,
    lr: float,
    grad_clip: float,
) -> float:
    """Set the learning rate, back-propagate ``loss``, clip, step; return the loss as a float."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(loss.detach())
