"""The docs/results.md experiment: tasks × methods × seeds × rounds of ``iterate`` from one SFT π_0 per task.

Per task: simulate scripted logs (skill ``--pi0-skill``, 0.8), SFT the tiny π_0 on the better half of them
(outcome ≥ the median: filtered imitation, one rule for every task; ``--pi0-all``: on all of them, so that π_0
imitates a weaker policy and leaves room to improve, the medical setting of docs/results.md), then ``iterate``
the quickstart's settings at the sizes of ``SIZES`` (twice the quickstart's conversations per round, four
times its evaluation cases) for each seed (the seed changes the rounds' cases, user noise, sampling and
shuffles; π_0 is shared by the seeds of a task, so the spread across seeds is that of the RL loop itself).
Each seed also evaluates on its own cases and sampling draws (``eval.seed`` = 10000 + seed): with one shared
evaluation draw, π_0's round-0 score would be a single realisation common to every seed, and the t-interval
across seeds would not see its noise (a lucky π_0 draw would bias every Δ by the same amount). Every stage
resumes: rerunning the same command continues where it stopped. Prints JSON (improvement over π_0 per task and
method, t-interval across seeds) and writes ``report.md`` + PNGs per task (``OUT/TASK/report/``) and for all
tasks together (``OUT/report/``): folders of their own, since ``report`` never writes into a folder it did not
create.

    python bench/experiment.py --out runs/experiment --tasks medical,math,docwrite --seeds 0,1,2 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from itpo_batch.core.config import apply_overrides, from_mapping, to_mapping
from itpo_batch.data.validate import read_logs
from itpo_batch.model.sft import SFTConfig
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.pi0 import ScriptedPi0, scripted_logs, scripted_pi0
from itpo_batch.run.quickstart import quickstart_iterate_config
from itpo_batch.run.report import Report, write_report
from itpo_batch.run.rounds import iterate

SIZES = ["n=32", "ippo.max_states=32", "eval.n=64"]
"Per round: 32 conversations (4 cases × 8) and 32 Iterative-PPO states per arm; 64 evaluation cases."


def make_pi0(task_name: str, out: Path, n_logs: int, epochs: int, settings: dict | None = None,
             skill: float = 0.8, filtered: bool = True) -> Path:  # fmt: skip
    """Scripted logs at ``skill`` → SFT (``filtered``: only on those with outcome ≥ their median, i.e.
    filtered imitation; else on all: plain imitation of a weaker policy, which leaves room to improve);
    cached in ``out``."""
    recipe = ScriptedPi0(
        task_name, n_logs, skill, SFTConfig(epochs=epochs, batch_tokens=1024), settings or {}
    )
    logs_path = scripted_logs(recipe, out / "scripted.parquet")
    if filtered:
        threshold = float(np.median(read_logs([logs_path]).conversations["outcome"].to_numpy()))
        recipe = dataclasses.replace(recipe, sft=dataclasses.replace(recipe.sft, min_outcome=threshold))
    return scripted_pi0(recipe, logs_path, out / "pi0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/experiment"))
    ap.add_argument("--tasks", default="medical,math,docwrite")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-logs", type=int, default=3072, help="scripted conversations for the SFT of π_0")
    ap.add_argument("--sft-epochs", type=int, default=4)
    ap.add_argument("--pi0-skill", type=float, default=0.8, help="skill of the scripted policy π_0 imitates")
    ap.add_argument("--pi0-all", action="store_true",
                    help="SFT π_0 on all scripted logs (default: on those with outcome ≥ the median)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task-settings", type=json.loads, default={},
                    help='task settings (JSON) for the scripted logs and the rounds, e.g. {"n_diseases": 8}')  # fmt: skip
    ap.add_argument(
        "--set", nargs="*", default=[], help="iterate config overrides after SIZES, e.g. n=128 update.lr=3e-4"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0, runs_by_task = time.perf_counter(), {}
    for task in args.tasks.split(","):
        pi0 = make_pi0(task, args.out / task, args.n_logs, args.sft_epochs, args.task_settings, args.pi0_skill,
                       not args.pi0_all)  # fmt: skip
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            base = to_mapping(dataclasses.replace(quickstart_iterate_config(seed), task=task, model=str(pi0)))
            base["rounds"], base["task_settings"] = args.rounds, args.task_settings
            base["eval"]["seed"] += seed  # each seed its own evaluation draw, π_0's included (docstring)
            cfg = from_mapping(IterateConfig, apply_overrides(base, SIZES + args.set))
            run_dir = args.out / task / f"seed{seed}"
            print(f"[{time.perf_counter() - t0:7.0f}s] {task} seed {seed}", flush=True)
            runs.append(iterate(cfg, run_dir, resume=run_dir.exists()).path)
        write_report(runs, args.out / task / "report")
        runs_by_task[task] = runs
    all_runs = [r for runs in runs_by_task.values() for r in runs]
    write_report(all_runs, args.out / "report")
    imp = Report.load(all_runs).improvement
    result = {"seconds": time.perf_counter() - t0, "runs": [str(r) for r in all_runs],
              "improvement": imp.to_dicts()}  # fmt: skip
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
