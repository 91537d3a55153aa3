"""Advantage estimators on turn rewards: faithful masked RLOO, once-per-conversation RLOO, GRPO, PPO (GAE).

One registry (:data:`ESTIMATORS`, :func:`register_estimator`), one signature
``fn(EstimatorInputs, EstimatorConfig) -> (advantages [B, L], returns [B, L])``; :func:`estimate` calls the
entry and whitens. Everything runs on the padded ``[B, L]`` layout and the ``[B, K]`` turn grid of
:func:`itpo_batch.credit.turns.segment_turns`, with no Python loop over rows or turns (the only loop is GAE's
over ``N/128`` token chunks when ``γλ ≠ 1``). Shapes: ``B`` rows, ``L`` tokens, ``K`` turns, ``G`` groups.

Inputs (:class:`EstimatorInputs`). ``turn_rewards [B, K]`` are the already coefficient-weighted turn rewards
placed at every turn end (e.g. ``dpo · (a p + c λ)`` for Norm-ITPO, ``dpo · (S + c λ)`` for ITPO; build them
with :func:`itpo_batch.credit.turns.turn_rewards`). ``last_turn_reward [B]`` is the official ``gt`` component
(``gt · s_i``), which lives on the last turn end only. The official code RLOOs each reward component on its
own; masked RLOO is linear in ``Z`` for a fixed position mask, so summing the components that share the
every-turn-end mask *before* RLOO is exactly the same, and only the single-position ``gt`` term needs its
own slot. Groups come from an explicit ``group_index [B]`` (any ints; :func:`group_index_from_ids` maps the
``group_id`` strings), never from row order (docs/method.md §4.1).

Estimators and choices:

- ``rloo`` (**faithful**, docs/method.md §4.2): ``m_i = Σ_k T_ik / K_i``;
  ``T'_ik = (n T_ik − Σ_{j∈G} m_j) / (n − 1)`` on every valid turn, so the baseline is subtracted **at every
  turn end** (a known official quirk, kept for fidelity); the ``gt`` term gets exact leave-one-out at the
  last turn. Returns are suffix sums over turns. At equal outcome a conversation with more turns gets a
  lower return; on medical this drove Norm-ITPO to ask fewer questions (docs/results.md, "What explains").
- ``rloo_once`` (**deviation**, docs/method.md §4.3): ``s_i = Σ_k T_ik + y_i``, baseline
  ``b_i = mean_{j∈G, j≠i} s_j`` subtracted once, at the last turn end. The first turn's return is exactly
  ``s_i − b_i``; the turn rewards keep their shape.
- ``grpo`` (**reconstruction**, docs/method.md §4.4): ``masked_rloo`` replaced by a group z-score of the turn-end entries,
  ``T'_ik = (T_ik − μ_G) / (σ_G + ε)``, with ``μ_G`` and the unbiased ``σ_G`` pooled over **all valid turn
  entries of the group's rows** (entry-weighted), ``ε = grpo_eps``; the ``gt`` term is z-scored on its own
  (one entry per row: exactly verl's outcome GRPO). Pooled entries, not per-row means, because then equal
  entries give ``T − μ = 0`` exactly, whereas a σ of per-row means can be 0 while turns still differ (the
  ratio would explode). Like faithful RLOO, the mean is subtracted at every turn end. GRPO is not linear, so
  ``turn_rewards`` is z-scored as *one* component (the caller's weighted sum); for outcome-only GRPO pass the
  outcome as ``last_turn_reward``, not as a turn reward (zeros on earlier turns would enter the statistics).
- ``ppo`` (**reconstruction**, docs/method.md §4.5): raw turn rewards (no group baseline) at the turn ends, and GAE over the
  **assistant tokens only**: user/template tokens are removed (compacted away), so the last token of turn k
  bootstraps from the critic's value at the first token of turn k+1, discounted by ``γ`` once (the user's
  reply is part of the environment transition). ``δ_t = r_t + γ V_next − V_t``, ``A_t = δ_t + γλ A_next``, and
  ``V`` after the row's last assistant token is 0 (terminal, no truncation bootstrap). Returns are the
  critic targets ``A + V`` (before whitening), not suffix sums. Defaults ``γ = λ = 1`` (verl).
- **Groups of one** (and, for RLOO, groups with a single row that has turns) use a **baseline of 0**, as
  verl does (RLOO leaves the score, GRPO uses ``μ = 0, σ = 1``). Whitening then removes the token-weighted
  batch mean, so such a conversation is in effect compared with the batch. No error, no NaN.
- **Rows without assistant turns** get zeros everywhere, and are not counted in their group's ``n``
  (docs/method.md §4.1: the official code divides by an empty count here and spreads NaN through whitening).
- **Whitening** (on by default): ``(x − μ) / sqrt(var + 1e-8)`` over all assistant tokens of the batch,
  token-weighted, unbiased variance, mean not added back (verl ``masked_whiten``). Fewer than two tokens give
  variance 0, no tokens give zeros. Statistics are local to this batch (the official code also runs on the
  full batch on the driver); call it on the full batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from itpo_batch.core.registry import registrar
from itpo_batch.credit.turns import TurnSegments, suffix_sum, turn_end_mask, turns_to_tokens


@dataclass
class EstimatorConfig:
    """Knobs of every estimator (each reads only its own)."""

    whiten: bool = True  # masked whitening of the advantages over the batch's assistant tokens
    whiten_eps: float = 1e-8  # verl masked_whiten
    grpo_eps: float = 1e-6  # added to the group std (verl GRPO)
    gamma: float = 1.0  # PPO/GAE discount per assistant token (verl default 1.0)
    lam: float = 1.0  # PPO/GAE λ (verl default 1.0)
    gae_chunk: int = 128  # tokens per block of the chunked discounted suffix sum


@dataclass
class EstimatorInputs:
    """What an estimator may read; unused fields can stay ``None``."""

    turn_rewards: torch.Tensor  # float [B, K]: rewards at every turn end (0 on invalid slots)
    seg: TurnSegments  # segmentation of assistant_mask
    assistant_mask: torch.Tensor  # bool/int [B, L]
    group_index: torch.Tensor  # int [B]: explicit group ids (any values; equal id = same group)
    last_turn_reward: torch.Tensor | None = None  # float [B]: the gt component, on the last turn end only
    values: torch.Tensor | None = None  # float [B, L]: critic values (ppo only), aligned with the mask


EstimatorFn = Callable[[EstimatorInputs, EstimatorConfig], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Estimator:
    """A registry entry: the function and what it needs from the arm that uses it."""

    fn: EstimatorFn
    needs_critic: bool = False
    "Reads critic values ``[B, L]`` (``EstimatorInputs.values``), so the arm fits a critic each round."

    def __call__(self, inputs: EstimatorInputs, cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(inputs, cfg)


ESTIMATORS: dict[str, Estimator] = {}
_register = registrar(ESTIMATORS, "estimator")


def register_estimator(name: str, *, needs_critic: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: add ``fn`` to :data:`ESTIMATORS` under ``name`` (a name registered twice is an error)."""

    def wrap(fn: EstimatorFn) -> EstimatorFn:
        _register(name)(Estimator(fn, needs_critic))
        return fn

    return wrap


