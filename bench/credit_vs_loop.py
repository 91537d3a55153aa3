"""Vectorised turn credit (itpo_batch.credit.turns) vs the plain-loop reference (tests/credit_reference.py).

Workload per call, identical on both sides, on a right-padded batch of B rows × L columns with 0-8
assistant turns per row (valid lengths L/4..L, the rest padding, two rows without any assistant turn):
  1. ``batch_norm``: token rewards / (max |suffix sum| + 1e-6);
  2. per-turn lengths, sums (ITPO), means, Norm-ITPO rewards (τ = 0.4), length shares;
  3. Norm-ITPO turn rewards broadcast back to the tokens.
The loop times exclude the tensor → list conversion (reported separately), which favours the loop.
Ratios from wall-clock medians, from best times, and from medians of this process's CPU time
(``time.process_time``: robust to other processes taking the core, which inflates the wall-clock median
of millisecond calls far more than that of the half-second loop).
Same process, same inputs; prints one JSON object. Example: python bench/credit_vs_loop.py --rows 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itpo_batch.credit import turns as C
from tests import credit_reference as ref


def make_batch(rows: int, length: int, max_turns: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(mask bool [B, L], token rewards float32 [B, L] zero off the mask, outcome [B])."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, length), dtype=bool)
    for i in range(2, rows):  # rows 0 and 1 keep no assistant turn (the NaN hazard of the official code)
        valid = int(rng.integers(length // 4, length + 1))
        k = int(rng.integers(1, max_turns + 1))
        bounds = np.sort(rng.choice(np.arange(1, valid + 1), size=2 * k, replace=False))
        for s, e in bounds.reshape(-1, 2):
            mask[i, s:e] = True
    rewards = rng.normal(scale=0.05, size=(rows, length)).astype(np.float32) * mask
    outcome = rng.uniform(0, 1, size=rows).astype(np.float32)
    return torch.from_numpy(mask), torch.from_numpy(rewards), torch.from_numpy(outcome)


def fast(mask: torch.Tensor, rewards: torch.Tensor, outcome: torch.Tensor) -> dict[str, torch.Tensor]:
    normed = C.normalize_token_rewards(rewards)
    tc = C.turn_credit(normed, mask, outcome)
    return {"credit": tc, "tokens": C.turns_to_tokens(tc.itpo_norm_reward, tc.seg)}  # type: ignore[dict-item]


def slow(mask: list, rewards: list, outcome: list) -> dict[str, object]:
    normed = ref.normalize(rewards)
    quantities = ref.all_turn_quantities(normed, mask, outcome, C.DEFAULT_TAU)
    return {"credit": quantities, "tokens": ref.to_tokens(quantities["itpo_norm_reward"], mask)}


def timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """(wall-clock seconds, CPU seconds of this process, last output) of ``repeats`` calls."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu, out


def max_error(fast_out: dict, slow_out: dict) -> float:
    """Largest |fast − loop| over the token-level Norm-ITPO rewards and the per-turn ITPO sums."""
    tokens = np.abs(fast_out["tokens"].numpy() - np.array(slow_out["tokens"])).max()
    tc = fast_out["credit"]
    sums = [r[:n] for r, n in zip(tc.implicit_reward.tolist(), tc.seg.n_turns.tolist(), strict=True)]
    flat_fast = np.array([x for r in sums for x in r])
    flat_slow = np.array([x for r in slow_out["credit"]["implicit_reward"] for x in r])
    return float(max(tokens, np.abs(flat_fast - flat_slow).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=50, help="timed calls of the vectorised path")
    ap.add_argument("--loop-repeats", type=int, default=5, help="timed calls of the loop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: same core budget as the loop)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mask, rewards, outcome = make_batch(args.rows, args.length, args.max_turns, args.seed)
    fast(mask, rewards, outcome)  # warm-up
    fast_times, fast_cpu, fast_out = timed(lambda: fast(mask, rewards, outcome), args.repeats)
    start = time.perf_counter()
    lists = (mask.tolist(), rewards.tolist(), outcome.tolist())
    to_list_s = time.perf_counter() - start
    loop_times, loop_cpu, loop_out = timed(lambda: slow(*lists), args.loop_repeats)
    fast_s, loop_s = statistics.median(fast_times), statistics.median(loop_times)
    seg = fast_out["credit"].seg  # type: ignore[index, union-attr]
    print(
        json.dumps(
            {
                "bench": "credit_vs_loop",
                "rows": args.rows,
                "length": args.length,
                "assistant_tokens": int(mask.sum()),
                "turns": int(seg.n_turns.sum()),
                "max_turns_in_a_row": int(seg.n_turns.max()),
                "vectorised_s_median": round(fast_s, 6),
                "vectorised_s_min": round(min(fast_times), 6),
                "loop_s_median": round(loop_s, 4),
                "loop_s_min": round(min(loop_times), 4),
                "loop_tolist_s": round(to_list_s, 4),
                "speedup_median": round(loop_s / fast_s, 1),
                "speedup_best_times": round(min(loop_times) / min(fast_times), 1),
                "vectorised_cpu_s_median": round(statistics.median(fast_cpu), 6),
                "loop_cpu_s_median": round(statistics.median(loop_cpu), 4),
                "speedup_cpu_time_median": round(
                    statistics.median(loop_cpu) / statistics.median(fast_cpu), 1
                ),
                "max_abs_error": max_error(fast_out, loop_out),  # type: ignore[arg-type]
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
