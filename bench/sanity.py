"""The learning sanity check at full length (itpo_batch.run.sanity; tests/test_sanity.py runs the same recipe).

Builds the sanity π_0 once (``OUT/pi0``), then one ``iterate`` run per estimator (``OUT/EST-seedS``; a run that
exists is resumed, so a finished one is only summarised) and prints a markdown table of the sampled /
greedy success by round and the final KL to π_0 per arm, then one JSON object.

    python bench/sanity.py --out runs/sanity --estimators rloo,grpo,ppo --seeds 0,1,2 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from itpo_batch.run.rounds import iterate
from itpo_batch.run.sanity import sanity_iterate_config, sanity_pi0

LOG_ARMS = ["itpo", "itpo_norm", "outcome", "prime"]


def summary(run: Path) -> dict[str, dict[str, list[float]]]:
    """Per method: sampled and greedy success and KL to π_0, by round."""
    out: dict[str, dict[str, list[float]]] = {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in sorted(rows, key=lambda r: (r["method"], r["round"])):
        m = out.setdefault(r["method"], {"sampled": [], "greedy": [], "kl_pi0": []})
        m["sampled"].append(r.get("eval/success"))
        m["greedy"].append(r.get("eval/greedy_success"))
        m["kl_pi0"].append(r.get("policy/kl_pi0"))
    return out


def table(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    lines = ["| run | method | success by round: sampled / greedy | KL to π_0 (last) |", "|---|---|---|---:|"]
    for name, methods in results.items():
        for method, m in methods.items():
            cells = " · ".join(f"{s:.2f}/{g:.2f}" for s, g in zip(m["sampled"], m["greedy"], strict=True))
            lines.append(f"| {name} | {method} | {cells} | {m['kl_pi0'][-1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/sanity"))
    ap.add_argument("--estimators", default="rloo,grpo,ppo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--set", nargs="*", default=[], help="iterate overrides, e.g. update.lr=3e-4")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pi0 = sanity_pi0(args.out)
    results = {}
    for estimator in args.estimators.split(","):
        methods = [*LOG_ARMS, "iterative_ppo"] if estimator == "rloo" else LOG_ARMS  # ippo has its own
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = sanity_iterate_config(
                pi0, methods, args.rounds, seed, [f"method.estimator={estimator}", *args.set]
            )
            run = args.out / f"{estimator}-seed{seed}"
            iterate(cfg, run, resume=run.exists())
            results[run.name] = summary(run)
    print(table(results))
    print(json.dumps({"seconds": time.perf_counter() - t0, "runs": results}))


if __name__ == "__main__":
    main()
