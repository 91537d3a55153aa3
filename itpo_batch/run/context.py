"""The shared, read-only inputs of every arm-round of a run (config, run directory, π_0, task, device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from itpo_batch.data.store import RunDir
from itpo_batch.model.loading import default_device, load_model, load_tokenizer
from itpo_batch.run.config import IterateConfig
from itpo_batch.sim.envs.base import load_task

Hook = Callable[[str], None]


@dataclass
class Context:
    """Shared, read-only inputs of every arm-round."""

    cfg: IterateConfig
    run: RunDir
    device: torch.device
    tokenizer: Any
    pi0: torch.nn.Module
    pi0_spec: str
    task: Any | None
    hook: Hook


def make_context(cfg: IterateConfig, run: RunDir, hook: Hook) -> Context:
    device = default_device()
    pi0 = load_model(cfg.model, role="reference", device=device, dtype=torch.float32)
    task = load_task(cfg.task) if cfg.task is not None else None
    return Context(cfg, run, device, load_tokenizer(cfg.model), pi0, cfg.model, task, hook)
