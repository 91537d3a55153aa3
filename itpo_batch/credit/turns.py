"""Turn-level credit from token-level implicit rewards: ITPO, Norm-ITPO, length shares, PRIME token rewards.

Everything is vectorised segment arithmetic on a **padded** ``[B, L]`` layout (one conversation per row,
right padding, an assistant mask, values aligned as in :mod:`itpo_batch.model.logprobs`) and a ``[B, K]`` turn
grid (``K`` = most assistant turns in any row). No Python loop over rows, turns or tokens: turns are runs
of the flat ``[B·L]`` array (:mod:`itpo_batch.credit.segments`: segmentation, per-turn sums, back to tokens),
everything else works on the ``[B, K]`` grid; within-conversation softmaxes are masked. Packed buffers reach
this layout through :func:`itpo_batch.model.logprobs.packed_to_padded`; padded rows make the group
estimators (RLOO/GRPO over rows) and the turn grid trivial. Shapes: ``B`` rows, ``L`` tokens, ``K`` turns.

Methods (docs/method.md §1.2, §1.4, §2) and the choices made here:

- **Segmentation** is recomputed from the mask (identical to ``render.turn_ids_from_mask``). The grid has
  ``K >= 1`` columns even when no row has a turn; building it costs one host sync (the edge list). Rows
  with no assistant token have no valid turn and get **zeros everywhere, never NaN** (the official
  ``masked_rloo`` divides by an empty count, docs/method.md §4.1); off-mask values (padding, user tokens)
  are never read, so even NaN there cannot leak.
- **ITPO** turn reward ``S_k`` = sum of the turn's token rewards (the official
  ``calculate_segment_proportions_itpo`` returns exactly these raw sums under the name "proportions").
- **Norm-ITPO** ``p_k = softmax_k(mean_k · n̄ / τ)`` over the valid turns of one conversation, where
  ``mean_k = S_k / n_k`` and ``n̄`` is the mean assistant-turn length over **all turns of the batch**;
  ``τ = 0.4`` (the scripts' ``temp``; the official code default is 0.7). The outcome is split as
  ``outcome · p_k``, so turn rewards sum to the outcome (float tolerance). Under data parallelism pass
  ``mean_length=mean_turn_length(seg, distributed=True)`` so every rank uses the batch-global ``n̄``.
- **Length shares** ``λ_k = n_k / Σ n_k``: how the official code spreads the word-count cost over turns.
- **Normaliser** (``prime_norm: batch_norm``): token rewards / (max over the batch of |suffix sum| + 1e-6),
  from one forward cumsum: ``suffix_t = total − prefix_{t−1}``, so the extremes are the prefix extremes.
  ``scope="global"`` (default, a deviation from the official per-data-parallel-shard max, docs/method.md §1.4)
  all-reduces the max when ``torch.distributed`` is initialised; ``scope="local"`` reproduces the
  per-shard behaviour. β cancels in the normalised rewards.
- **PRIME token rewards** ``β · (log π_φ − log π_ref)`` on assistant tokens. The official ``token``
  granularity also zeroes the reward at each row's *last valid token*; in its layout that is always a user
  token, so it has no effect there. Here a conversation may end on the assistant's stop token, so the drop
  is **off by default** (``drop_last=True`` reproduces the official code literally).
- Turn values go back to tokens with :func:`turns_to_tokens`; :func:`turn_end_mask` marks where the
  official code puts turn rewards (the last assistant token of each turn).
- A registry (:data:`TURN_REWARDS`, :func:`register_turn_reward`) maps a name to a function with one
  signature, ``(TurnRewardInputs) -> [B, K]``, for the estimators that consume turn rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn import functional as F

from itpo_batch.core.registry import registrar
from itpo_batch.credit.segments import TurnSegments as TurnSegments
from itpo_batch.credit.segments import segment_turns as segment_turns
from itpo_batch.credit.segments import turn_sum as turn_sum
from itpo_batch.credit.segments import turns_to_tokens as turns_to_tokens

Scope = Literal["global", "local"]
DEFAULT_TAU = 0.4
DEFAULT_BETA = 0.05
NORM_EPS = 1e-6


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """In-place all-reduce when a process group exists, no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def turn_mean(values: torch.Tensor, seg: TurnSegments) -> torch.Tensor:
    """Per-turn means ``[B, K]`` of token ``values [B, L]``; 0 on invalid slots."""
    return turn_sum(values, seg) / seg.lengths.clamp_min(1).to(values.dtype)


