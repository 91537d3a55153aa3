"""The policy update: PPO-style epochs and mini-batches over logged conversations, with gradient accumulation.

One call of :func:`update_policy` is one round's policy-improvement step (docs/method.md §5):

- **Data layout.** :class:`UpdateData` holds rendered conversations and flat per-assistant-token tensors
  ``[A]`` in conversation order (conversation ``j`` owns ``[offsets[j], offsets[j+1])``), the layout of
  :class:`itpo_batch.credit.prm_data.PRMDataset`, so the PRM's cached π_ref log-probs are reused as the KL
  reference without another forward (docs/method.md §1.6). Which tokens are trained is the rendered
  ``assistant_mask``: :func:`only_last_turn` restricts it to each conversation's last turn (single-turn
  PPO at logged states, Iterative PPO).
- **Schedule.** ``epochs`` passes; each splits the conversations into mini-batches of ``mini_batch``
  conversations (official: 32 trajectories, no shuffle, 1 epoch; ``shuffle`` is seeded); one optimiser
  step per mini-batch. A mini-batch is packed into buffers of at most ``batch_tokens`` tokens (the
  micro-batches) whose losses are **summed** with the mini-batch's conversation count as the
  aggregation denominator (:func:`itpo_batch.rl.losses.policy_loss`), so micro-batch size never changes the
  gradient (tested: one buffer vs many). A conversation is never split across buffers.
- **Optimiser.** A fresh AdamW per call (:mod:`itpo_batch.model.train`) with the official actor's betas
  0.9/0.999 and weight decay 0.01, constant LR, grad clip 1.0. The buffers' backward passes run in
  :func:`_micro_losses` (each buffer's metrics come off the same forward), then
  :func:`~itpo_batch.model.train.optimizer_step` clips and steps. A fresh optimiser per round is a
  deviation from a continuously running trainer; it makes a round a pure function of (checkpoint, logs,
  seed), which is what exact ``--resume`` needs.
- **KL budget** (docs/method.md §5.6): when ``kl_budget`` is set, the update stops at the first mini-batch
  whose ``kl_old``, measured in its forward (i.e. after the previous steps), exceeds it, *without* taking
  that mini-batch's step (as Spinning Up's PPO does): the policy is already past the budget, and the step,
  computed where the ratios are far from 1, would only push it further. ``kl_old`` is the k3 estimate
  ``e^δ − δ − 1`` with ``δ = old_logp − logp`` (non-negative, unlike verl's ``approx_kl`` = mean of ``δ``,
  which goes negative as soon as the update raises the sampled tokens' likelihood); ``update/early_stop``
  records the stop, and the step metrics average the steps taken only. Until 2026-12 the step was taken
  and the update stopped after it (docs/results.md, "Sanity: on another CPU"). The budget cannot undo the
  steps before: a fresh AdamW's first step moves every weight by about ``lr``, which on the tiny model can
  be far past it, hence ``warmup_steps``.
- **Behaviour log-probs.** :func:`old_logprobs` takes the logged ``behavior_logprobs`` of a conversation
  when every one of its assistant turns has exactly as many values as rendered tokens (generation ids and
  re-tokenised text can differ, see :mod:`itpo_batch.sim.rollout`) and recomputes the rest with the current
  policy (official: the actor always recomputes ``old_log_prob``; ratios then start at 1). Equal counts
  do not prove equal tokens: a conversation whose metadata records a turn that did not re-tokenise to its
  generated ids (:func:`retokenized`) is recomputed too (its values were measured up to 10 nats off).
  :func:`behaviour_logprobs` runs that recompute only on the conversations the logs do not cover, so
  logs that cover the batch (``update/behavior_logprobs_used`` = 1) cost no forward (issue 14).
- **Several processes** (:mod:`itpo_batch.model.dist`): advantages are computed by the caller on the full
  batch (every rank holds it), so whitening, RLOO/GRPO groups and n̄ are global; each mini-batch is split
  over ranks (the model prepared by accelerate, lock-step micro-batches under ``no_sync``, the mini-batch's
  global denominator: conversations, or tokens for ``"token-mean"``), step metrics are summed over ranks,
  so a step equals one process's step. The old-log-prob recompute is sharded by buffer and gathered.
- **NaN cannot spread.** Every step's loss and grad norm (floats already taken) and, once at the end, the
  parameters must be finite, else :class:`~itpo_batch.core.errors.NonFiniteError` stops the round before
  anything is saved. The first step whose loss is NaN has already stepped the optimiser: the model is
  broken either way, and nothing of it is written.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import nn

from itpo_batch.core.errors import NonFiniteError
from itpo_batch.model import dist
from itpo_batch.model.logprobs import assistant_token_logprobs, token_logprobs_and_entropy
from itpo_batch.model.packing import flat_offsets, gather_segments, pack
from itpo_batch.model.render import RenderedConversation
from itpo_batch.model.train import OptimConfig, optimizer_step, prepare, release
from itpo_batch.rl.losses import PolicyLossConfig, aggregate, k3_kl, policy_loss

METRIC_KEYS = ("pg_loss", "clip_frac", "clip_frac_lower", "approx_kl", "kl_old", "entropy", "kl")


@dataclass
class UpdateConfig:
    """Policy-update knobs (official actor defaults unless the tiny CPU model needs otherwise)."""

    lr: float = 1e-4
    "AdamW learning rate, constant. 1e-4 suits the tiny model; official 5e-7 (medical, doc) / 1e-6 (math) at 3B."
    epochs: int = 1
    "Passes over the round's conversations (official ppo_epochs 1)."
    mini_batch: int = 32
    "Conversations per optimiser step (official 32 trajectories)."
    batch_tokens: int = 2048
    "Most tokens per packed micro-batch; gradients are accumulated over a mini-batch's buffers."
    grad_clip: float = 1.0
    "Max gradient norm (official 1.0)."
    weight_decay: float = 0.01
    "AdamW weight decay (official 0.01)."
    betas: tuple[float, float] = (0.9, 0.999)
    "AdamW (β1, β2) (official actor; the package default is (0.9, 0.95))."
    eps: float = 1e-8
    "AdamW ε. Every round starts a fresh AdamW, whose first steps move each weight by about lr·sign(g), however small g is; a larger ε keeps the near-zero gradients of rare tokens' (tied) embeddings from moving them as much as the real ones."
    warmup_steps: int = 0
    "Linear LR warm-up over the first k steps of each round's fresh AdamW (0: constant LR, the official)."
    shuffle: bool = False
    "Shuffle conversations each epoch (official: logged order)."
    kl_budget: float | None = None
    "Stop the update at the first mini-batch past this KL to the old policy (nats/token), before its step."
    temperature: float = 1.0
    "Sampling temperature of the behaviour policy: log-probs are of logits / temperature."
    chunk_size: int = 1024
    "Rows per lm_head chunk in the log-prob computation."
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    "Clip 0.2, dual clip 3.0, entropy 0.001, k3 KL 0.001, seq-mean-token-mean."


@dataclass
class UpdateData:
    """Conversations and their per-assistant-token tensors, flat ``[A]`` in conversation order."""

    rendered: list[RenderedConversation]
    advantages: torch.Tensor  # float32 [A]
    old_logp: torch.Tensor  # float32 [A]: log-probs of the behaviour (or pre-update) policy
    offsets: torch.Tensor  # int64 [N+1]
    ref_logp: torch.Tensor | None = (
        None  # float32 [A]: KL reference (π_0 for ITPO, π_{k-1} for Iterative PPO)
    )

    def __post_init__(self) -> None:
        n_tok = int(self.offsets[-1])
        for name in ("advantages", "old_logp", "ref_logp"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n_tok,):
                raise ValueError(f"{name} must be flat [A] = ({n_tok},), got {tuple(value.shape)}")
        if len(self.offsets) != len(self.rendered) + 1:
            raise ValueError("offsets must have one entry more than there are conversations")

    def __len__(self) -> int:
        return len(self.rendered)


def only_last_turn(r: RenderedConversation) -> RenderedConversation:
    """A copy whose assistant mask (and turn ids) keep only the last assistant turn."""
    last = r.turn_id == r.n_turns - 1
    return dataclasses.replace(
        r, assistant_mask=r.assistant_mask & last, turn_id=np.where(last, 0, -1).astype(np.int32), n_turns=1
    )


@torch.no_grad()
def recompute_logprobs(
    model: nn.Module,
    rendered: Sequence[RenderedConversation],
    batch_tokens: int = 2048,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-probs of every assistant token under ``model``, float32 ``[A]`` on CPU, conversation order."""
    buffers = pack(list(rendered), batch_tokens)  # order-preserving, so buffer order = conversation order
    parts = dist.shard_map(
        lambda b: assistant_token_logprobs(model, b, chunk_size, temperature).float(), buffers
    )
    return torch.cat([p.cpu() for p in parts]) if parts else torch.zeros(0)


