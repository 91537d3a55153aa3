"""``IterateConfig``: every knob of ``iterate`` in one typed dataclass (the run's ``config.yaml``).

Each stage's knobs live in that stage's config dataclass (``PRMConfig``, ``QConfig``, ``UpdateConfig``,
…) and are nested here; the CLI reads its defaults from these classes, never from literal copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.prm import PRMConfig
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.model.loading import DEFAULT_MODEL
from itpo_batch.rl.critic import CriticConfig
from itpo_batch.rl.ippo import IPPOConfig
from itpo_batch.rl.methods import MethodConfig, check_methods, get_method
from itpo_batch.rl.update import UpdateConfig
from itpo_batch.run.buffer import BufferConfig
from itpo_batch.run.evaluate import EvalConfig


@dataclass
class IterateConfig:
    """Everything ``iterate`` needs; written as the run's ``config.yaml``."""

    rounds: int = 5
    "Rounds of update + collection per arm."
    methods: list[str] = field(default_factory=lambda: ["itpo_norm", "itpo", "iterative_ppo", "outcome"])
    "Arms: itpo, itpo_norm, outcome, prime, iterative_ppo."
    task: str | None = "medical"
    "Simulated task (medical, math, docwrite, clarify, or module:Class); None for --env none."
    task_settings: dict[str, Any] = field(default_factory=dict)
    "The task's own settings (difficulty knobs), e.g. ``--set task_settings.n_diseases=6``; see each task's config class."
    logs: str | None = None
    "Round-0 logs (Parquet/JSONL); default: π_0 collects them on the task."
    model: str = DEFAULT_MODEL
    "π_0: 'tiny' (the embedded model) or a local HF chat-model directory."
    n: int = 64
    "Conversations collected per round and arm (the same budget for every arm)."
    group_size: int = 8
    "Conversations per hidden case (groups for RLOO/GRPO)."
    max_new_tokens: int = 64
    "Most tokens per generated assistant turn."
    rollout_batch: int = 32
    "Conversations generated together."
    seed: int = 0
    "Seeds cases, sampling, shuffles and initialisations."
    workers: int | str = "auto"
    "Processes for the arms: 'auto' (one per core, at most one per arm) or a number; 1 runs them in this process. Results do not depend on it."
    method: MethodConfig = field(default_factory=MethodConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    q: QConfig = field(default_factory=lambda: QConfig(epochs=2, holdout=0.1))
    update: UpdateConfig = field(default_factory=UpdateConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ippo: IPPOConfig = field(default_factory=IPPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.n < 2:
            raise ItpoError("--rounds must be >= 1 and --n >= 2")
        if self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                       or self.workers < 1):  # fmt: skip
            raise ItpoError(f"--workers takes 'auto' or a number >= 1, not {self.workers!r}")
        check_methods(self.methods, self.method.estimator)
        if self.task is None and len(self.methods) != 1:
            raise ItpoError("--env none deploys one policy: give exactly one method")
        if self.task is None and self.logs is None:
            raise ItpoError("--env none needs --logs (the deployed policy's conversations)")

    def estimator_of(self, method: str) -> str:
        """The estimator arm ``method`` really uses (Iterative PPO has its own, ``ippo.estimator``)."""
        return get_method(method).estimator(self.method.estimator, self.ippo.estimator)
