"""Peak RSS of ``itpo-batch score`` for 1k vs 10k conversations, against the memory budget.

Simulates the logs with the scripted policy (``--task clarify`` by default: the shortest task, ~40 tokens
and 1.5 assistant turns per conversation with the tiny model, so 10k conversations score in ~5 minutes
on one CPU core), runs ``python -m itpo_batch score`` once per size in its own process (peak RSS from
``os.wait4``'s rusage of that child alone) with one PRM and one Q epoch, and computes the budget of
:mod:`itpo_batch.credit.memory` for the same rendered logs. Prints one JSON object: per size the peak,
the budget and their ratio; ``ratio_largest_smallest`` (target ≤ 1.3) and the measured growth per
conversation. ``--smollm2 N`` adds one run on SmolLM2-135M with N conversations (needs the ``smol`` extra).

Example: python bench/memory_score.py --sizes 1000 10000            (about 7 minutes on this machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def simulate(task: str, n: int, path: Path) -> None:
    cmd = [sys.executable, "-m", "itpo_batch", "simulate", "--task", task, "--n", str(n)]
    subprocess.run([*cmd, "--policy", "scripted", "-o", str(path)], check=True, capture_output=True)


def score_peak(logs: Path, model: str, out: Path, epochs: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``score`` run in a child process."""
    cmd = [sys.executable, "-m", "itpo_batch", "score", str(logs), "--model", model, "-o", str(out)]
    cmd += ["--prm-epochs", str(epochs), "--q-epochs", str(epochs)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"score failed on {logs} ({proc.returncode}):\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def budget(logs: Path, model: str) -> dict[str, int]:
    from itpo_batch.credit.memory import dataset_size, model_shape, score_budget
    from itpo_batch.credit.score import ScoreConfig
    from itpo_batch.data.validate import read_logs

    cfg = ScoreConfig(model=model)
    data = dataset_size(read_logs([logs]), model, cfg.prm)
    return {**score_budget(model_shape(model), data, cfg.prm, cfg.q).as_dict(), "tokens": data.tokens}


def measure(task: str, n: int, model: str, epochs: int, tmp: Path) -> dict:
    logs = tmp / f"{task}-{n}.parquet"
    simulate(task, n, logs)
    peak, seconds = score_peak(logs, model, tmp / f"run-{model}-{n}", epochs)
    b = budget(logs, model)
    return {
        "model": model, "conversations": n, "tokens": b["tokens"], "peak_rss_mib": round(peak, 1),
        "seconds": round(seconds, 1), "budget_mib": round(b["total"] / MIB, 1),
        "measured_over_budget": round(peak * MIB / b["total"], 3),
        "budget_parts_mib": {k: round(v / MIB, 1) for k, v in b.items() if k not in ("total", "tokens")},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="clarify")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--epochs", type=int, default=1, help="--prm-epochs and --q-epochs of each score run")
    ap.add_argument("--smollm2", type=int, default=0, help="also score N with SmolLM2 (0: no)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        runs = [measure(args.task, n, args.model, args.epochs, Path(d)) for n in sorted(args.sizes)]
        small, large = runs[0], runs[-1]
        extra = large["conversations"] - small["conversations"]
        result = {
            "task": args.task, "runs": runs,
            "ratio_largest_smallest": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "target_ratio": 1.3,
            "growth_bytes_per_conversation": round((large["peak_rss_mib"] - small["peak_rss_mib"]) * MIB / max(extra, 1)),
            "budget_growth_bytes_per_conversation": round((large["budget_mib"] - small["budget_mib"]) * MIB / max(extra, 1)),
        }  # fmt: skip
        if args.smollm2:
            try:
                import gguf  # noqa: F401  # the smol extra
            except ImportError:
                result["smollm2"] = "skipped: the smol extra is not installed"
            else:
                result["smollm2"] = measure(args.task, args.smollm2, "smollm2", args.epochs, Path(d))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