def get_estimator(name: str) -> Estimator:
    """The registry entry of ``name``; KeyError listing the known names otherwise."""
    if name not in ESTIMATORS:
        raise KeyError(f"unknown estimator {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate(
    name: str, inputs: EstimatorInputs, cfg: EstimatorConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [B, L], returns [B, L])`` by registry name (``rloo``, ``rloo_once``, ``grpo``, ``ppo``).

    Both are 0 off the assistant mask; advantages are whitened when ``cfg.whiten``.
    """
    entry = get_estimator(name)
    cfg = cfg or EstimatorConfig()
    _check(inputs)
    advantages, returns = entry(inputs, cfg)
    if cfg.whiten:
        advantages = masked_whiten(advantages, inputs.assistant_mask, cfg.whiten_eps)
    return advantages, returns


def _check(x: EstimatorInputs) -> None:
    b, k = x.seg.shape
    if tuple(x.assistant_mask.shape) != (b, x.seg.n_cols):
        raise ValueError(
            f"assistant_mask {tuple(x.assistant_mask.shape)} does not match seg ({b}, {x.seg.n_cols})"
        )
    if tuple(x.turn_rewards.shape) != (b, k):
        raise ValueError(f"turn_rewards must be [B, K] = ({b}, {k}), got {tuple(x.turn_rewards.shape)}")
    if tuple(x.group_index.shape) != (b,):
        raise ValueError(f"group_index must be [B] = ({b},), got {tuple(x.group_index.shape)}")
    if x.values is not None and tuple(x.values.shape) != tuple(x.assistant_mask.shape):
        raise ValueError(f"values must be [B, L] like assistant_mask, got {tuple(x.values.shape)}")
    if x.last_turn_reward is not None and tuple(x.last_turn_reward.shape) != (b,):
        raise ValueError(f"last_turn_reward must be [B] = ({b},), got {tuple(x.last_turn_reward.shape)}")


def group_index_from_ids(group_ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[B]`` group indices from ``group_id`` strings, numbered in order of first appearance."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------ group helpers


def _group_totals(x: torch.Tensor, member: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Per-row ``Σ_{j in row's group, member_j} x_j`` ``[B]`` for ``x [B]``, ``member`` bool ``[B]``."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    sums = x.new_zeros(int(inverse.max()) + 1 if inverse.numel() else 0)
    return sums.index_add(0, inverse, torch.where(member, x, 0.0)).index_select(0, inverse)


def _group_count(member: torch.Tensor, group_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row number of member rows in the row's group, ``[B]`` float."""
    return _group_totals(member.to(dtype), member, group_index)


