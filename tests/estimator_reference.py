"""Slow, obviously correct references for :mod:`itpo_batch.rl.estimators`: plain Python loops over rows and tokens.

Written from docs/method.md §4.2–4.6, on the *token* layout the official code uses (rewards placed
on the turn-end tokens, the official ``masked_rloo`` over the turn-end positions, returns as a reverse
cumulative sum over the whole row times the mask), not on the turn grid of the fast path. Inputs are Python
lists: ``mask[i][t]`` (0/1), ``turns[i]`` (the row's turn rewards, one per assistant turn), ``last[i]``
(the ``gt`` component), ``groups[i]`` (any hashable id), ``values[i][t]``. Outputs are ``[B][L]`` lists.

Shared conventions with the fast path (stated in its module docstring): rows without assistant turns are
left out of their group and get zeros; a group with a single row that has turns uses a baseline of 0
(GRPO: μ = 0, σ = 1).
"""

from __future__ import annotations

import math

from tests.credit_reference import turn_ends, turn_ids


def _members(groups: list, mask: list) -> dict:
    """Group id -> list of row indices with at least one assistant token (in row order)."""
    out: dict = {}
    for i, g in enumerate(groups):
        if any(mask[i]):
            out.setdefault(g, []).append(i)
    return out


def place_at_turn_ends(turns: list, mask: list) -> tuple[list, list]:
    """Token tensor ``Z`` with turn k's reward on turn k's last token, and the position mask ``Ω``."""
    z, omega = [], []
    for vals, row in zip(turns, mask, strict=True):
        ends, ids = turn_ends(row), turn_ids(row)
        z.append([vals[ids[t]] if ends[t] else 0.0 for t in range(len(row))])
        omega.append(ends)
    return z, omega


def masked_rloo(z: list, omega: list, groups: list, mask: list) -> list:
    """The official ``masked_rloo`` (docs/method.md §4.2): ``(n Z − Σ_G m) / (n − 1)`` on Ω, 0 elsewhere."""
    out = [[0.0] * len(row) for row in z]
    for rows in _members(groups, mask).values():
        n = len(rows)
        means = {}
        for i in rows:
            picked = [z[i][t] for t in range(len(z[i])) if omega[i][t]]
            means[i] = sum(picked) / len(picked)
        total = sum(means.values())
        for i in rows:
            for t in range(len(z[i])):
                if omega[i][t]:
                    out[i][t] = (n * z[i][t] - total) / (n - 1) if n > 1 else z[i][t]
    return out


def last_turn_end_mask(mask: list) -> list:
    out = []
    for row in mask:
        ends = turn_ends(row)
        last = max((t for t in range(len(row)) if ends[t]), default=-1)
        out.append([t == last for t in range(len(row))])
    return out


def token_returns(r: list, mask: list) -> list:
    """``G_t = Σ_{t' ≥ t} R_t' M_t'`` over the whole row, then multiplied by the mask (user tokens: 0)."""
    out = []
    for rr, row in zip(r, mask, strict=True):
        running, g = 0.0, [0.0] * len(row)
        for t in range(len(row) - 1, -1, -1):
            running += rr[t] * row[t]
            g[t] = running if row[t] else 0.0
        out.append(g)
    return out


def rloo(turns: list, last: list | None, groups: list, mask: list) -> list:
    """Faithful: RLOO of the every-turn-end rewards + LOO of ``gt`` at the last turn end; returns ``G``."""
    z, omega = place_at_turn_ends(turns, mask)
    r = masked_rloo(z, omega, groups, mask)
    if last is not None:
        lm = last_turn_end_mask(mask)
        gz = [[last[i] if lm[i][t] else 0.0 for t in range(len(lm[i]))] for i in range(len(lm))]
        g_r = masked_rloo(gz, lm, groups, mask)
        r = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(r, g_r, strict=True)]
    return token_returns(r, mask)


def _totals(turns: list, last: list | None) -> list[float]:
    return [sum(t) + (last[i] if last is not None else 0.0) for i, t in enumerate(turns)]


def rloo_once(turns: list, last: list | None, groups: list, mask: list) -> list:
    """Deviation: ``b_i = mean_{j≠i} s_j`` subtracted once at the last turn end."""
    s = _totals(turns, last)
    new_turns = [list(t) for t in turns]
    for rows in _members(groups, mask).values():
        for i in rows:
            others = [s[j] for j in rows if j != i]
            baseline = sum(others) / len(others) if others else 0.0
            new_turns[i][-1] += (last[i] if last is not None else 0.0) - baseline
    z, _ = place_at_turn_ends(new_turns, mask)
    return token_returns(z, mask)


def _zscore(entries: dict, groups: list, mask: list, eps: float) -> dict:
    """``entries[i]`` = list of row i's values; each becomes (v − μ_G) / (σ_G + ε), stats pooled over entries."""
    out = {}
    for rows in _members(groups, mask).values():
        pool = [v for i in rows for v in entries[i]]
        if len(rows) > 1:
            mu = sum(pool) / len(pool)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in pool) / max(len(pool) - 1, 1))
        else:
            mu, sigma = 0.0, 1.0
        for i in rows:
            out[i] = [(v - mu) / (sigma + eps) for v in entries[i]]
    return out


def grpo(turns: list, last: list | None, groups: list, mask: list, eps: float = 1e-6) -> list:
    """Group z-score of the turn-end entries (pooled), plus the z-scored ``gt`` term at the last turn end."""
    z_turns = _zscore(dict(enumerate(turns)), groups, mask, eps)
    new_turns = [z_turns.get(i, list(t)) for i, t in enumerate(turns)]
    if last is not None:
        z_last = _zscore({i: [v] for i, v in enumerate(last)}, groups, mask, eps)
        for i, z in z_last.items():
            new_turns[i][-1] += z[0]
    z, _ = place_at_turn_ends(new_turns, mask)
    return token_returns(z, mask)


def gae(turns: list, last: list | None, mask: list, values: list, gamma: float, lam: float) -> tuple:
    """GAE backwards over each row, skipping non-assistant tokens; returns ``(advantages, A + V)``."""
    z, _ = place_at_turn_ends(turns, mask)
    lm = last_turn_end_mask(mask)
    advs, rets = [], []
    for i, row in enumerate(mask):
        adv, ret = [0.0] * len(row), [0.0] * len(row)
        next_v, next_a = 0.0, 0.0
        for t in range(len(row) - 1, -1, -1):
            if not row[t]:
                continue  # user/template token: part of the environment transition
            r = z[i][t] + (last[i] if last is not None and lm[i][t] else 0.0)
            delta = r + gamma * next_v - values[i][t]
            adv[t] = delta + gamma * lam * next_a
            ret[t] = adv[t] + values[i][t]
            next_v, next_a = values[i][t], adv[t]
        advs.append(adv)
        rets.append(ret)
    return advs, rets


def whiten(x: list, mask: list, eps: float = 1e-8) -> list:
    picked = [x[i][t] for i in range(len(x)) for t in range(len(x[i])) if mask[i][t]]
    if not picked:
        return [[0.0] * len(row) for row in x]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / max(len(picked) - 1, 1)
    return [
        [(x[i][t] - mean) / math.sqrt(var + eps) if mask[i][t] else 0.0 for t in range(len(x[i]))]
        for i in range(len(x))
    ]
