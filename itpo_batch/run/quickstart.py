"""``quickstart``: the whole product on the embedded default, in minutes on a laptop CPU.

simulate logs with the scripted policy → SFT the tiny π_0 on them (filtered imitation) → iterate
``itpo_norm``, ``itpo``, ``iterative_ppo`` and ``outcome`` from the same π_0 and round-0 logs → report.
The round-0 logs of ``iterate`` are π_0's own conversations (collected once, shared by every arm), not the
scripted ones: the updates are then on-policy from the first round, as in the paper's online loop, and
the scripted logs serve only to make π_0.

Sizes were chosen to fit under 10 minutes on two slow CPU cores; with the rollout engine, varlen attention
and parallel arms it now takes 3.6 minutes here (README, Speed). The quickstart is a demonstration of every stage, not a test of
whether ITPO helps: that needs the sizes of ``bench/experiment.py`` (docs/results.md). The scripted policy
at skill 0.8 gives outcomes across the whole range; SFT imitates only the conversations with outcome ≥ 0.5
(plain imitation of mixed logs gives a much weaker π_0, bench/sft_vs_scripted); each arm then collects 16
conversations per round (2 cases × 8), the same budget for every arm, and is evaluated on 16 fixed cases
(sampled and greedy), so its per-round CIs are wide.

Why 2,048 scripted conversations and 3 SFT epochs (most of the quickstart's time goes to this SFT): with
768 × 4, π_0 is barely above chance on medical (sampled success ≈ 0.17; it names a diagnosis 94% of the
time but the right one 19%, while naming the most likely disease for the complaint, asking nothing,
scores 0.41), and no update from its own conversations improves it. With 3,072 × 4 it reaches ≈ 0.46
sampled and 0.56 greedy outcome (three draws of 64 cases), but the SFT alone then takes 7.7 minutes on the
slow machine above. 2,048 × 3 halves that (0.56 sampled and greedy on the quickstart's 16 cases); the
experiment keeps 3,072 × 4.
Everything is seeded; rerunning gives the same numbers on the same machine.

The output folder is claimed first (:mod:`itpo_batch.data.io`): new, empty, or, with ``resume``, a
quickstart folder itpo-batch wrote; the task, the SFT model and the end report are checked before it is
created, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from itpo_batch.data.io import claim_output, write_parquet
from itpo_batch.data.validate import read_logs
from itpo_batch.model.loading import resolve_model_path
from itpo_batch.model.sft import SFTConfig, train_sft
from itpo_batch.rl.ippo import IPPOConfig
from itpo_batch.rl.update import UpdateConfig
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.evaluate import EvalConfig
from itpo_batch.run.report import check_report, write_report
from itpo_batch.run.rounds import iterate
from itpo_batch.sim.envs.base import load_task
from itpo_batch.sim.rollout import RolloutConfig, ScriptedPolicy, rollout

Hook = Callable[[str], None]
SFTHook = Callable[[int, int, float], None]


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


@dataclass
class QuickstartConfig:
    """The quickstart's stages and sizes."""

    out: Path = Path("runs/quickstart")
    "Run directory (the round-0 logs and π_0 go to its data/ and pi0/ folders)."
    task: str = "medical"
    "Simulated task."
    n_logs: int = 2048
    "Round-0 conversations from the scripted policy."
    skill: float = 0.8
    "Scripted policy skill (probability of a useful action)."
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=3, batch_tokens=1024, min_outcome=0.5))
    "SFT of π_0 (filtered imitation)."
    iterate: IterateConfig = field(default_factory=quickstart_iterate_config)
    "The rounds."
    seed: int = 0


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
    task = load_task(cfg.task)
    resolve_model_path(cfg.sft.model)
    if resume:
        check_report(out / "run")
    claim.create()
    logs_path, pi0 = out / "data" / "round0_scripted.parquet", out / "pi0"
    if not (resume and logs_path.is_file()):
        hook(f"simulate: {cfg.n_logs} {cfg.task} conversations, scripted policy (skill {cfg.skill})")
        rcfg = RolloutConfig(n=cfg.n_logs, group_size=8, seed=cfg.seed)
        write_parquet(rollout(task, ScriptedPolicy(task, cfg.skill), rcfg, progress=False), logs_path)
    if not (resume and (pi0 / "config.json").is_file()):
        hook("sft: tiny π_0 on the successful round-0 conversations")
        train_sft(read_logs([logs_path]), dataclasses.replace(cfg.sft, seed=cfg.seed), pi0, on_step=sft_step)
    it = dataclasses.replace(cfg.iterate, task=cfg.task, model=str(pi0), logs=None, seed=cfg.seed)
    run = iterate(it, out / "run", resume=resume, hook=hook, on_round=on_round)
    hook("report")
    return write_report([run.path], run.path)