def mean_turn_length(seg: TurnSegments, distributed: bool = False) -> torch.Tensor:
    """``n̄``: mean assistant-turn length over all turns of the batch (0-dim float32; 0 if no turn).

    ``distributed=True`` sums tokens and turns over all ranks first (a no-op without a process group).
    """
    if not distributed:
        return (seg.lengths.sum() / seg.n_turns.sum().clamp_min(1)).to(torch.float32)
    totals = _all_reduce(
        torch.stack([seg.lengths.sum(), seg.n_turns.sum()]).to(torch.float64), dist.ReduceOp.SUM
    )
    return (totals[0] / totals[1].clamp_min(1)).to(torch.float32)


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``valid``; rows without a valid entry give zeros (not NaN)."""
    weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)  # NaN on rows without one
    return torch.where(valid, weights, 0.0)


def itpo_turn_rewards(token_rewards: torch.Tensor, seg: TurnSegments) -> torch.Tensor:
    """ITPO: ``S [B, K]``, the sum of each assistant turn's token rewards."""
    return turn_sum(token_rewards, seg)


def itpo_norm_proportions(
    token_rewards: torch.Tensor,
    seg: TurnSegments,
    tau: float = DEFAULT_TAU,
    mean_length: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Norm-ITPO ``p [B, K]`` = softmax over each row's valid turns of ``turn_mean · n̄ / τ``.

    ``mean_length`` overrides ``n̄`` (default: :func:`mean_turn_length` of this batch). Rows sum to 1, or to 0
    for rows without turns.
    """
    return _norm_weights(turn_mean(token_rewards, seg), seg, tau, mean_length)


def _norm_weights(
    means: torch.Tensor, seg: TurnSegments, tau: float, mean_length: torch.Tensor | float | None
) -> torch.Tensor:
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    n_bar = mean_turn_length(seg) if mean_length is None else mean_length
    return masked_softmax(means * (torch.as_tensor(n_bar, device=means.device) / tau), seg.valid)


def itpo_norm_rewards(outcome: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Norm-ITPO turn rewards ``outcome[:, None] · p`` ``[B, K]``; each row sums to its outcome."""
    return outcome.to(proportions.dtype)[:, None] * proportions


def length_shares(seg: TurnSegments) -> torch.Tensor:
    """``λ [B, K]`` = turn length / row's assistant tokens (float32; zeros for rows without turns)."""
    lengths = seg.lengths.to(torch.float32)
    return lengths / lengths.sum(dim=1, keepdim=True).clamp_min(1.0)


def suffix_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``out[..., t] = Σ_{u ≥ t} x[..., u]`` along ``dim`` (flip–cumsum–flip)."""
    return x.flip(dim).cumsum(dim).flip(dim)


def suffix_max_normalizer(token_rewards: torch.Tensor, scope: Scope = "global") -> torch.Tensor:
    """``max_{i,t} |Σ_{u ≥ t} r_{i,u}| + 1e-6`` over the batch (0-dim); all ranks with ``scope="global"``.

    ``token_rewards [B, L]`` must already be zero off the assistant mask (as :func:`prime_token_rewards`
    returns them).
    """
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be 'global' or 'local', not {scope!r}")
    r = token_rewards.detach()
    if r.numel() == 0:
        peak = r.new_zeros(())
    else:  # suffix_t = total − prefix_{t−1}: its extremes come from the extremes of the prefix sums
        prefix = r.cumsum(1)
        total = prefix[:, -1]
        peak = torch.stack([total - prefix.amin(1), prefix.amax(1) - total, total.abs()]).amax()
    if scope == "global":
        _all_reduce(peak, dist.ReduceOp.MAX)
    return peak + NORM_EPS


def normalize_token_rewards(token_rewards: torch.Tensor, scope: Scope = "global") -> torch.Tensor:
    """The official ``batch_norm``: ``r / (max |suffix sum| + 1e-6)``, ``[B, L]``; see the module docstring."""
    return token_rewards / suffix_max_normalizer(token_rewards, scope)


def prime_token_rewards(
    logp_prm: torch.Tensor,
    logp_ref: torch.Tensor,
    assistant_mask: torch.Tensor,
    beta: float = DEFAULT_BETA,
    attention_mask: torch.Tensor | None = None,
    drop_last: bool = False,
) -> torch.Tensor:
    """PRIME token rewards ``β (log π_φ − log π_ref) · M`` ``[B, L]`` (aligned log-probs ``[B, L]``).

    ``drop_last=True`` also zeroes each row's last valid token (``attention_mask`` required), as the
    official ``token`` granularity does.
    """
    mask = assistant_mask.to(logp_prm.dtype)
    rewards = beta * (logp_prm - logp_ref) * mask
    if not drop_last:
        return rewards
    if attention_mask is None:
        raise ValueError("drop_last=True needs the attention_mask to find each row's last valid token")
    last = attention_mask.long().sum(1) - 1
    cols = torch.arange(rewards.shape[1], device=rewards.device)
    return rewards * (cols[None, :] != last[:, None]).to(rewards.dtype)


def turn_end_mask(assistant_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the last assistant token of each turn (mask 1 followed by 0 or the row's end)."""
    m = assistant_mask.bool()
    return m & ~F.pad(m[:, 1:], (0, 1), value=False)


def on_last_turn(values: torch.Tensor, seg: TurnSegments) -> torch.Tensor:
    """``[B, K]`` with ``values [B]`` at each row's last valid turn and 0 elsewhere (rows without turns: 0)."""
    last = (seg.n_turns - 1).clamp_min(0)
    cols = torch.arange(seg.shape[1], device=values.device)
    hit = (cols[None, :] == last[:, None]) & seg.valid
    return torch.where(hit, values[:, None].to(torch.float32), 0.0)


# ------------------------------------------------------------------------------------- summary + registry


@dataclass
class TurnCredit:
    """Every per-turn quantity of the scored-turns table, on the ``[B, K]`` grid (0 on invalid slots)."""

    seg: TurnSegments
    n_tokens: torch.Tensor  # int64 [B, K]
    implicit_reward: torch.Tensor  # S: sum of the turn's token rewards
    implicit_reward_mean: torch.Tensor  # S / n
    itpo_norm_weight: torch.Tensor  # p
    itpo_norm_reward: torch.Tensor  # outcome · p
    length_share: torch.Tensor  # λ


def turn_credit(
    token_rewards: torch.Tensor,
    assistant_mask: torch.Tensor,
    outcome: torch.Tensor,
    tau: float = DEFAULT_TAU,
    mean_length: torch.Tensor | float | None = None,
) -> TurnCredit:
    """All turn quantities at once from token rewards ``[B, L]``, mask ``[B, L]`` and outcomes ``[B]``."""
    seg = segment_turns(assistant_mask)
    sums = turn_sum(token_rewards, seg)
    means = sums / seg.lengths.clamp_min(1).to(sums.dtype)
    p = _norm_weights(means, seg, tau, mean_length)
    return TurnCredit(seg, seg.lengths, sums, means, p, itpo_norm_rewards(outcome, p), length_shares(seg))


@dataclass
class TurnRewardInputs:
    """What a turn-reward function may read; unused fields can stay ``None``."""

    seg: TurnSegments
    token_rewards: torch.Tensor | None = None  # [B, L], zero off the assistant mask
    outcome: torch.Tensor | None = None  # [B]
    cost: torch.Tensor | None = None  # [B], e.g. the weighted word-count cost c_i (<= 0)
    tau: float = DEFAULT_TAU
    mean_length: torch.Tensor | float | None = None


TurnRewardFn = Callable[[TurnRewardInputs], torch.Tensor]
TURN_REWARDS: dict[str, TurnRewardFn] = {}


register_turn_reward = registrar(TURN_REWARDS, "turn reward")


def turn_rewards(name: str, inputs: TurnRewardInputs) -> torch.Tensor:
    """Turn rewards ``[B, K]`` by registry name (``itpo``, ``itpo_norm``, ``outcome``, ``length_spread``)."""
    if name not in TURN_REWARDS:
        raise KeyError(f"unknown turn reward {name!r}; known: {sorted(TURN_REWARDS)}")
    return TURN_REWARDS[name](inputs)


def _need(value: torch.Tensor | None, what: str, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"turn reward {name!r} needs {what}")
    return value


@register_turn_reward("itpo")
def _itpo(x: TurnRewardInputs) -> torch.Tensor:
    return itpo_turn_rewards(_need(x.token_rewards, "token_rewards", "itpo"), x.seg)


@register_turn_reward("itpo_norm")
def _itpo_norm(x: TurnRewardInputs) -> torch.Tensor:
    p = itpo_norm_proportions(
        _need(x.token_rewards, "token_rewards", "itpo_norm"), x.seg, x.tau, x.mean_length
    )
    return itpo_norm_rewards(_need(x.outcome, "outcome", "itpo_norm"), p)


@register_turn_reward("outcome")
def _outcome(x: TurnRewardInputs) -> torch.Tensor:
    return on_last_turn(_need(x.outcome, "outcome", "outcome"), x.seg)


@register_turn_reward("length_spread")
def _length_spread(x: TurnRewardInputs) -> torch.Tensor:
    return _need(x.cost, "cost", "length_spread").to(torch.float32)[:, None] * length_shares(x.seg)
