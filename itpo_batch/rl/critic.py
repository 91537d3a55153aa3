"""The PPO critic of ``--estimator ppo``: a value model over assistant tokens, fitted on the round's returns.

Design decisions (docs/method.md §4.5: the release has no critic, so this is a reconstruction):

- **Architecture.** :class:`itpo_batch.model.loading.ValueModel` (backbone + scalar head), initialised from π_0 and
  warm-started round to round; its value at an assistant token estimates the return from that token on.
- **Order.** Standard PPO: the critic's values *before* fitting feed GAE (:func:`critic_values`), then the
  critic regresses on the returns ``A + V`` (:func:`fit_critic`), so the advantages of a round never
  see a critic fitted on that round's own returns.
- **Loss.** Token-mean MSE over assistant tokens, ``epochs`` passes over packed buffers of at most
  ``batch_tokens`` tokens (one optimiser step per buffer). The package's AdamW default
  (:mod:`itpo_batch.model.train`: constant LR, grad clip 1.0) with weight decay 0.01. No value clipping: a
  fresh optimiser per round and a few epochs keep the critic close to its previous round anyway.
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
    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    trained, opt = prepare(model, optim)
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
