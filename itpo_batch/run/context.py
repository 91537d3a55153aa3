"""The shared, read-only inputs of every arm-round of a run (config, run directory, π_0, task, device).

Under ``accelerate launch`` every rank builds its own context (π_0 on the rank's device, pinned by
:func:`itpo_batch.model.dist.init` before any model is loaded) and runs every arm-round with the others;
rank 0 alone writes the run directory (:func:`on_main`) and holds its lock (:func:`hold_run`). A sharded
model cannot drive the rollout engine (every forward of FSDP is a collective, and ranks play different
conversations), so ``iterate`` refuses FSDP/DeepSpeed configs: data parallel (``configs/accelerate/ddp.yaml``)
only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.runlock import RunBusy, RunLock, sweep_leftovers
from itpo_batch.data.store import RunDir
from itpo_batch.model import dist
from itpo_batch.model.loading import load_model, load_tokenizer
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
    dist.init()  # under a launcher: this rank's device before any model is loaded
    if dist.lockstep_forwards():
        raise ItpoError(
            "iterate runs data parallel only (configs/accelerate/ddp.yaml): under FSDP/DeepSpeed every forward "
            "is a collective, and the ranks' rollouts play different conversations"
        )
    device = dist.device()
    pi0 = load_model(cfg.model, role="reference", device=device, dtype=torch.float32)
    task = load_task(cfg.task, settings=cfg.task_settings) if cfg.task is not None else None
    return Context(cfg, run, device, load_tokenizer(cfg.model), pi0, cfg.model, task, hook)


def on_main(write: Callable[[], object]) -> None:
    """``write()`` on rank 0 alone, then every rank waits until it has (one process: just ``write()``)."""
    if dist.is_main_process():
        write()
    dist.wait()


def hold_run(lock: RunLock, hook: Hook | None) -> None:
    """Rank 0 takes the run's lock (once the run directory exists); every rank raises the same
    :class:`~itpo_batch.data.runlock.RunBusy` when another command holds it. Collective: call on every
    rank."""
    warned = lock.warning is not None
    refused = dist.main_value(lock.acquire() if dist.is_main_process() else None)
    if refused:
        raise RunBusy(refused)
    if lock.warning is not None and not warned and hook is not None:
        hook(lock.warning)  # once


def sweep_run(run: RunDir, hook: Hook) -> None:
    """Remove what killed writers left in the run (under its lock, on rank 0) and say so."""
    removed, n_bytes = sweep_leftovers(run.path)
    if removed:
        hook(f"removed {len(removed)} temporary file(s) an interrupted write left ({n_bytes / 1e6:.1f} MB)")
