"""Profile of one ``itpo_norm`` arm-round at the experiment's sizes: seconds and share per phase, new paths
against the old ones, in the same process.

The round is :func:`itpo_batch.run.rounds.arm_round` itself (round 1 of a 5-round run, i.e. a middle round)
on 32 training conversations with 64 evaluation cases (``bench/experiment.py`` ``SIZES`` over the
quickstart's settings), timed phase by phase through the round's own phase hook. Round 0 (π_0's logs, its
evaluation, its log-probs) is run once; every timed round starts from a copy of it. Variants, interleaved
per repeat (new, old, new with the dense mask, new with ``model.generate``, ...):

* ``new``: the product as it is (rollout engine, varlen attention, log-probs kept by the round that
  collected the logs, no old-log-prob recompute where the behaviour log-probs cover a conversation, one
  π_0 forward, greedy evaluation only in a middle round).
* ``old``: the same round through the old paths, which still exist: ``model.generate`` for every
  rollout (the engine's own fallback), the dense block-diagonal mask (:func:`itpo_batch.model.attention.
  dense_mask_path`), π_0 run again for the PRM's reference (the kept log-probs removed), the old
  log-probs recomputed for every conversation (:func:`itpo_batch.rl.update.recompute_logprobs` +
  ``old_logprobs``), the KL with a forward of both models (:func:`itpo_batch.run.evaluate.kl_to_reference`),
  sampled and greedy evaluation every round.
* ``new_dense`` / ``new_hf_generate``: the new round with only the attention / only the decoder put
  back, to isolate those two.

Each figure is the minimum over repeats of the process CPU time (one thread: what the work costs,
whatever else runs on the machine) and, for reference, of the wall time. ``ratio_old_over_new`` is per
phase and for the whole round. ``conversations_per_s`` counts the training and evaluation
conversations of the round; ``generated_tokens_per_s`` the tokens its rollouts generated over the
rollout and evaluation phases. π_0: ``--pi0`` or an SFT of the tiny model on ``--n-logs`` scripted
conversations (cached in ``--workdir``; the experiment's π_0 is 3,072 × 4 epochs). Prints one JSON object.

Example: python bench/round_profile.py --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from itpo_batch.core.config import apply_overrides, from_mapping, to_mapping
from itpo_batch.data.store import RunDir
from itpo_batch.data.validate import read_logs
from itpo_batch.model.attention import dense_mask_path
from itpo_batch.model.engine import RolloutEngine
from itpo_batch.rl import update as update_mod
from itpo_batch.run import arm_step, rounds
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.context import make_context
from itpo_batch.run.evaluate import kl_to_reference
from itpo_batch.run.logprob_cache import cache_path
from itpo_batch.run.quickstart import quickstart_iterate_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment import make_pi0  # the experiment's pi_0: scripted logs, SFT on the better half

SIZES = ["n=32", "ippo.max_states=32", "eval.n=64"]  # bench/experiment.py SIZES
METHOD = "itpo_norm"
VARIANTS = ("new", "old", "new_dense", "new_hf_generate")
GENERATING = ("collecting logs", "evaluating (sampled)", "evaluating (greedy)")


class PhaseClock:
    """The round's phase hook: CPU and wall seconds from one phase message to the next."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = [
            ("loading state", time.process_time(), time.perf_counter())
        ]

    def __call__(self, message: str) -> None:
        self.marks.append((message.split(": ", 1)[-1], time.process_time(), time.perf_counter()))

    def phases(self) -> dict[str, tuple[float, float]]:
        """Phase → (cpu, wall) seconds; call after the round (the last phase ends now)."""
        ends = [*self.marks[1:], ("end", time.process_time(), time.perf_counter())]
        out: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        for (name, cpu, wall), (_, cpu_end, wall_end) in zip(self.marks, ends, strict=True):
            c, w = out[name]
            out[name] = (c + cpu_end - cpu, w + wall_end - wall)
        return dict(out)


def _old_logprobs(
    model: Any, rendered: Any, conversation_ids: Any, messages: Any, cfg: Any, untrusted: Any = ()
) -> Any:
    """The old path: recompute every conversation, then take the logged values where they cover one."""
    recomputed = update_mod.recompute_logprobs(model, rendered, cfg.batch_tokens, cfg.temperature)
    return update_mod.old_logprobs(rendered, conversation_ids, messages, recomputed, untrusted)


def _old_kl(ctx: Any, policy: Any, logs_path: Path) -> dict[str, float]:
    """The old KL: π and π_0 both run over the logs (nothing kept for the next round)."""
    ctx.hook("KL to π_0")
    return kl_to_reference(policy, ctx.pi0, ctx.tokenizer, read_logs([logs_path]).chats())


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


@contextlib.contextmanager
def paths(variant: str, run: Path) -> Iterator[None]:
    """The old paths that ``variant`` puts back (module docstring)."""
    with contextlib.ExitStack() as stack:
        if variant in ("old", "new_dense"):
            stack.enter_context(dense_mask_path())
        if variant in ("old", "new_hf_generate"):
            stack.enter_context(patched(RolloutEngine, "supported", property(lambda self: False)))
        if variant == "old":
            stack.enter_context(patched(arm_step, "behaviour_logprobs", _old_logprobs))
            stack.enter_context(patched(rounds, "_kl_to_pi0", _old_kl))
            cache_path(rounds.round0_path(RunDir(run))).unlink()
        yield


