"""The PPO critic of ``--estimator ppo``: a value model over assistant tokens, fitted on the round's returns.

Design decisions (docs/method.md §4.5: the release has no critic, so this is a reconstruction):

- **Architecture.** :class:`itpo_batch.model.loading.ValueModel` (backbone + scalar head), initialised from π_0 and
  warm-started round to round; its value at an assistant token estimates the return from that token on.
- **Order.** Standard PPO: the critic's values *before* fitting feed GAE (:func:`critic_values`), then the
  critic regresses on the returns ``A + V`` (:func:`fit_critic`), so the advantages of a round never
  see a critic fitted on that round's own returns.
- **Loss.** Token-mean MSE over assistant tokens, ``epochs`` passes over packed buffers of at most
  ``batch_tokens`` tokens (one optimiser step per buffer). The package's AdamW (:mod:`itpo_batch.model.train`:
  constant LR, grad clip 1.0) with weight decay 0.01. No value clipping: a fresh optimiser per round and a
  few epochs keep the critic close to its previous round anyway.
- **A head that can reach the returns' scale** (ours; docs/results.md "Sanity"). A fresh head outputs ~0
  while the returns are in reward units (up to ``dpo = 10`` for Norm-ITPO); at the backbone's lr of 1e-4
  a round's few steps move it by a fraction of that, and the critic explained ≤ 0.035 of the returns'
  variance on the sanity task, so PPO ran with no baseline but whitening. Then Norm-ITPO's later turns,
  whose suffix returns hold only their share of the outcome, fell below the batch mean and were pushed
  down in successful conversations. So: a fresh head's bias starts at the mean return of its first fit
  (``init_bias``, as the Q-model's), the head learns ``head_lr_scale`` × faster than the backbone, and
  AdamW's ε is 1e-5 (the update's fix for the tiny model's unused tied embeddings, results.md).
- **Layout.** Values and returns are flat ``[A]`` in conversation order (:mod:`itpo_batch.rl.update`'s layout).
- **Several processes** (:mod:`itpo_batch.model.dist`): each step's buffer is split over ranks with the
  whole buffer's token count as denominator (:func:`~itpo_batch.model.train.shard_step`); value forwards
  without gradients are sharded by buffer and gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from itpo_batch.core.errors import ItpoError
from itpo_batch.model import dist
from itpo_batch.model.attention import packed_attention
from itpo_batch.model.loading import ValueModel
from itpo_batch.model.packing import PackedBatch, flat_offsets, gather_segments, model_inputs, pack
from itpo_batch.model.render import RenderedConversation
from itpo_batch.model.train import OptimConfig, prepare, release, shard_step, train_step


@dataclass
class CriticConfig:
    """Critic regression settings."""

    lr: float = 1e-4
    "AdamW learning rate (tiny model; ~1e-6 for pretrained LMs)."
    epochs: int = 2
    "Passes over the round's conversations."
    batch_tokens: int = 2048
    "Tokens per packed buffer = per optimiser step."
    grad_clip: float = 1.0
    "Max gradient norm."
    weight_decay: float = 0.01
    "AdamW weight decay (0.01: torch's AdamW default, which the critic has always used)."
    eps: float = 1e-5
    "AdamW ε (1e-5, as ``update.eps`` for the tiny model; ~1e-8 is usual for pretrained LMs)."
    head_lr_scale: float = 10.0
    "The value head's learning rate is ``lr`` × this (1: one rate for all)."
    init_bias: bool = True
    "A fresh head's bias starts at the mean return of its first fit (a head loaded from a round keeps its own)."

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps <= 0 or self.head_lr_scale <= 0 or self.epochs < 0:
            raise ItpoError("critic: lr and epochs must be >= 0, eps and head_lr_scale > 0")


def _buffer_values(model: ValueModel, batch: PackedBatch) -> torch.Tensor:
    """Values of the assistant tokens of one buffer, ``[A_b]`` float32, in buffer order."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    inputs.pop("use_cache")  # ValueModel.forward passes use_cache=False itself
    with (
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"),
        packed_attention(model, batch.cu_seqlens, device),
    ):
        values = model(**inputs)[0].float()
    return values[batch.assistant_mask.to(device)]


@torch.no_grad()
def critic_values(
    model: ValueModel, rendered: Sequence[RenderedConversation], batch_tokens: int = 2048
) -> torch.Tensor:
    """``V`` at every assistant token, float32 ``[A]`` on CPU, conversation order."""
    parts = dist.shard_map(lambda b: _buffer_values(model, b), pack(list(rendered), batch_tokens))
    return torch.cat([p.cpu() for p in parts]) if parts else torch.zeros(0)


def fit_critic(
    model: ValueModel,
    rendered: Sequence[RenderedConversation],
    returns: torch.Tensor,
    cfg: CriticConfig,
    seed: int = 0,
) -> dict[str, float]:
    """Regress ``model`` on ``returns [A]`` (in place); ``critic/…`` metrics. ``seed`` draws the shuffles."""
    offsets = flat_offsets(rendered)
    if tuple(returns.shape) != (int(offsets[-1]),):
        raise ValueError(f"returns must be flat [A] = ({int(offsets[-1])},), got {tuple(returns.shape)}")
    device = next(model.parameters()).device
    if cfg.init_bias and model.fresh_head:
        with torch.no_grad():
            model.value_head.bias.fill_(float(returns.float().mean()))
    model.fresh_head = False
    optim = OptimConfig(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    trained, opt = prepare(model, optim, {"value_head": cfg.head_lr_scale})
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(len(rendered)))
        for full in pack([rendered[i] for i in order.tolist()], cfg.batch_tokens):
            batch, members, weight = shard_step(full, order[full.seq_index], rendered)
            target = returns[gather_segments(offsets, members)].to(device)
            sq = F.mse_loss(_buffer_values(trained, batch), target, reduction="sum")
            loss = sq / int(full.assistant_mask.sum())  # the whole step's tokens: token-mean MSE
            losses.append(train_step(opt, optim, [loss if weight == 1.0 else loss * weight]).loss)
    release(trained, opt)
    model.eval()
    after = critic_values(model, rendered, cfg.batch_tokens)
    return {
        "critic/loss_first": losses[0] if losses else float("nan"),
        "critic/loss": float(F.mse_loss(after, returns.float())),
        "critic/explained_var": float(1 - (returns - after).var() / returns.var().clamp_min(1e-8)),
    }