def _has_turns(seg: TurnSegments) -> torch.Tensor:
    return seg.n_turns > 0


def _loo_baseline(s: torch.Tensor, seg: TurnSegments, group_index: torch.Tensor) -> torch.Tensor:
    """``mean_{j∈G, j≠i} s_j`` ``[B]`` over rows with turns; 0 for singletons and rows without turns."""
    member = _has_turns(seg)
    n = _group_count(member, group_index, s.dtype)
    total = _group_totals(s, member, group_index)
    return torch.where(member & (n > 1), (total - s) / (n - 1).clamp_min(1), 0.0)


def _masked_rloo_turns(t: torch.Tensor, seg: TurnSegments, group_index: torch.Tensor) -> torch.Tensor:
    """The official ``masked_rloo`` over turn ends: ``(n T − Σ_G m) / (n − 1)`` on valid turns, ``[B, K]``."""
    member = _has_turns(seg)
    t = torch.where(seg.valid, t, 0.0)
    m = t.sum(1) / seg.n_turns.clamp_min(1).to(t.dtype)
    n = _group_count(member, group_index, t.dtype)
    gsum = _group_totals(m, member, group_index)
    loo = (n[:, None] * t - gsum[:, None]) / (n - 1).clamp_min(1)[:, None]
    return torch.where(seg.valid & (n > 1)[:, None], loo, t)


