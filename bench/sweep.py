"""Step-size sweep (issue 15, docs/results.md "Step-size sweep"): lr × optimiser steps per round × conversations
per round, one seed, from the experiment's π_0, showing where each arm learns and where it collapses.

Each cell is one ``iterate`` run (``OUT/lr{lr}_ep{epochs}_n{n}``; rerunning resumes) of the given methods
from the same π_0 (``bench/experiment.py``'s recipe, cached in ``OUT/pi0``). Optimiser steps per round =
epochs × ceil(n / mini_batch); mini-batches stay at 16 conversations, so a larger n also means more steps.
Prints one JSON object: per cell and method, the final-round change of the greedy and sampled outcome
over π_0 (per-case paired, 95% CI), the KL to π_0 after the last round and whether the arm *collapsed*
(KL above 1 nat per token, or greedy outcome falling by more than 0.05 with its CI below zero).

    python bench/sweep.py --out runs/sweep --task medical --task-settings '{"n_diseases": 8, "distinctiveness": 1.5}' \\
        --lrs 1e-4,3e-4 --epochs 1,4 --ns 32,128 --methods itpo_norm,outcome --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch
from experiment import make_pi0

from itpo_batch.core.config import apply_overrides, from_mapping, to_mapping
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.quickstart import quickstart_iterate_config
from itpo_batch.run.report import write_report
from itpo_batch.run.rounds import iterate


def cell_result(run: Path, methods: list[str]) -> dict[str, dict[str, float | bool | None]]:
    """Final-round deltas, KL and the collapse flag of each method of one cell's run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["round"])
        last = mine[-1]
        kl = last.get("policy/kl_pi0")
        g, g_hi = last.get("eval/greedy_outcome_delta_pi0"), last.get("eval/greedy_outcome_delta_pi0_ci_high")
        out[m] = {
            "rounds": last["round"],
            "greedy_delta": g,
            "greedy_ci": [last.get("eval/greedy_outcome_delta_pi0_ci_low"), g_hi],
            "sampled_delta": last.get("eval/outcome_delta_pi0"),
            "sampled_ci": [
                last.get("eval/outcome_delta_pi0_ci_low"),
                last.get("eval/outcome_delta_pi0_ci_high"),
            ],
            "kl_pi0": kl,
            "collapsed": bool((kl is not None and kl > 1.0) or (g is not None and g < -0.05 and g_hi < 0)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--task", default="medical")
    ap.add_argument("--task-settings", type=json.loads, default={})
    ap.add_argument("--lrs", default="1e-4,3e-4")
    ap.add_argument("--epochs", default="1,4", help="update epochs per round (steps = epochs × n/16)")
    ap.add_argument("--ns", default="32,128", help="conversations per round")
    ap.add_argument("--methods", default="itpo_norm,outcome")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-logs", type=int, default=3072)
    ap.add_argument("--pi0", type=Path, default=None, help="an existing π_0 (default: build it in OUT/pi0)")
    ap.add_argument("--set", nargs="*", default=[], help="more iterate overrides for every cell")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    pi0 = args.pi0 or make_pi0(args.task, args.out, args.n_logs, 4, args.task_settings)
    t0, cells, runs = time.perf_counter(), {}, []
    grid = itertools.product(args.lrs.split(","), args.epochs.split(","), args.ns.split(","))
    for lr, epochs, n in grid:
        name = f"lr{lr}_ep{epochs}_n{n}"
        base = to_mapping(
            dataclasses.replace(quickstart_iterate_config(args.seed), task=args.task, model=str(pi0))
        )
        base |= {"rounds": args.rounds, "methods": methods, "task_settings": args.task_settings}
        sets = [f"update.lr={lr}", f"update.epochs={epochs}", f"n={n}", f"ippo.max_states={n}",
                f"ippo.update.lr={lr}", f"ippo.update.epochs={epochs}", "eval.n=128", *args.set]  # fmt: skip
        cfg = from_mapping(IterateConfig, apply_overrides(base, sets))
        run = args.out / name
        print(f"[{time.perf_counter() - t0:7.0f}s] {name}", flush=True)
        runs.append(iterate(cfg, run, resume=run.exists()).path)
        cells[name] = cell_result(run, methods) | {"steps_per_round": int(epochs) * -(-int(n) // 16)}
    write_report(runs, args.out / "report")
    print(json.dumps({"seconds": time.perf_counter() - t0, "pi0": str(pi0), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
