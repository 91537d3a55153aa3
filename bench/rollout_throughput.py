"""Rollout throughput: conversations/s and generated tokens/s of the rollout engine on this machine.

Runs :func:`itpo_batch.sim.rollout.rollout` on a simulated task with
  * the scripted policy (no model: the cost of the environment and the table alone);
  * an HF policy (default: the embedded ``tiny`` model) at each ``--batch-sizes`` value;
  * the naive baseline: the same HF policy one conversation at a time (batch size 1), on fewer
    conversations, measured in the same run, so every batched result carries its speed-up.
Each HF configuration gets one small warm-up rollout first. The untrained tiny model almost never emits
eos, so its turns run to ``--max-new-tokens`` and conversations to the task's turn limit: this is the
worst case for tokens per conversation. On a shared machine prefer ``--threads 1``: OpenMP threads
spin-wait and run 5-40x slower when another process holds one of the cores. Prints one JSON object.

Example: python bench/rollout_throughput.py --task medical --n 64 --batch-sizes 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from itpo_batch.sim.envs.base import Task, load_task
from itpo_batch.sim.rollout import HFPolicy, Policy, RolloutConfig, ScriptedPolicy, rollout


def measure(task: Task, policy: Policy, cfg: RolloutConfig) -> dict[str, Any]:
    """One timed rollout; rates over wall time."""
    start = time.perf_counter()
    table = rollout(task, policy, cfg, progress=False)
    seconds = time.perf_counter() - start
    metas = [json.loads(m) for m in table["metadata"].to_pylist()]
    turns = sum(m["n_turns"] for m in metas)
    tokens = sum(m.get("n_generated_tokens", 0) for m in metas)
    return {
        "policy": policy.name,
        "batch_size": cfg.batch_size,
        "n": cfg.n,
        "seconds": round(seconds, 3),
        "conversations_per_s": round(cfg.n / seconds, 2),
        "assistant_turns_per_s": round(turns / seconds, 2),
        "generated_tokens_per_s": round(tokens / seconds, 1) if tokens else None,
        "mean_turns": round(turns / cfg.n, 2),
        "mean_tokens_per_turn": round(tokens / turns, 1) if tokens else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="medical", help="medical, math, docwrite or module:Class")
    ap.add_argument("--model", default="tiny", help="HF policy: tiny, smollm2 or a model directory")
    ap.add_argument("--n", type=int, default=64, help="conversations per batched HF configuration")
    ap.add_argument("--n-naive", type=int, default=16, help="conversations for the batch-size-1 baseline")
    ap.add_argument("--n-scripted", type=int, default=2048, help="conversations for the scripted policy")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    task = load_task(args.task)
    base = dict(group_size=8, seed=args.seed, max_new_tokens=args.max_new_tokens)
    results = [measure(task, ScriptedPolicy(task), RolloutConfig(n=args.n_scripted, batch_size=256, **base))]
    policy = HFPolicy.from_pretrained(args.model, RolloutConfig(**base))
    runs = [(1, args.n_naive)] + [(b, args.n) for b in args.batch_sizes]
    for batch_size, n in runs:
        rollout(
            task,
            policy,
            RolloutConfig(n=min(n, 2 * batch_size), batch_size=batch_size, **base),
            progress=False,
        )
        results.append(measure(task, policy, RolloutConfig(n=n, batch_size=batch_size, **base)))
    naive = results[1]
    for r in results[2:]:
        r["speedup_vs_batch1"] = round(r["conversations_per_s"] / naive["conversations_per_s"], 2)
    report = {
        "bench": "rollout_throughput",
        "task": args.task,
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
