"""Outcome statistics of the scripted behaviour policy on the simulated tasks (round-0 log quality).

For each task and each skill, plays ``--groups`` groups of ``--members`` conversations; the members of
a group share one hidden case (``task.sample_case(episode_rng(seed, g))``) and member ``m`` is driven by
``episode_rng(seed, g, m)`` (the same generator serves the rule-based user and the scripted policy).
Round-0 logs are useful for group-relative credit only if outcomes vary inside groups, so the script
reports, per task and skill:

* ``mean_outcome`` (clip(score + cost)), ``success_rate``, ``mean_turns`` (assistant turns);
* ``mixed_groups``: fraction of groups whose members do not all have the same success;
* ``mean_utility``: mean oracle utility per assistant turn;
* ``seconds``: wall time of that cell.

Tasks that fail to load (e.g. not written yet) are reported as ``{"error": ...}`` and skipped.
Prints one JSON object. Example (from the repo root; prefix PYTHONPATH=. if the package is not installed):
  python bench/tasks_scripted.py --groups 100 --tasks medical,math
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from itpo_batch.sim.envs.base import Task, load_task, play_scripted


def play(task: Task, seed: int, group: int, member: int, skill: float) -> tuple[float, bool, list[float]]:
    """One scripted conversation: (outcome, success, utilities)."""
    ep = play_scripted(task, seed, group, member, skill)
    res = ep.result()
    return res.outcome, res.success, ep.utilities


def stats(task: Task, seed: int, groups: int, members: int, skill: float) -> dict[str, float]:
    t0 = time.perf_counter()
    outcomes, successes, turns, utils, mixed = [], [], [], [], 0
    for g in range(groups):
        group_success = []
        for m in range(members):
            outcome, success, u = play(task, seed, g, m, skill)
            outcomes.append(outcome)
            group_success.append(success)
            turns.append(len(u))
            utils += u
        successes += group_success
        mixed += len(set(group_success)) > 1
    return {
        "mean_outcome": round(float(np.mean(outcomes)), 4),
        "success_rate": round(float(np.mean(successes)), 4),
        "mean_turns": round(float(np.mean(turns)), 3),
        "mixed_groups": round(mixed / groups, 3),
        "mean_utility": round(float(np.mean(utils)), 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="medical,math,docwrite", help="comma-separated task names")
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--skills", default="0.2,0.5,0.8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    skills = [float(s) for s in args.skills.split(",")]
    out: dict[str, Any] = {"groups": args.groups, "members": args.members, "seed": args.seed, "tasks": {}}
    for name in args.tasks.split(","):
        try:
            task = load_task(name)
        except Exception as e:  # a task still being written must not stop the others
            out["tasks"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out["tasks"][name] = {
            str(skill): stats(task, args.seed, args.groups, args.members, skill) for skill in skills
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