def one_round(cfg: IterateConfig, base: Path, run: Path, variant: str) -> dict[str, Any]:
    """Round 1 of ``METHOD`` from a copy of ``base`` (round 0 done) under ``variant``'s paths."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    if variant == "old":
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sampled_every=1))
    clock = PhaseClock()
    tables: list[Any] = []
    real_eval = rounds.eval_rollout

    def eval_and_keep(*args: Any, **kwargs: Any) -> Any:
        tables.append(real_eval(*args, **kwargs))
        return tables[-1]

    ctx = make_context(cfg, RunDir(run), clock)
    with paths(variant, run), patched(rounds, "eval_rollout", eval_and_keep):
        clock.marks[0] = ("loading state", time.process_time(), time.perf_counter())
        metrics = rounds.arm_round(ctx, METHOD, 1, rounds.round0_path(RunDir(run)))
    phases = clock.phases()
    train = read_logs([RunDir(run).checkpoint_dir(METHOD, 1, "policy").parent / "logs.parquet"])
    tables.append(train.conversations)
    tokens = sum(_generated(t) for t in tables)
    assert metrics is not None
    n_conv = train.conversations.height + sum(
        int(metrics.get(f"{p}n", 0) or 0) for p in ("eval/", "eval/greedy_")
    )
    return {"phases": phases, "tokens": tokens, "conversations": n_conv,
            "behavior_logprobs_used": metrics.get("update/behavior_logprobs_used")}  # fmt: skip


def _generated(table: Any) -> int:
    meta = (
        table["metadata"].to_list()
        if hasattr(table["metadata"], "to_list")
        else table["metadata"].to_pylist()
    )
    return sum(json.loads(m).get("n_generated_tokens", 0) for m in meta)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: min over repeats of each phase's CPU and wall seconds, shares, rates; ratios to ``new``."""
    out: dict[str, Any] = {}
    for variant, reps in runs.items():
        names = list(dict.fromkeys(n for r in reps for n in r["phases"]))
        cpu = {n: min(r["phases"].get(n, (0.0, 0.0))[0] for r in reps) for n in names}
        wall = {n: min(r["phases"].get(n, (0.0, 0.0))[1] for r in reps) for n in names}
        total_cpu = min(sum(v[0] for v in r["phases"].values()) for r in reps)
        total_wall = min(sum(v[1] for v in r["phases"].values()) for r in reps)
        gen_cpu = sum(cpu.get(n, 0.0) for n in GENERATING)
        out[variant] = {
            "round_cpu_s": round(total_cpu, 2),
            "round_wall_s": round(total_wall, 2),
            "phases": {
                n: {
                    "cpu_s": round(cpu[n], 3),
                    "wall_s": round(wall[n], 3),
                    "share": round(cpu[n] / total_cpu, 3),
                }
                for n in names
            },
            "conversations_per_s": round(reps[0]["conversations"] / total_cpu, 2),
            "generated_tokens_per_s": round(min(r["tokens"] for r in reps) / max(gen_cpu, 1e-9), 1),
            "behavior_logprobs_used": reps[0]["behavior_logprobs_used"],
        }
    new = out["new"]
    for variant in (v for v in out if v != "new"):
        mine = out[variant]
        mine["ratio_over_new"] = {
            n: round(p["cpu_s"] / new["phases"][n]["cpu_s"], 2)
            if new["phases"].get(n, {}).get("cpu_s")
            else None
            for n, p in mine["phases"].items()
        }
        mine["ratio_over_new"]["round"] = round(mine["round_cpu_s"] / new["round_cpu_s"], 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="medical")
    ap.add_argument(
        "--pi0", default=None, help="π_0 directory (default: an SFT of tiny, cached in --workdir)"
    )
    ap.add_argument(
        "--n-logs", type=int, default=1024, help="scripted conversations for the default π_0's SFT"
    )
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/round_profile"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.workdir.resolve()
    pi0 = Path(args.pi0) if args.pi0 else make_pi0(args.task, work, args.n_logs, args.sft_epochs)
    base_cfg = dataclasses.replace(quickstart_iterate_config(args.seed), task=args.task, model=str(pi0),
                                   methods=[METHOD], workers=1)  # fmt: skip
    cfg = from_mapping(IterateConfig, apply_overrides(to_mapping(base_cfg), SIZES))
    base = work / "round0"
    if not (base / "metrics.jsonl").is_file():
        shutil.rmtree(base, ignore_errors=True)
        (base / "checkpoints").mkdir(parents=True)
        rounds.round_zero(make_context(cfg, RunDir(base), lambda _m: None))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeats):
        for variant in runs:
            runs[variant].append(one_round(cfg, base, work / f"round_{variant}", variant))
    report = {"bench": "round_profile", "method": METHOD, "sizes": SIZES, "pi0": str(pi0),
              "threads": torch.get_num_threads(), "repeats": args.repeats, **summarise(runs)}  # fmt: skip
    if "old" in report:
        report["speedup_round_old_over_new"] = report["old"]["ratio_over_new"]["round"]
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