def _turn_returns(r: torch.Tensor, x: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Suffix sums over turns broadcast to tokens: ``(G, G)`` ``[B, L]`` (advantages = returns, unwhitened)."""
    g = turns_to_tokens(suffix_sum(torch.where(x.seg.valid, r, 0.0), dim=1), x.seg)
    return g, g


def _last(x: EstimatorInputs) -> torch.Tensor:
    if x.last_turn_reward is None:
        return x.turn_rewards.new_zeros(x.seg.shape[0])
    return x.last_turn_reward.to(x.turn_rewards.dtype)


def _on_last(v: torch.Tensor, x: EstimatorInputs) -> torch.Tensor:
    """``[B, K]``: ``v [B]`` at each row's last valid turn (like ``credit.on_last_turn``, keeping v's dtype)."""
    cols = torch.arange(x.seg.shape[1], device=v.device)
    hit = (cols[None, :] == (x.seg.n_turns - 1)[:, None]) & x.seg.valid
    return torch.where(hit, v[:, None], 0.0)


# -------------------------------------------------------------------------------------------- estimators


@register_estimator("rloo")
def rloo(x: EstimatorInputs, cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Faithful masked RLOO (baseline at every turn end) + leave-one-out ``gt`` at the last turn end."""
    r = _masked_rloo_turns(x.turn_rewards, x.seg, x.group_index)
    if x.last_turn_reward is not None:
        y = _last(x)
        r = r + _on_last(y - _loo_baseline(y, x.seg, x.group_index), x)
    return _turn_returns(r, x)