def retokenized(conversations: pl.DataFrame) -> list[str]:
    """Conversations whose ``metadata`` records an assistant turn that did not re-tokenise to the ids it was
    generated as (``n_retokenize_mismatch`` > 0, :mod:`itpo_batch.sim.rollout`): their behaviour log-probs
    belong to other tokens than the rendered ones even where the counts agree (measured: 10 nats apart)."""
    if "metadata" not in conversations.columns:
        return []
    n = pl.col("metadata").str.json_path_match("$.n_retokenize_mismatch").cast(pl.Int64, strict=False)
    return conversations.filter(n.fill_null(0) > 0)["conversation_id"].to_list()


def logged_logprobs(
    rendered: Sequence[RenderedConversation],
    conversation_ids: Sequence[str],
    messages: pl.DataFrame,
    untrusted: Collection[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [A], covered [N])``: the logged behaviour log-probs in the flat layout of ``rendered`` (NaN
    where a conversation is not covered) and which conversations are, see the module docstring.

    ``messages`` is the canonical messages table (``conversation_id``, ``assistant_turn``,
    ``behavior_logprobs``); ``conversation_ids[j]`` names ``rendered[j]``. Conversations in ``untrusted``
    (:func:`retokenized`) are never covered.
    """
    offsets = flat_offsets(rendered)
    out = torch.full((int(offsets[-1]),), float("nan"))
    covered = torch.zeros(len(rendered), dtype=torch.bool)
    if "behavior_logprobs" not in messages.columns or not rendered:
        return out, covered
    turn = np.concatenate([r.turn_id[r.assistant_mask] for r in rendered]).astype(np.int64)
    conv = np.repeat(np.arange(len(rendered)), [int(r.assistant_mask.sum()) for r in rendered])
    tokens = pl.DataFrame({"pos": conv, "turn": turn}).group_by("pos", "turn").agg(n_tokens=pl.len())
    ids = pl.DataFrame({"conversation_id": list(conversation_ids), "pos": np.arange(len(rendered))})
    ids = ids.filter(~pl.col("conversation_id").is_in(list(untrusted)))
    logged = (
        messages.filter(pl.col("assistant_turn").is_not_null())
        .select("conversation_id", pl.col("assistant_turn").cast(pl.Int64).alias("turn"), "behavior_logprobs")
        .join(ids, on="conversation_id")
        .join(tokens, on=["pos", "turn"], how="full", coalesce=True)
        .with_columns(ok=pl.col("behavior_logprobs").list.len() == pl.col("n_tokens"))
    )
    good = logged.group_by("pos").agg(pl.col("ok").fill_null(False).all()).filter(pl.col("ok"))["pos"]
    if good.len() == 0:
        return out, covered
    values = (
        logged.filter(pl.col("pos").is_in(good.implode()))
        .sort("pos", "turn")
        .select(pl.col("behavior_logprobs").explode())
        .to_series()
        .to_numpy()
    )
    good_t = torch.from_numpy(np.sort(good.to_numpy()).astype(np.int64))
    out[gather_segments(offsets, good_t)] = torch.from_numpy(values.astype(np.float32))
    covered[good_t] = True
    return out, covered


def old_logprobs(
    rendered: Sequence[RenderedConversation],
    conversation_ids: Sequence[str],
    messages: pl.DataFrame,
    recomputed: torch.Tensor,
    untrusted: Collection[str] = (),
) -> tuple[torch.Tensor, int]:
    """``(old_logp [A], conversations that used logged values)``: :func:`logged_logprobs` where they cover a
    conversation, ``recomputed`` (every conversation's, already computed) elsewhere."""
    logged, covered = logged_logprobs(rendered, conversation_ids, messages, untrusted)
    out = recomputed.clone()
    take = gather_segments(flat_offsets(rendered), covered.nonzero().flatten())
    out[take] = logged[take]
    return out, int(covered.sum())


def behaviour_logprobs(
    model: nn.Module,
    rendered: Sequence[RenderedConversation],
    conversation_ids: Sequence[str],
    messages: pl.DataFrame,
    cfg: UpdateConfig,
    untrusted: Collection[str] = (),
) -> tuple[torch.Tensor, int]:
    """What :func:`old_logprobs` gives, with ``model`` run only on the conversations whose logged
    behaviour log-probs do not cover them: none when the logs cover the batch (no forward at all).

    Values of recomputed conversations equal :func:`recompute_logprobs` of all of them up to float rounding
    (a buffer packs fewer conversations).
    """
    out, covered = logged_logprobs(rendered, conversation_ids, messages, untrusted)
    missing = (~covered).nonzero().flatten()
    if len(missing):
        part = [rendered[i] for i in missing.tolist()]
        fresh = recompute_logprobs(model, part, cfg.batch_tokens, cfg.temperature, cfg.chunk_size)
        out[gather_segments(flat_offsets(rendered), missing)] = fresh
    return out, int(covered.sum())


def _micro_losses(
    model: nn.Module, data: UpdateData, which: torch.Tensor, cfg: UpdateConfig
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Backward through every buffer of one mini-batch (this rank's part of it under a launcher); returns
    each buffer's (loss, metrics), detached, with the mini-batch's global denominator."""
    device = next(model.parameters()).device
    denominator = float(len(which))
    if cfg.loss.aggregation == "token-mean":  # tokens of the whole mini-batch, not conversations
        denominator = float((data.offsets[which + 1] - data.offsets[which]).sum())
    mine = dist.split(which)
    buffers = [(b, mine) for b in pack([data.rendered[i] for i in mine.tolist()], cfg.batch_tokens)]
    filler = (pack([data.rendered[int(which[0])]], cfg.batch_tokens)[0], which[:1])
    out = []
    for (batch, convs), weight, sync in dist.lockstep(buffers, filler, model):
        conv = convs[batch.seq_index]
        idx = gather_segments(data.offsets, conv)
        with sync:
            logp, entropy = token_logprobs_and_entropy(
                model, batch, cfg.chunk_size, cfg.temperature, targets="assistant"
            )
        mask = batch.assistant_mask.to(logp.device)
        conv_index = conv.to(device)[batch.seq_id().to(device)[mask]]
        ref = None if data.ref_logp is None else data.ref_logp[idx].to(device)
        loss, metrics = policy_loss(
            logp[mask], data.old_logp[idx].to(device), data.advantages[idx].to(device), conv_index,
            cfg.loss, ref_logp=ref, entropy=entropy[mask], denominator=denominator,
        )  # fmt: skip
        dist.backward(loss if weight == 1.0 else loss * weight)
        if weight == 0.0:  # a filler keeps this rank in step with the others; it adds nothing
            continue
        with torch.no_grad():  # k3 of the ratio: a non-negative KL(π_θ‖π_old) estimate, for the budget
            k3 = k3_kl(logp[mask], data.old_logp[idx].to(device), cfg.loss.log_ratio_clamp, cfg.loss.kl_clamp)
            metrics["kl_old"] = aggregate(k3, conv_index, cfg.loss.aggregation, denominator)
        out.append((loss.detach(), metrics))
    return out


def update_policy(
    model: nn.Module,
    data: UpdateData,
    cfg: UpdateConfig,
    on_step: Callable[[int, int, float], None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` in place on ``data``; returns ``update/…`` metrics (means over optimiser steps).

    ``seed`` draws the mini-batch shuffles (``cfg.shuffle``).
    """
    optim = OptimConfig(
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        schedule="warmup_constant" if cfg.warmup_steps else "constant", warmup_steps=cfg.warmup_steps,
    )  # fmt: skip
    trained, opt = prepare(model, optim)
    rng = np.random.default_rng(seed)
    n = len(data)
    total = -(-n // cfg.mini_batch) * cfg.epochs
    was_training = model.training
    model.train()
    sums = dict.fromkeys(("loss", "grad_norm", *METRIC_KEYS), 0.0)
    steps, stopped, t0 = 0, False, time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(n) if cfg.shuffle else np.arange(n))
        for start in range(0, n, cfg.mini_batch):
            opt.zero_grad(set_to_none=True)
            parts = _micro_losses(trained, data, order[start : start + cfg.mini_batch], cfg)
            local = [sum(float(p[0]) for p in parts)]  # this rank's sums, then summed over ranks at once
            local += [sum(float(m[key]) for _, m in parts if key in m) for key in METRIC_KEYS]
            sums_now = dist.all_reduce_tensor(torch.tensor(local, dtype=torch.float64)).tolist()
            kl_old = sums_now[1 + METRIC_KEYS.index("kl_old")]
            if cfg.kl_budget is not None and kl_old > cfg.kl_budget:  # past it already: no step from here
                opt.zero_grad(set_to_none=True)
                stopped = True
                break
            stats = optimizer_step(opt, optim, sums_now[0], step=steps, total=total)
            steps += 1
            NonFiniteError.check(f"policy-update loss (step {steps} of {total})", stats.loss)
            NonFiniteError.check(f"policy-update gradient norm (step {steps} of {total})", stats.grad_norm)
            step_metrics = {"loss": stats.loss, "grad_norm": stats.grad_norm}
            step_metrics |= dict(zip(METRIC_KEYS, sums_now[1:], strict=True))
            for key, value in step_metrics.items():
                sums[key] += value
            if on_step is not None:
                on_step(steps, total, step_metrics["loss"])
        if stopped:
            break
    model.train(was_training)
    release(trained, opt)
    NonFiniteError.check_all("policy parameters after the update", model.parameters())
    out = {f"update/{k}": v / max(steps, 1) for k, v in sums.items()}
    return out | {
        "update/steps": steps,
        "update/early_stop": float(stopped),
        "update/conversations": n,
        "update/tokens": int(data.offsets[-1]),
        "update/seconds": time.perf_counter() - t0,
    }
