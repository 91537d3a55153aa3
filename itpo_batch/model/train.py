"""The one training-loop helper: AdamW from a small config, micro-batch accumulation, clipping, LR schedule.

Every trained model of the package (SFT, the implicit PRM, the turn Q-model, the PPO critic, the policy
update) takes its optimiser step here; each stage keeps its own loop (what a step is, epochs, early stops)
and calls :func:`make_optimizer` once and :func:`train_step` per optimiser step, as in nanochat or CleanRL.

Design decisions:

- **One stated AdamW default** (:class:`OptimConfig`): betas (0.9, 0.95), eps 1e-8, weight decay 0,
  grad-norm clip 1.0, constant LR. The learning rate has no default (3e-4 suits the tiny model from
  scratch, 1e-6 a 3B LM). Each stage's config holds its overrides, with the values it has always used:

  ============  =============================================================================
  SFT           warm-up + cosine (``SFTConfig.warmup_ratio`` 0.05)
  turn Q-model  warm-up + cosine (``QConfig.warmup_ratio`` 0.1)
  critic        weight decay 0.01 (``CriticConfig.weight_decay``; the torch default it always had)
  PRM           betas (0.9, 0.999), grad clip 10 (``PRMConfig``; the official ITPO/PRIME PRM)
  update        betas (0.9, 0.999), weight decay 0.01 (``UpdateConfig``; the official actor)
  ============  =============================================================================

- **Schedule** ``'warmup_cosine'``: linear warm-up to the peak over ``max(1, int(total · warmup_ratio))``
  steps, then cosine decay towards 10 % of the peak, reached one step past the last (:func:`lr_at`). It
  needs the exact number of steps in advance; with shuffled epochs and greedy packing that number depends
  on each epoch's order, so callers plan their epochs first (:func:`itpo_batch.model.packing.count_buffers`).
  ``'constant'`` keeps ``lr`` throughout.
- **Micro-batch accumulation.** :func:`train_step` back-propagates each micro-batch loss as it comes
  (one forward graph alive at a time) and **sums** them: a caller that splits a step into micro-batches
  divides each micro-batch's loss by the whole step's denominator (conversations, tokens), so the gradient
  does not depend on how the step was split.
- **Clipping** by the global L2 norm of the optimiser's parameters' gradients (``clip_grad_norm_``); the
  reported ``grad_norm`` is the norm *before* clipping. ``grad_clip=inf`` measures without clipping.
- **Step metrics**: :class:`StepMetrics` (summed loss, grad norm, lr), plain floats.
- **More than one process** (:mod:`itpo_batch.model.dist`): :func:`prepare` hands model and optimiser to
  ``accelerate`` (DDP or FSDP from the launch config; the bare pair in one process). Each rank
  back-propagates its share of the step (losses with the step's *global* denominator, scaled by the number
  of processes because DDP averages), so the step is one process's step; the reported loss is summed over
  ranks and the gradient norm is taken after the all-reduce, identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itpo_batch.model import dist
from itpo_batch.model.packing import PackedBatch, pack
from itpo_batch.model.render import RenderedConversation

Schedule = Literal["constant", "warmup_cosine", "warmup_constant"]


@dataclass
class OptimConfig:
    """AdamW and its schedule; the defaults are the package's one stated AdamW setting."""

    lr: float
    "Peak (or constant) learning rate."
    betas: tuple[float, float] = (0.9, 0.95)
    "AdamW (β1, β2)."
    eps: float = 1e-8
    "AdamW ε."
    weight_decay: float = 0.0
    "AdamW decoupled weight decay."
    grad_clip: float = 1.0
    "Max global gradient L2 norm (inf: measure only)."
    schedule: Schedule = "constant"
    "'constant', or 'warmup_cosine' (linear warm-up, then cosine decay to 10 % of lr)."
    warmup_ratio: float = 0.0
    "Fraction of the steps with linear warm-up ('warmup_cosine' only)."
    warmup_steps: int = 0
    "Steps of linear warm-up, then constant ('warmup_constant' only)."

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.schedule not in ("constant", "warmup_cosine", "warmup_constant"):
            raise ValueError(
                f"schedule must be 'constant', 'warmup_cosine' or 'warmup_constant', not {self.schedule!r}"
            )
        if self.lr < 0 or self.grad_clip <= 0 or not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0:
            raise ValueError("lr must be >= 0, grad_clip > 0, warmup_ratio in [0, 1) and warmup_steps >= 0")