@register_estimator("rloo_once")
def rloo_once(x: EstimatorInputs, cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Deviation: one LOO baseline of the conversation total, subtracted at the last turn end only."""
    t = torch.where(x.seg.valid, x.turn_rewards, 0.0)
    y = _last(x)
    s = t.sum(1) + y
    return _turn_returns(t + _on_last(y - _loo_baseline(s, x.seg, x.group_index), x), x)


@register_estimator("grpo")
def grpo(x: EstimatorInputs, cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Group z-score of the turn-end entries, and separately of the ``gt`` term (see the module docstring)."""
    member = _has_turns(x.seg)
    r = _group_zscore(x.turn_rewards, x.seg.valid, member, x.group_index, cfg.grpo_eps)
    if x.last_turn_reward is not None:
        y = _group_zscore(_last(x)[:, None], member[:, None], member, x.group_index, cfg.grpo_eps)
        r = r + _on_last(y[:, 0], x)
    return _turn_returns(r, x)


def _group_zscore(
    t: torch.Tensor, valid: torch.Tensor, member: torch.Tensor, group_index: torch.Tensor, eps: float
) -> torch.Tensor:
    """``(T − μ_G) / (σ_G + ε)`` on ``valid`` entries of ``t [B, K]``; μ, σ (unbiased) pooled over the group's
    valid entries. Groups with fewer than two ``member`` rows use ``μ = 0, σ = 1``."""
    t = torch.where(valid, t, 0.0)
    rows = _group_count(member, group_index, t.dtype)
    count = _group_totals(valid.sum(1).to(t.dtype), member, group_index)
    mu = _group_totals(t.sum(1), member, group_index) / count.clamp_min(1)
    dev = torch.where(valid, t - mu[:, None], 0.0)
    var = _group_totals((dev * dev).sum(1), member, group_index) / (count - 1).clamp_min(1)
    single = rows < 2
    mu, sigma = torch.where(single, 0.0, mu), torch.where(single, 1.0, var.sqrt())
    return torch.where(valid, (t - mu[:, None]) / (sigma + eps)[:, None], 0.0)


@register_estimator("ppo", needs_critic=True)
def ppo(x: EstimatorInputs, cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over assistant tokens only (user turns skipped); returns ``A + V``."""
    if x.values is None:
        raise ValueError("estimator 'ppo' needs values [B, L] from a critic")
    seg, dtype = x.seg, x.turn_rewards.dtype
    r_tok = turns_to_tokens(x.turn_rewards, seg) + turns_to_tokens(_on_last(_last(x), x), seg)
    r_tok = r_tok * turn_end_mask(x.assistant_mask).to(dtype)
    rows, cols = _compact_index(seg)
    width = int(seg.lengths.sum(1).max()) if seg.positions.numel() else 0
    r_c = _compact(r_tok, seg, rows, cols, width)
    v_c = _compact(x.values.to(dtype), seg, rows, cols, width)
    v_next = torch.nn.functional.pad(v_c[:, 1:], (0, 1))  # padding is 0 = terminal value
    delta = r_c + cfg.gamma * v_next - v_c
    adv_c = discounted_suffix_sum(delta, cfg.gamma * cfg.lam, cfg.gae_chunk)
    adv = _expand(adv_c, seg, rows, cols)
    return adv, adv + _expand(v_c, seg, rows, cols)


# ---------------------------------------------------------------------------------------- GAE machinery


def _compact_index(seg: TurnSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and rank (0-based among the row's assistant tokens) of every assistant token, each ``[N]``."""
    rows = torch.div(seg.positions, seg.n_cols, rounding_mode="floor")
    starts = torch.cumsum(seg.lengths.sum(1), 0) - seg.lengths.sum(1)  # first flat index of each row
    cols = torch.arange(seg.positions.numel(), device=rows.device) - starts.index_select(0, rows)
    return rows, cols


def _compact(
    v: torch.Tensor, seg: TurnSegments, rows: torch.Tensor, cols: torch.Tensor, width: int
) -> torch.Tensor:
    """Left-aligned ``[B, width]`` of the assistant tokens of ``v [B, L]`` (user tokens removed, 0 padding)."""
    out = v.new_zeros(seg.shape[0], width)
    return out.index_put_((rows, cols), v.reshape(-1).index_select(0, seg.positions))


def _expand(c: torch.Tensor, seg: TurnSegments, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_compact`: ``[B, L]`` with 0 off the assistant mask."""
    out = c.new_zeros(seg.shape[0] * seg.n_cols)
    return out.index_put_((seg.positions,), c[rows, cols]).view(seg.shape[0], seg.n_cols)


def discounted_suffix_sum(x: torch.Tensor, w: float, chunk: int = 128) -> torch.Tensor:
    """``out[:, t] = Σ_{u ≥ t} w^{u−t} x[:, u]`` for ``x [B, N]`` (the GAE recursion ``a_t = x_t + w a_{t+1}``).

    ``w == 1`` is a plain suffix sum. Otherwise blocks of ``chunk`` tokens are solved at once with a
    ``[chunk, chunk]`` Toeplitz matmul and the blocks are chained right to left (``N / chunk`` steps), so no
    ``w^{-t}`` rescaling (which overflows on long rows) is ever needed.
    """
    if w == 1.0:
        return suffix_sum(x, dim=1)
    b, n = x.shape
    n_blocks = -(-n // chunk)
    xp = torch.nn.functional.pad(x, (0, n_blocks * chunk - n)).view(b, n_blocks, chunk)
    idx = torch.arange(chunk, device=x.device)
    power = (idx[:, None] - idx[None, :]).to(x.dtype)  # [u, t] = u − t
    toeplitz = torch.where(power >= 0, torch.pow(torch.as_tensor(w, dtype=x.dtype), power.clamp_min(0)), 0.0)
    local = xp @ toeplitz  # [B, n_blocks, chunk]: within-block suffix sums
    carry_w = torch.pow(torch.as_tensor(w, dtype=x.dtype), (chunk - idx).to(x.dtype))  # w^{chunk − t}
    out = torch.empty_like(local)
    nxt = x.new_zeros(b)
    for j in range(n_blocks - 1, -1, -1):
        out[:, j] = local[:, j] + carry_w[None, :] * nxt[:, None]
        nxt = out[:, j, 0]
    return out.view(b, -1)[:, :n]


# ------------------------------------------------------------------------------------------- whitening


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x − μ) / sqrt(var + eps)`` over ``mask`` (token-weighted, unbiased var), 0 off the mask; ``[B, L]``.

    No masked entry gives zeros; one masked entry gives variance 0. Off-mask values (even NaN) are not read.
    """
    m = mask.bool()
    xm = torch.where(m, x, 0.0)
    count = m.sum().to(x.dtype)
    mean = xm.sum() / count.clamp_min(1)
    dev = torch.where(m, x - mean, 0.0)
    var = (dev * dev).sum() / (count - 1).clamp_min(1)
    return dev * torch.rsqrt(var + eps)
