"""π_0 from scripted logs: simulate the scripted policy on a task, then SFT the tiny model on them.

One recipe shared by ``quickstart``, the sanity check (:mod:`itpo_batch.run.sanity`) and the benches: each
stage is skipped when its output exists (the logs file, then the model folder), so rerunning resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from itpo_batch.data.io import write_parquet
from itpo_batch.data.validate import read_logs
from itpo_batch.model.sft import SFTConfig, train_sft
from itpo_batch.run.context import Hook, on_main
from itpo_batch.sim.envs.base import load_task
from itpo_batch.sim.rollout import RolloutConfig, ScriptedPolicy, rollout

SFTHook = Callable[[int, int, float], None]


@dataclasses.dataclass(frozen=True)
class ScriptedPi0:
    """How π_0 is made: ``n_logs`` conversations of the scripted policy at ``skill`` on ``task`` (with the
    task's ``settings``), groups of 8, then ``sft`` (its ``min_outcome`` filters: filtered imitation)."""

    task: str
    n_logs: int
    skill: float
    sft: SFTConfig
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def scripted_logs(recipe: ScriptedPi0, logs_path: Path, seed: int = 0, hook: Hook | None = None) -> Path:
    """Write the recipe's scripted conversations to ``logs_path`` (unless present); returns it."""
    if not logs_path.is_file():
        task = load_task(recipe.task, settings=dict(recipe.settings))
        if hook is not None:
            hook(
                f"simulate: {recipe.n_logs} {recipe.task} conversations, scripted policy (skill {recipe.skill})"
            )
        rcfg = RolloutConfig(n=recipe.n_logs, group_size=8, seed=seed)
        table = rollout(task, ScriptedPolicy(task, recipe.skill), rcfg, progress=False)
        on_main(lambda: write_parquet(table, logs_path))  # accelerate launch: rank 0 writes, the others wait
    return logs_path


def scripted_pi0(recipe: ScriptedPi0, logs_path: Path, pi0: Path, seed: int = 0, hook: Hook | None = None,
                 sft_step: SFTHook | None = None) -> Path:  # fmt: skip
    """:func:`scripted_logs`, then the SFT model in ``pi0`` (unless present); returns ``pi0``."""
    scripted_logs(recipe, logs_path, seed, hook)
    if not (pi0 / "config.json").is_file():
        if hook is not None:
            what = "all" if recipe.sft.min_outcome is None else f"outcome ≥ {recipe.sft.min_outcome:g}"
            hook(f"sft: tiny π_0 on the scripted conversations ({what})")
        train_sft(read_logs([logs_path]), dataclasses.replace(recipe.sft, seed=seed), pi0, on_step=sft_step)
    return pi0