@dataclass(frozen=True)
class StepMetrics:
    """What one optimiser step reports."""

    loss: float
    "Sum of the step's micro-batch losses."
    grad_norm: float
    "Global gradient L2 norm before clipping."
    lr: float
    "Learning rate the step used."


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, lr_scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``. ``lr_scales`` maps a parameter-name prefix to a
    multiplier of the learning rate (e.g. ``{"value_head": 10.0}``); the other parameters take ``lr``.
    Each group keeps its multiplier as ``lr_scale``, which :func:`optimizer_step` applies to the schedule."""
    scales = lr_scales or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
            groups.setdefault(scale, []).append(p)
    params = [{"params": ps, "lr_scale": scale, "lr": cfg.lr * scale} for scale, ps in groups.items()]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def prepare(
    model: nn.Module, cfg: OptimConfig, lr_scales: dict[str, float] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(model to train through, optimiser)``: :func:`make_optimizer`, then
    :func:`itpo_batch.model.dist.prepare` (DDP/FSDP wrapper under a launcher; the bare model in one
    process). Call :func:`release` when the stage is done with them."""
    return dist.prepare(model, make_optimizer(model, cfg, lr_scales))


def release(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Let accelerate forget a pair from :func:`prepare` (no-op in one process)."""
    dist.release(model, opt)


def shard_step(
    batch: PackedBatch, members: torch.Tensor, rendered: Sequence[RenderedConversation]
) -> tuple[PackedBatch, torch.Tensor, float]:
    """This rank's share of a step that is one packed buffer (SFT, Q-model, critic): ``(buffer, members,
    weight)``, where slot ``j`` of ``batch`` (and of the returned buffer) holds ``rendered[members[j]]``.

    One process: ``(batch, members, 1.0)``. Under a launcher: a contiguous part of the buffer's
    conversations repacked into one buffer; a rank left without any gets the first one with weight 0 (it
    must still join the step's gradient all-reduce). Losses keep the whole buffer's denominator.
    """
    if not dist.is_distributed():
        return batch, members, 1.0
    mine, weight = dist.split(members), 1.0
    if len(mine) == 0:
        mine, weight = members[:1], 0.0
    seqs = [rendered[int(i)] for i in mine]
    return pack(seqs, sum(len(r) for r in seqs))[0], mine, weight


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10 % of it (``step`` is 0-based, of ``total``)."""
    warm = max(1, int(total * warmup_ratio))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_lr(cfg: OptimConfig, step: int, total: int) -> float:
    """The learning rate of 0-based ``step`` of ``total`` under ``cfg.schedule``."""
    if cfg.schedule == "warmup_constant":
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr if cfg.schedule == "constant" else lr_at(step, total, cfg.lr, cfg.warmup_ratio)


def train_step(
    opt: torch.optim.Optimizer,
    cfg: OptimConfig,
    losses: Iterable[torch.Tensor],
    step: int = 0,
    total: int = 1,
) -> StepMetrics:
    """One optimiser step: zero the gradients, back-propagate every micro-batch loss, clip, step.

    ``losses`` may be a generator, so each micro-batch's forward runs only when the previous one's
    backward is done. ``step``/``total`` place the step on the schedule (ignored by ``'constant'``).
    Under a launcher ``losses`` are this rank's shares of the step (see the module docstring) and the
    reported loss is their sum over ranks.
    """
    opt.zero_grad(set_to_none=True)
    total_loss = 0.0
    for loss in losses:
        dist.backward(loss)
        total_loss += float(loss.detach())
    return optimizer_step(opt, cfg, dist.all_reduce(total_loss), step, total)


def optimizer_step(
    opt: torch.optim.Optimizer, cfg: OptimConfig, loss: float, step: int = 0, total: int = 1
) -> StepMetrics:
    """Set the scheduled LR, clip and step on gradients already accumulated by the caller.

    For a caller that runs its own backward passes (the policy update reads per-micro-batch metrics off
    the same forward); :func:`train_step` is this after zeroing and accumulating. ``loss`` is only reported.
    """
    lr = scheduled_lr(cfg, step, total)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = dist.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return StepMetrics(loss=loss, grad_norm=float(grad_norm), lr=lr)
