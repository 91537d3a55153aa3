"""How well does the SFT'ed tiny model imitate the scripted behaviour policy?

For each task: simulate ``--n`` scripted conversations (skill ``--skill``), fine-tune the embedded tiny
model on them (``itpo_batch.model.sft``), then play ``--n-eval`` conversations with the fine-tuned model
(sampling at temperature 1, and greedy) and compare success rates and outcome means with the scripted
policy's on the same number of fresh cases (another seed). Prints one JSON object.
``--train-skill`` and ``--min-outcome`` make the SFT logs come from another skill and keep only the
conversations at or above an outcome (filtered imitation). Example:
  python bench/sft_vs_scripted.py --tasks medical --n 512 --n-eval 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from itpo_batch.data.validate import read_logs
from itpo_batch.model.sft import SFTConfig, train_sft
from itpo_batch.sim.envs.base import load_task
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, ScriptedPolicy, rollout


def stats(table) -> dict[str, float]:
    meta = pl.Series([json.loads(m) for m in table.column("metadata").to_pylist()])
    df = pl.DataFrame({"outcome": table.column("outcome").to_numpy(), "meta": meta})
    succ = df["meta"].struct.field("success").cast(pl.Float64)
    turns = df["meta"].struct.field("n_turns").cast(pl.Float64)
    return {"success": round(float(succ.mean()), 4), "outcome": round(float(df["outcome"].mean()), 4),
            "turns": round(float(turns.mean()), 3)}  # fmt: skip


def run_task(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    task = load_task(name)
    skill = args.train_skill if args.train_skill is not None else args.skill
    train_cfg = RolloutConfig(n=args.n, group_size=8, seed=args.seed, skill=skill)
    logs_path = tmp / f"{name}.parquet"
    pq.write_table(rollout(task, ScriptedPolicy(task, skill), train_cfg, progress=False), logs_path)
    t0 = time.perf_counter()
    sft_cfg = SFTConfig(epochs=args.epochs, seed=args.seed, min_outcome=args.min_outcome)
    metrics = train_sft(read_logs([logs_path]), sft_cfg, tmp / f"{name}-policy")
    sft_seconds = time.perf_counter() - t0
    out = {"sft_seconds": round(sft_seconds, 1), "sft_final_loss": round(metrics[-1]["sft/loss"], 4)}
    eval_seed = args.seed + 1000
    scripted = rollout(
        task,
        ScriptedPolicy(task, args.skill),
        RolloutConfig(n=args.n_eval, seed=eval_seed, skill=args.skill),
        progress=False,
    )
    out["scripted"] = stats(scripted)
    for label, temp in (("sft_sampled", 1.0), ("sft_greedy", 0.0)):
        cfg = RolloutConfig(
            n=args.n_eval, seed=eval_seed, temperature=temp, max_new_tokens=args.max_new_tokens, batch_size=64
        )
        t0 = time.perf_counter()
        table = rollout(task, HFPolicy.from_pretrained(str(tmp / f"{name}-policy"), cfg), cfg, progress=False)
        out[label] = {**stats(table), "seconds": round(time.perf_counter() - t0, 1)}
        out[label]["success_vs_scripted"] = round(
            out[label]["success"] / max(out["scripted"]["success"], 1e-9), 3
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="medical,math,docwrite")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--skill", type=float, default=0.5, help="scripted policy compared against")
    ap.add_argument(
        "--train-skill", type=float, default=None, help="skill of the SFT logs (default: --skill)"
    )
    ap.add_argument("--min-outcome", type=float, default=None, help="filtered imitation threshold")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = {name: run_task(name, args, Path(d)) for name in args.tasks.split(",")}
    print(json.dumps({"bench": "sft_vs_scripted", **vars(args), "tasks": result}, indent=2))


if __name__ == "__main__":
    main()
