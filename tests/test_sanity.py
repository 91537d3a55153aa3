"""The learning sanity check (itpo_batch.run.sanity): every arm lifts a weak π_0 on the clarify task.

This is the test that the update path learns at all: a broken advantage sign, a credit that ignores the
outcome, an update that does not step, or a rollout that ignores the new weights leaves the success flat
at π_0's, which the bars below catch by construction (every arm's mean must also beat π_0's own success
by 0.2 greedy and 0.05 sampled). It trains for real (π_0 SFT, then rounds of every arm), so it is marked slow;
CI runs it.

**Three seeds, bars on their mean.** Each parametrisation runs seeds 0, 1 and 2 for eight rounds (twelve
for the two slower grpo arms), evaluating on the 64 fixed cases at round 0 and the last round only (the
evaluation draws no training randomness, so the rounds are those of an every-round evaluation). Every
arm's mean over the seeds must reach 0.5 greedy success (π_0 ≈ 0.19: it guesses) and 0.4 sampled
(π_0 ≈ 0.31; the tiny model's T = 1 samples keep a tail of broken text), and beat π_0's by 0.2 and 0.05, and with the default estimator
(rloo) no seed may end further than 1 nat per token from π_0 (an arm that reaches the bars while its own
samples turn to broken text has collapsed, not learned).

Why not one seed and a bar of 0.7, as before 2026-12 (docs/results.md, "Sanity: on another CPU"): a run
repeats exactly on one machine, not across CPUs (kernels round differently; the first sampled token that
differs changes every later round). The six-round recipe had been tuned on one machine's seed 0, where
every arm passed; on an AMD EPYC a third of the arm-seed runs failed, some collapsing in one round from
the bar to nothing (prime, rloo, seed 2: 0.81 / 0.83 → 0.00 / 0.11), through fresh-AdamW steps that the
KL budget could not stop. With the per-round warm-up (itpo_batch.run.sanity) the runs stopped collapsing
there, but land anywhere between 0.55 and 1.0 greedy: learned, at a level a single seed cannot pin down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itpo_batch.run.rounds import iterate
from itpo_batch.run.sanity import sanity_iterate_config, sanity_pi0

pytestmark = pytest.mark.slow

ROUNDS = 8
START_MAX = {"eval/greedy_success": 0.3, "eval/success": 0.4}
LEARNED_MIN = {"eval/greedy_success": 0.5, "eval/success": 0.4}  # means over SEEDS
GAIN_MIN = {"eval/greedy_success": 0.2, "eval/success": 0.05}  # mean over SEEDS minus π_0's
KL_MAX = 1.0
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def pi0(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return sanity_pi0(tmp_path_factory.mktemp("sanity"))


def _success(run: Path, key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if key in m:
            out.setdefault(m["method"], {})[m["round"]] = m[key]
    return out


def _finals(run: Path, methods: list[str], rounds: int) -> dict[str, dict[str, Any]]:
    """Per arm, the last round's sampled and greedy success and KL to π_0, and π_0's success (``pi0``,
    checked to start low)."""
    scores = {key: _success(run, key) for key in (*LEARNED_MIN, "policy/kl_pi0")}
    for key, bar in START_MAX.items():
        start = scores[key][methods[0]][0]
        assert start <= bar, f"π_0 should start low, got {key} {start:.2f} in {run.name}"
    start = {m: {k: scores[k][m][0] for k in LEARNED_MIN} for m in methods}
    return {m: {key: scores[key][m][rounds] for key in scores} | {"pi0": start[m]} for m in methods}


@pytest.mark.parametrize(
    ("estimator", "methods", "rounds"),
    [
        ("rloo", ["itpo", "itpo_norm", "outcome", "prime", "iterative_ppo"], ROUNDS),
        ("grpo", ["itpo", "prime"], ROUNDS),
        ("grpo", ["itpo_norm", "outcome"], 12),
        ("ppo", ["itpo", "itpo_norm", "outcome", "prime"], ROUNDS),
    ],
)
def test_every_arm_learns(pi0: Path, tmp_path: Path, estimator: str, methods: list[str], rounds: int) -> None:
    overrides = [f"method.estimator={estimator}", "eval.sampled_every=0", "eval.greedy_every=0"]
    finals = []
    for seed in SEEDS:
        cfg = sanity_iterate_config(pi0, methods, rounds=rounds, seed=seed, overrides=overrides)
        iterate(cfg, tmp_path / f"seed{seed}")
        finals.append(_finals(tmp_path / f"seed{seed}", methods, rounds))
    by_arm = {m: {k: [f[m][k] for f in finals] for k in finals[0][m] if k != "pi0"} for m in methods}
    pi0_at = {m: {k: np.mean([f[m]["pi0"][k] for f in finals]) for k in LEARNED_MIN} for m in methods}
    failed = {
        m: {k: [round(x, 2) for x in v[k]] for k in v}
        for m, v in by_arm.items()
        if any(np.mean(v[k]) < max(bar, pi0_at[m][k] + GAIN_MIN[k]) for k, bar in LEARNED_MIN.items())
    }
    assert not failed, f"arms that did not learn with {estimator} (last round, seeds {SEEDS}): {failed}"
    if estimator == "rloo":  # with grpo / ppo some arms drift further (docs/results.md, "Sanity")
        drifted = {m: [round(x, 2) for x in v["policy/kl_pi0"]] for m, v in by_arm.items()
                   if max(v["policy/kl_pi0"]) > KL_MAX}  # fmt: skip
        assert not drifted, f"arms that drifted from π_0 with {estimator} (KL per seed): {drifted}"
