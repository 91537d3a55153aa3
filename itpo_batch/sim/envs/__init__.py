"""Simulated collaboration tasks (math tutoring, document writing, medical recommendation)."""

from itpo_batch.sim.envs.base import (
    Episode,
    EpisodeResult,
    Task,
    TaskConfig,
    TurnResult,
    episode_rng,
    load_task,
)

__all__ = ["Episode", "EpisodeResult", "Task", "TaskConfig", "TurnResult", "episode_rng", "load_task"]
