"""Slow, obviously correct references for :mod:`itpo_batch.credit.turns`: plain Python loops over rows and tokens.

Inputs are nested Python lists (``mask[i][t]`` bool/int, ``values[i][t]`` float), outputs are lists of
per-row lists (per-turn values in turn order, or per-token values). Used by ``tests/test_credit.py`` and by
``bench/credit_vs_loop.py`` (which times them against the vectorised path).
"""

from __future__ import annotations

import math


def turn_ids(mask_row: list) -> list[int]:
    """Turn index per token: a new turn at every 0→1 edge, −1 off the mask."""
    out, turn, prev = [], -1, False
    for m in mask_row:
        if m and not prev:
            turn += 1
        out.append(turn if m else -1)
        prev = bool(m)
    return out


def turn_lengths(mask_row: list) -> list[int]:
    lengths: list[int] = []
    for k in turn_ids(mask_row):
        if k >= 0:
            if k == len(lengths):
                lengths.append(0)
            lengths[k] += 1
    return lengths


def turn_sums(values_row: list, mask_row: list) -> list[float]:
    sums: list[float] = []
    for v, k in zip(values_row, turn_ids(mask_row), strict=True):
        if k >= 0:
            if k == len(sums):
                sums.append(0.0)
            sums[k] += v
    return sums


def turn_means(values_row: list, mask_row: list) -> list[float]:
    return [s / n for s, n in zip(turn_sums(values_row, mask_row), turn_lengths(mask_row), strict=True)]


def mean_turn_length(mask: list) -> float:
    all_lengths = [n for row in mask for n in turn_lengths(row)]
    return sum(all_lengths) / len(all_lengths) if all_lengths else 0.0


def softmax(xs: list[float]) -> list[float]:
    if not xs:
        return []
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def norm_proportions(values: list, mask: list, tau: float, mean_length: float | None = None) -> list:
    n_bar = mean_turn_length(mask) if mean_length is None else mean_length
    return [softmax([m * n_bar / tau for m in turn_means(v, m_)]) for v, m_ in zip(values, mask, strict=True)]


def norm_rewards(values: list, mask: list, outcome: list, tau: float) -> list:
    props = norm_proportions(values, mask, tau)
    return [[o * p for p in row] for o, row in zip(outcome, props, strict=True)]


def length_shares(mask: list) -> list:
    out = []
    for row in mask:
        lengths = turn_lengths(row)
        total = sum(lengths)
        out.append([n / total for n in lengths])
    return out


def suffix_normalizer(values: list, eps: float = 1e-6) -> float:
    peak = 0.0
    for row in values:
        running = 0.0
        for v in reversed(row):
            running += v
            peak = max(peak, abs(running))
    return peak + eps


def normalize(values: list) -> list:
    denom = suffix_normalizer(values)
    return [[v / denom for v in row] for row in values]


def prime_rewards(lp: list, lr: list, mask: list, beta: float, lengths: list | None = None) -> list:
    out = []
    for i in range(len(mask)):
        row = []
        for t in range(len(mask[i])):
            r = beta * (lp[i][t] - lr[i][t]) if mask[i][t] else 0.0
            if lengths is not None and t == lengths[i] - 1:
                r = 0.0
            row.append(r)
        out.append(row)
    return out


def to_tokens(turn_values: list, mask: list, fill: float = 0.0) -> list:
    return [
        [vals[k] if k >= 0 else fill for k in turn_ids(row)]
        for vals, row in zip(turn_values, mask, strict=True)
    ]


def turn_ends(mask_row: list) -> list[bool]:
    n = len(mask_row)
    return [bool(mask_row[t]) and (t == n - 1 or not mask_row[t + 1]) for t in range(n)]


def all_turn_quantities(values: list, mask: list, outcome: list, tau: float) -> dict[str, list]:
    """What :func:`itpo_batch.credit.turns.turn_credit` computes, the slow way (used by the bench)."""
    return {
        "n_tokens": [turn_lengths(row) for row in mask],
        "implicit_reward": [turn_sums(v, m) for v, m in zip(values, mask, strict=True)],
        "implicit_reward_mean": [turn_means(v, m) for v, m in zip(values, mask, strict=True)],
        "itpo_norm_reward": norm_rewards(values, mask, outcome, tau),
        "length_share": length_shares(mask),
    }
