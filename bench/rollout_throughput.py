"""Rollout throughput: the rollout engine against ``model.generate``, same model, same process.

Two comparisons, each sampled (temperature 1) and greedy, ``--batch-size`` rows (default 32):

* ``rollout``: :func:`itpo_batch.sim.rollout.rollout` of ``--n`` conversations of a task, once with the
  product's :class:`~itpo_batch.sim.rollout.HFPolicy` (the engine: each conversation's KV cache kept across
  turns, finished rows leave the batch) and once with the naive baseline, a policy that calls
  ``model.generate`` (:func:`itpo_batch.model.generation.generate`) on the re-rendered conversations every
  turn, as the product did before. Same task cases, users and seeds; greedy rollouts are the same
  conversations token for token (``tests/test_engine.py``), sampled ones draw other tokens. Generated
  tokens per second of the whole rollout (environment and table included). This is
  ``speedup_vs_hf_generate``.
* ``per_call``: one call on the same ``--batch-size`` prompts (assistant-turn states of scripted
  conversations of the task, all turns mixed), engine against ``model.generate``; ``per_call_opening``:
  the same with opening states only (short prompts: attention over the cache costs least).

Repeats are interleaved (old, new, old, new, ...) and each figure is the minimum over repeats of the
process CPU time (one thread: CPU time is what the work costs, whatever else runs on the machine) and,
for reference, of the wall time. The untrained tiny model rarely emits eos, so replies mostly run to
``--max-new-tokens``. Prints one JSON object.

Example: python bench/rollout_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from itpo_batch.model import generation as hf
from itpo_batch.model.engine import RolloutEngine
from itpo_batch.model.generation import Generation, SamplingConfig
from itpo_batch.sim.envs.base import Episode, Task, load_task
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, ScriptedPolicy, collect, rollout


class GeneratePolicy(HFPolicy):
    """The naive baseline: ``model.generate`` on the re-rendered conversations, one call per turn."""

    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        return hf.generate(self.model, self.tokenizer, [e.messages for e in episodes], self.sampling, seed)


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """``(cpu seconds, wall seconds, generated tokens)`` of one call of ``fn`` (which returns tokens)."""
    cpu, wall = time.process_time(), time.perf_counter()
    tokens = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, tokens


def compare(old: Callable[[], int], new: Callable[[], int], repeats: int) -> dict[str, Any]:
    """Interleaved repeats; rates from the minimum CPU and wall time of each path."""
    runs: dict[str, list[tuple[float, float, int]]] = {"hf_generate": [], "engine": []}
    for _ in range(repeats):
        runs["hf_generate"].append(timed(old))
        runs["engine"].append(timed(new))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        tokens = rs[0][2]
        out[name] = {
            "generated_tokens": tokens,
            "tokens_per_cpu_s": round(tokens / min(r[0] for r in rs), 1),
            "tokens_per_wall_s": round(tokens / min(r[1] for r in rs), 1),
        }
    for clock in ("cpu", "wall"):
        key = f"tokens_per_{clock}_s"
        out[f"speedup_{clock}"] = round(out["engine"][key] / out["hf_generate"][key], 2)
    return out


def states(task: Task, n: int, seed: int, first_only: bool = False) -> list[list[dict[str, str]]]:
    """``n`` assistant-turn states (messages before an assistant turn) of scripted conversations: all turns
    mixed, or only the opening one (``first_only``: the shortest prompts)."""
    records = collect(task, ScriptedPolicy(task), RolloutConfig(n=n, group_size=1, seed=seed), progress=False)
    out = []
    for rec in records:
        msgs = rec.episode.messages
        turns = [msgs[:i] for i, m in enumerate(msgs) if m["role"] == "assistant"]
        out += turns[:1] if first_only else turns
    step = max(1, len(out) // n)
    return out[::step][:n]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="medical", help="medical, math, docwrite or module:Class")
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a model directory")
    ap.add_argument("--n", type=int, default=32, help="conversations per rollout")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    task = load_task(args.task)
    model, tok = hf.load_chat_model(args.model)
    prompts = states(task, args.batch_size, args.seed)
    opening = states(task, args.batch_size, args.seed, first_only=True)
    report: dict[str, Any] = {
        "bench": "rollout_throughput",
        "rollout": {},
        "per_call": {},
        "per_call_opening": {},
    }
    for mode, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        cfg = RolloutConfig(
            n=args.n, batch_size=args.batch_size, seed=args.seed, temperature=temperature,
            max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        sampling = cfg.sampling()

        def tokens_of(table) -> int:
            return sum(json.loads(m)["n_generated_tokens"] for m in table["metadata"].to_pylist())

        def run_rollout(cls: type[HFPolicy], cfg: RolloutConfig = cfg) -> int:
            return tokens_of(rollout(task, cls(model, tok, cfg), cfg, progress=False))

        engine = RolloutEngine(model, hf.eos_token_ids(model, tok), width=args.batch_size)

        for key, ps in (("per_call", prompts), ("per_call_opening", opening)):

            def call_old(s: SamplingConfig = sampling, ps: list = ps) -> int:
                return sum(len(g.token_ids) for g in hf.generate(model, tok, ps, s, args.seed))

            def call_new(s: SamplingConfig = sampling, e: RolloutEngine = engine, ps: list = ps) -> int:
                return sum(len(g.token_ids) for g in e.chat(tok, ps, s, args.seed))

            call_new(), call_old()  # warm-up (allocations, first-call costs)
            report[key][mode] = compare(call_old, call_new, args.repeats)
        report["rollout"][mode] = compare(
            lambda: run_rollout(GeneratePolicy), lambda: run_rollout(HFPolicy), args.repeats
        )
    report["speedup_vs_hf_generate"] = {m: report["rollout"][m]["speedup_cpu"] for m in ("sampled", "greedy")}
    report["speedup_vs_hf_generate_wall"] = {
        m: report["rollout"][m]["speedup_wall"] for m in ("sampled", "greedy")
    }
    for key in ("per_call", "per_call_opening"):
        report[f"{key}_speedup"] = {m: report[key][m]["speedup_cpu"] for m in ("sampled", "greedy")}
    report["settings"] = {
        "task": args.task,
        "model": args.model,
        "n": args.n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "seed": args.seed,
        "decoder": type(engine._fwd).__name__ if engine._fwd is not None else "hf_generate",
        "prompt_tokens_per_call": sum(len(p) for p in hf.render_prompts(tok, prompts)),
        "prompt_tokens_per_opening_call": sum(len(p) for p in hf.render_prompts(tok, opening)),
        "torch_threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
