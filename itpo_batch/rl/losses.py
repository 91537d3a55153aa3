"""Policy loss: PPO clipped surrogate with dual clip, entropy bonus and k3 KL to a reference (verl actor).

Inputs are **flat per-assistant-token** tensors ``[N]`` plus ``conv_index [N]`` (which conversation each
token belongs to, any ints), so padded rows (``x[mask]``) and packed buffers work alike. Defaults are the
official ones (docs/method.md §5.1, verl ``core_algos.compute_policy_loss`` / ``kl_penalty`` at
``ddd86f52`` plus the recipe config):

- ratio ``ρ = exp(clamp(logp − old_logp, ±20))``; ``ℓ = max(−Aρ, −A clip(ρ, 1−0.2, 1+0.2))``, and for
  ``A < 0`` the **dual clip** ``min(ℓ, −3A)`` caps the loss of very unlikely tokens.
- entropy bonus ``−0.001 · H`` (``entropy [N]`` from the forward, aligned as in :mod:`itpo_batch.model.logprobs`).
- KL loss ``+0.001 · k3`` with ``δ = clamp(ref_logp − logp, ±20)``, ``k3 = clamp(e^δ − δ − 1, ±10)``
  (``low_var_kl``); skipped when ``ref_logp`` is ``None`` or ``kl_coef == 0``.
- **Aggregation** ``"seq-mean-token-mean"`` (default): each conversation's token mean, then the mean over
  conversations. The official code gets this implicitly from token-mean over micro-batches of one
  trajectory; here it is explicit, so micro-batch size no longer changes the loss. ``"token-mean"``: one mean
  over all tokens. All three terms and the metrics use the same aggregation (verl does the same).
- **Micro-batching.** ``denominator`` replaces the local count (conversations, or tokens for
  ``"token-mean"``) by a global one: with ``denominator = conversations in the whole mini-batch`` the
  micro-batch losses simply **add up** to the full-batch loss, so gradient accumulation needs no other
  weighting (and under DDP pass the global count over all ranks). Without it, scale each micro-batch loss by
  ``its conversations / total`` yourself. A conversation must not be split across micro-batches in
  ``seq-mean-token-mean`` mode (its token mean would be computed twice).
- Metrics (detached 0-dim tensors, same aggregation): ``pg_loss``, ``clip_frac`` (the clipped branch was
  taken), ``clip_frac_lower`` (the dual clip was taken), ``approx_kl`` (``mean(old_logp − logp)``, verl
  ``ppo_kl``), ``entropy``, ``kl`` (k3 to the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["seq-mean-token-mean", "token-mean"]


@dataclass
class PolicyLossConfig:
    """Knobs of :func:`policy_loss` (official defaults)."""

    clip_low: float = 0.2  # ρ lower bound 1 − clip_low
    clip_high: float = 0.2  # ρ upper bound 1 + clip_high
    dual_clip: float = 3.0  # c of the dual clip on negative advantages (> 1); None-like: use float("inf")
    entropy_coef: float = 0.001  # prime_trainer.yaml (verl default 0)
    kl_coef: float = 0.001  # actor use_kl_loss, low_var_kl (k3)
    aggregation: Aggregation = "seq-mean-token-mean"
    log_ratio_clamp: float = 20.0  # clamp of log ρ and of δ in k3
    kl_clamp: float = 10.0  # clamp of the k3 value


def k3_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 20.0, out_clamp: float = 10.0
) -> torch.Tensor:
    """``[N]``: ``e^δ − δ − 1`` with ``δ = clamp(ref − logp)``, clamped to ``±out_clamp`` (verl ``low_var_kl``)."""
    delta = (ref_logp - logp).clamp(-clamp, clamp)
    return (delta.exp() - delta - 1).clamp(-out_clamp, out_clamp)


def aggregate(
    x: torch.Tensor, conv_index: torch.Tensor, mode: Aggregation, denominator: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``x [N]`` to a 0-dim tensor (see the module docstring); 0 when ``N == 0``.

    ``seq-mean-token-mean``: ``Σ_c mean_{t∈c} x_t / D`` with ``D`` = conversations present (or
    ``denominator``). ``token-mean``: ``Σ_t x_t / D`` with ``D`` = tokens (or ``denominator``).
    """
    if mode == "token-mean":
        count = float(x.numel()) if denominator is None else denominator
        return x.sum() / max(count, 1.0)
    if mode != "seq-mean-token-mean":
        raise ValueError(f"unknown aggregation {mode!r}; use 'seq-mean-token-mean' or 'token-mean'")
    _, inverse = torch.unique(conv_index, return_inverse=True)
    n_conv = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = x.new_zeros(n_conv).index_add(0, inverse, x)
    counts = torch.bincount(inverse, minlength=n_conv).to(x.dtype)
    count = float(n_conv) if denominator is None else denominator
    return (sums / counts.clamp_min(1)).sum() / max(count, 1.0)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(loss, clipped, dual_clipped, log_ratio)``, each ``[N]`` (flags as float)."""
    log_ratio = (logp - old_logp).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clip_loss = torch.maximum(loss1, loss2)
    loss3 = -advantages * cfg.dual_clip
    negative = advantages < 0
    loss = torch.where(negative, torch.minimum(clip_loss, loss3), clip_loss)
    clipped = (loss2 > loss1).to(logp.dtype)
    dual = ((clip_loss > loss3) & negative).to(logp.dtype)
    return loss, clipped, dual, log_ratio


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    conv_index: torch.Tensor,
    cfg: PolicyLossConfig | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` from per-assistant-token ``[N]`` tensors (gradients flow through ``logp``/``entropy``).

    ``old_logp``, ``advantages`` and ``ref_logp`` are treated as constants (detached here).
    """
    cfg = cfg or PolicyLossConfig()
    if not (logp.shape == old_logp.shape == advantages.shape == conv_index.shape) or logp.dim() != 1:
        raise ValueError("logp, old_logp, advantages and conv_index must all be flat [N] tensors")
    advantages = advantages.detach().to(logp.dtype)
    pg, clipped, dual, log_ratio = clipped_surrogate(logp, old_logp.detach(), advantages, cfg)

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate(x, conv_index, cfg.aggregation, denominator)

    loss = agg(pg)
    metrics = {"pg_loss": loss.detach(), "clip_frac": agg(clipped), "clip_frac_lower": agg(dual)}
    metrics["approx_kl"] = agg(-log_ratio.detach())
    if entropy is not None:
        ent = agg(entropy)
        metrics["entropy"] = ent.detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
    if ref_logp is not None:
        kl = agg(k3_kl(logp, ref_logp.detach(), cfg.log_ratio_clamp, cfg.kl_clamp))
        metrics["kl"] = kl.detach()
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl
    return loss, metrics
