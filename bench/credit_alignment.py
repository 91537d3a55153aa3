"""Credit alignment on simulated logs: do implicit turn rewards agree with the oracle's turn utility?

For each task: simulate ``--n`` conversations with the scripted policy (skill ``--skill``), warm-start
the tiny model on them (SFT), score the same logs with that model (implicit PRM + turn Q-model, as
``itpo-batch score`` does) and report Spearman and AUROC of every credit signal against the oracle
utility per task, with the PRM and Q diagnostics. Prints one JSON object.
Example: python bench/credit_alignment.py --tasks medical,math,docwrite --n 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from itpo_batch.credit.prm import PRMConfig
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.credit.score import ScoreConfig, run_score
from itpo_batch.data.validate import read_logs
from itpo_batch.model.sft import SFTConfig, train_sft
from itpo_batch.sim.envs.base import load_task
from itpo_batch.sim.rollout import RolloutConfig, ScriptedPolicy, rollout

KEEP = ("prm/loss", "prm/pair_acc", "prm/sign_acc", "prm/holdout/pair_acc", "prm/holdout/loss", "q/holdout_mse",
        "q/baseline_holdout_mse", "q/holdout_spearman")  # fmt: skip


def run_task(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    task = load_task(name)
    logs_path = tmp / f"{name}.parquet"
    cfg = RolloutConfig(n=args.n, group_size=8, seed=args.seed, skill=args.skill)
    pq.write_table(rollout(task, ScriptedPolicy(task, args.skill), cfg, progress=False), logs_path)
    logs = read_logs([logs_path])
    t0 = time.perf_counter()
    policy = tmp / f"{name}-policy"
    train_sft(logs, SFTConfig(epochs=args.sft_epochs, seed=args.seed), policy)
    t1 = time.perf_counter()
    score_cfg = ScoreConfig(
        model=str(policy),
        prm=PRMConfig(beta=args.beta, epochs=args.prm_epochs, shuffle=True),
        q=QConfig(epochs=args.q_epochs),
        seed=args.seed,
    )
    result = run_score(logs, score_cfg, tmp / f"{name}-run")
    t2 = time.perf_counter()
    align = {f"{r['signal']}": {"spearman": r["spearman"], "auroc": r["auroc"], "turns": r["turns"], "useful": r["useful"]}
             for r in result.alignment.iter_rows(named=True)}  # fmt: skip
    diag = {k: result.metrics.get(k) for k in KEEP}
    return {
        "alignment": align,
        "diagnostics": diag,
        "sft_seconds": round(t1 - t0, 1),
        "score_seconds": round(t2 - t1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="medical,math,docwrite")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--skill", type=float, default=0.5)
    ap.add_argument("--sft-epochs", type=int, default=8)
    ap.add_argument("--prm-epochs", type=int, default=3)
    ap.add_argument("--q-epochs", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = {name: run_task(name, args, Path(d)) for name in args.tasks.split(",")}
    print(json.dumps({"bench": "credit_alignment", **vars(args), "tasks": result}, indent=2))


if __name__ == "__main__":
    main()
