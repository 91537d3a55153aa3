"""``quickstart``: the whole product on the embedded default, in minutes on a laptop CPU.

simulate logs with the scripted policy → SFT the tiny π_0 on them → iterate ``itpo_norm``, ``itpo``,
``iterative_ppo`` and ``outcome`` from the same π_0 and round-0 logs → report. The round-0 logs of
``iterate`` are π_0's own conversations (collected once, shared by every arm), not the scripted ones:
the updates are then on-policy from the first round, as in the paper's online loop, and the scripted logs
serve only to make π_0.

**Which task** (``--task``, :func:`quickstart_config`):

- ``clarify`` (the default): the learning sanity task (:mod:`itpo_batch.run.sanity`: ask which option
  the user wants, then name it). π_0 starts near 0.3 sampled / 0.2 greedy success and the arms reach
  0.58–0.75 sampled in eight rounds of 32 conversations (measured on a 2-core AMD EPYC; other CPUs give
  other numbers from the same seed), evaluated on 64 fixed cases with per-case paired CIs: the quickstart
  *shows learning* (issue 15), in 2.3 minutes there.
- ``medical``, ``math``, ``docwrite``: the collaboration tasks with the previous recipe (2,048 scripted
  conversations at skill 0.8, SFT 3 epochs on those with outcome ≥ 0.5, 16 conversations a round, 16
  evaluation cases). It demonstrates every stage, but at these sizes no method improves measurably on
  π_0 (docs/results.md): a demonstration, not a result.

Why 2,048 scripted conversations and 3 SFT epochs for medical: with 768 × 4, π_0 is barely above chance
(sampled success ≈ 0.17, while naming the most likely disease for the complaint, asking nothing, scores
0.41), and no update from its own conversations improves it; 3,072 × 4 reaches ≈ 0.46 sampled but takes
7.7 minutes of SFT on the slow machine; 2,048 × 3 halves that. Everything is seeded; rerunning gives the
same numbers on the same machine.

The output folder is claimed first (:mod:`itpo_batch.data.io`): new, empty, or, with ``resume``, a
quickstart folder itpo-batch wrote; the task, the SFT model and the end report are checked before it is
created, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itpo_batch.data.io import claim_output
from itpo_batch.model import dist
from itpo_batch.model.loading import resolve_model_path
from itpo_batch.model.sft import SFTConfig
from itpo_batch.rl.ippo import IPPOConfig
from itpo_batch.rl.update import UpdateConfig
from itpo_batch.run import sanity
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.context import Hook, on_main
from itpo_batch.run.evaluate import EvalConfig
from itpo_batch.run.pi0 import ScriptedPi0, SFTHook, scripted_pi0
from itpo_batch.run.report import check_report, write_report
from itpo_batch.run.rounds import iterate
from itpo_batch.sim.envs.base import load_task


def quickstart_iterate_config(seed: int = 0) -> IterateConfig:
    """The iterate settings of the quickstart (``bench/experiment.py`` starts from them and sets its sizes)."""
    return IterateConfig(
        rounds=5,
        methods=["itpo_norm", "itpo", "iterative_ppo", "outcome"],
        task="medical",
        n=16,
        group_size=8,
        max_new_tokens=40,
        seed=seed,
        update=UpdateConfig(lr=1e-4, mini_batch=16, epochs=2),
        ippo=IPPOConfig(
            max_states=16,
            samples_per_state=4,
            max_new_tokens=40,
            update=UpdateConfig(lr=1e-4, mini_batch=32, epochs=2),
        ),
        eval=EvalConfig(n=16, max_new_tokens=40),
    )


QUICKSTART_METHODS = ["itpo_norm", "itpo", "iterative_ppo", "outcome"]


@dataclass
class QuickstartConfig:
    """The quickstart's stages and sizes (default: the clarify recipe, :func:`quickstart_config`)."""

    out: Path = Path("runs/quickstart")
    "Run directory (the round-0 logs and π_0 go to its data/ and pi0/ folders)."
    task: str = "clarify"
    "Simulated task."
    n_logs: int = sanity.PI0.n_logs
    "Scripted conversations π_0 imitates."
    skill: float = sanity.PI0.skill
    "Scripted policy skill (probability of a useful action)."
    logs_settings: dict[str, Any] = field(default_factory=lambda: dict(sanity.PI0.settings))
    "Task settings of the scripted logs (clarify: half the requests state the preference)."
    sft: SFTConfig = field(default_factory=lambda: sanity.PI0.sft)
    "SFT of π_0."
    iterate: IterateConfig = field(
        default_factory=lambda: sanity.sanity_iterate_config("tiny", list(QUICKSTART_METHODS))
    )
    "The rounds."
    seed: int = 0


def quickstart_config(task: str = "clarify", seed: int = 0) -> QuickstartConfig:
    """The recipe of ``task`` (module docstring): clarify's sanity recipe, or the collaboration tasks' one."""
    if task == "clarify":
        return QuickstartConfig(seed=seed)
    return QuickstartConfig(
        task=task, n_logs=2048, skill=0.8, logs_settings={},
        sft=SFTConfig(epochs=3, batch_tokens=1024, min_outcome=0.5),
        iterate=quickstart_iterate_config(seed), seed=seed,
    )  # fmt: skip


def run_quickstart(
    cfg: QuickstartConfig,
    hook: Hook,
    sft_step: SFTHook | None = None,
    resume: bool = False,
    on_round: Callable[[int, int], None] | None = None,
) -> Path:
    """Run every stage (each skipped when its output already exists and ``resume``); returns report.md."""
    out = Path(cfg.out)
    claim = claim_output(out, "workdir", "quickstart", resume=resume, continues=("quickstart",))
    load_task(cfg.task, settings=cfg.logs_settings)  # checked before anything is created
    load_task(cfg.task, settings=cfg.iterate.task_settings)
    resolve_model_path(cfg.sft.model)
    if resume:
        check_report(out / "run")
    dist.wait()  # accelerate launch: every rank has checked --output before rank 0 creates it
    on_main(claim.create)
    recipe = ScriptedPi0(cfg.task, cfg.n_logs, cfg.skill, cfg.sft, cfg.logs_settings)
    pi0 = scripted_pi0(
        recipe, out / "data" / "round0_scripted.parquet", out / "pi0", cfg.seed, hook, sft_step
    )
    it = dataclasses.replace(cfg.iterate, task=cfg.task, model=str(pi0), logs=None, seed=cfg.seed)
    run = iterate(it, out / "run", resume=resume, hook=hook, on_round=on_round)
    hook("report")
    on_main(lambda: write_report([run.path], run.path))  # rank 0 writes, the others wait for it
    return run.report_path
