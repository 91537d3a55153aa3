"""More than one process: one lazily created ``accelerate.Accelerator`` and the few collectives the stages need.

``accelerate launch [--config_file configs/accelerate/ddp.yaml] -m itpo_batch score …`` (or ``torchrun``)
starts one process per device; accelerate sets up the process group. Nothing here launches processes or
builds a process group. Design decisions:

- **One process is untouched.** Without a launcher (``WORLD_SIZE`` unset or 1) no ``Accelerator`` is
  ever created: every helper is the identity, models and optimisers stay bare, so a plain ``itpo-batch
  score`` computes exactly what it computed before this module existed. Under a launcher the first call
  creates the ``Accelerator`` (which also pins this process's GPU); :func:`init` does it early.
- **Every rank holds the whole dataset; the forwards are sharded.** Rendering and packing are cheap and
  deterministic, so each rank renders all conversations and plans the same buffers and mini-batches.
  Model forwards without gradients (the reference, the PRM's re-score, old log-probs, critic values,
  Q predictions) run buffer ``i`` on rank ``i mod N`` and are all-gathered (:func:`shard_map`), so every
  rank ends with the same per-token tensors, bitwise equal to one process's (same buffers, same kernels).
  Statistics over the batch (PRM normaliser, n̄, whitening, RLOO/GRPO baselines) are then computed on the
  full tensors and are global by construction; the PRM normaliser still takes its max over each rank's
  own buffers and all-reduces it (MAX), so its ``"local"`` mode keeps the official per-shard meaning.
- **Training steps are split, not multiplied.** A step (a mini-batch of conversations, or one packed
  buffer) is the same set as in one process; each rank takes a contiguous part of it (:func:`split`),
  its losses keep the *global* denominator (conversations or tokens of the whole step) and are scaled by
  ``N`` before backward, because DDP averages gradients over ranks: the step's gradient is then the sum
  over shards / global count, exactly one process's (up to float summation order). N processes give the
  same effective batch as one; ``--batch-tokens`` / ``mini_batch`` are global sizes.
- **Lock-step micro-batches** (:func:`lockstep`). A DDP backward is a collective, so every rank must run as
  many micro-batches per step as the busiest one; a rank with fewer repeats a filler with weight 0. All but
  the last micro-batch run under ``no_sync``, so gradients are all-reduced once per step. Under FSDP every
  forward is a collective, so :func:`shard_map` pads ranks with dummy forwards too. DeepSpeed is refused
  (:func:`prepare`): its engine steps inside backward.
- **Groups are never split** when conversations themselves are sharded (rollouts): :func:`shard_by_group`
  deals whole groups, in order of first appearance, round-robin, so the union over ranks is the input.
- **Only rank 0 writes**; :func:`wait` keeps the others until it has. Where ranks decide from what is on
  disk (a file present, a round committed) they take rank 0's answer (:func:`main_value`), so no rank can
  take another branch, and skip a collective, because rank 0 wrote in between.
- **Whole Python objects** (rollout tables) travel with :func:`gather_objects` (pickled, accelerate's
  ``gather_object``): results small next to the forwards that produced them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")
_ACCELERATOR: Any = None


def launched() -> bool:
    """Whether a launcher started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def accelerator() -> Any:
    """The process's ``accelerate.Accelerator``, created on first use (under a launcher only)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator()
        if launched() and _ACCELERATOR.num_processes == 1:
            raise RuntimeError(
                f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees one: on a machine "
                "without GPUs set ACCELERATE_USE_CPU=true (e.g. ACCELERATE_USE_CPU=true accelerate launch "
                "--multi_gpu --num_processes 2 -m itpo_batch …), else every process would work alone"
            )
    return _ACCELERATOR


def init() -> None:
    """Create the accelerator now when launched (pins this rank's GPU before any model is loaded)."""
    if launched():
        accelerator()


def num_processes() -> int:
    """Processes working together (1 without a launcher)."""
    return accelerator().num_processes if launched() else 1


def is_distributed() -> bool:
    return num_processes() > 1


def rank() -> int:
    """This process's index (0 without a launcher)."""
    return accelerator().process_index if launched() else 0


def is_main_process() -> bool:
    """Whether this process writes outputs and prints (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: accelerate's under a launcher, else CUDA if available, else CPU."""
    if launched():
        return torch.device(accelerator().device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lockstep_forwards() -> bool:
    """Whether every forward is a collective (FSDP, DeepSpeed), so ranks must run equally many."""
    if not is_distributed():
        return False
    return accelerator().distributed_type.name in ("FSDP", "DEEPSPEED")


def wait() -> None:
    """Barrier: every rank waits here for the others (no-op in one process)."""
    if is_distributed():
        accelerator().wait_for_everyone()


# ------------------------------------------------------------------------------------------ collectives


def all_reduce(value: float, op: Literal["sum", "max"] = "sum") -> float:
    """``value`` summed (or maxed) over ranks, float64; the value itself in one process."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    if op == "sum":
        return float(accelerator().reduce(t, reduction="sum")[0])
    return float(accelerator().gather(t).max())  # all-gather + max = all-reduce MAX


def all_reduce_tensor(t: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """Element-wise sum (or max) of equally shaped tensors over ranks, on ``t``'s device."""
    if not is_distributed():
        return t
    x = t.to(device())
    out = accelerator().reduce(x, reduction="sum") if op == "sum" else accelerator().gather(x[None]).amax(0)
    return out.to(t.device)


def gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``t`` (lengths may differ), in rank order, on ``t``'s device."""
    if not is_distributed():
        return [t]
    acc, x = accelerator(), t.reshape(-1).to(device())
    lengths = acc.gather(torch.tensor([x.numel()], dtype=torch.int64, device=x.device)).tolist()
    padded = acc.gather(acc.pad_across_processes(x, dim=0))
    width = max(lengths)
    return [padded[i * width : i * width + n].to(t.device) for i, n in enumerate(lengths)]


def shard_map(fn: Callable[[T], torch.Tensor], items: Sequence[T]) -> list[torch.Tensor]:
    """``[fn(x) for x in items]`` (1-D float tensors, no grad) with item ``i`` computed on rank ``i mod N``.

    Every rank receives every result (float32 under a launcher), in item order, on this rank's device.
    Under FSDP/DeepSpeed ranks with fewer items repeat ``items[0]`` so that all run equally many forwards.
    """
    if not is_distributed():
        return [fn(x) for x in items]
    n, r = num_processes(), rank()
    outs = [fn(items[i]).detach().reshape(-1).float().to(device()) for i in range(r, len(items), n)]
    if lockstep_forwards() and items:
        for _ in range(-(-len(items) // n) - len(outs)):
            fn(items[0])
    values = gather_varlen(torch.cat(outs) if outs else torch.zeros(0, device=device()))
    sizes = gather_varlen(torch.tensor([o.numel() for o in outs], dtype=torch.int64, device=device()))
    results: list[torch.Tensor] = [torch.zeros(0)] * len(items)
    for q in range(n):
        for k, part in enumerate(values[q].split(sizes[q].tolist())):
            results[q + k * n] = part
    return results


def gather_objects(items: list[T]) -> list[T]:
    """Every rank's list of picklable ``items``, concatenated in rank order (``items`` in one process)."""
    if not is_distributed():
        return items
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def main_value(value: T) -> T:
    """Rank 0's (picklable) ``value`` on every rank, a broadcast: ranks that decide from the disk take the
    same branch whatever another rank wrote meanwhile. ``value`` itself in one process."""
    if not is_distributed():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# ------------------------------------------------------------------------------------------- sharding


def split(items: Sequence[T] | np.ndarray | torch.Tensor) -> Any:
    """This rank's contiguous part of one step's ``items`` (``np.array_split`` over ranks); all in one process."""
    if not is_distributed():
        return items
    n, r = num_processes(), rank()
    bounds = [len(items) * q // n for q in range(n + 1)]
    return items[bounds[r] : bounds[r + 1]]


def shard_by_group(group_ids: Sequence[Any]) -> np.ndarray:
    """Positions of the conversations this rank takes: whole groups, dealt round-robin in order of first
    appearance (deterministic; a group is never split; the union over ranks is every position)."""
    codes: dict[Any, int] = {}
    group = np.array([codes.setdefault(g, len(codes)) for g in group_ids], dtype=np.int64)
    return np.flatnonzero(group % num_processes() == rank())


# ------------------------------------------------------------------------------------------- training


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
    """``accelerator.prepare(model, optimizer)`` under a launcher (DDP or FSDP per the config), the pair as
    it is in one process. Train through the returned model; the bare one is trained in place."""
    if not is_distributed():
        return model, optimizer
    if accelerator().distributed_type.name == "DEEPSPEED":
        raise RuntimeError(
            "DeepSpeed is not supported: its engine steps the optimiser inside backward, which does not fit "
            "itpo-batch's steps of a varying number of micro-batches; use configs/accelerate/fsdp2.yaml"
        )
    return accelerator().prepare(model, optimizer)


def release(model: nn.Module, optimizer: Any) -> None:
    """Forget a prepared pair (accelerate keeps references to every prepared object until told)."""
    if not is_distributed():
        return
    acc = accelerator()
    acc._models = [m for m in acc._models if m is not model]
    acc._optimizers = [o for o in acc._optimizers if o is not optimizer]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP/DeepSpeed the whole state dict gathered from the shards (a collective: every rank calls
    it; rank 0 gets it, for ``save_pretrained(state_dict=…)``); None otherwise (the module holds it whole)."""
    return accelerator().get_state_dict(model) if lockstep_forwards() else None


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` in one process; ``accelerator.backward`` of ``N · loss`` under a launcher, where
    ``loss`` is this rank's share of the global loss (DDP averages over ranks, this restores the sum)."""
    if not is_distributed():
        loss.backward()
    else:
        accelerator().backward(loss * num_processes())


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm before clipping (accelerate's under a launcher: FSDP-aware)."""
    if not is_distributed():
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return accelerator().clip_grad_norm_(params, max_norm)


def lockstep(items: Sequence[T], filler: T, model: nn.Module) -> Iterator[tuple[T, float, Any]]:
    """``(item, weight, context)`` for this rank's micro-batches of one step, padded with ``(filler, 0.0)``
    to the busiest rank's count; run each forward inside ``context`` (``no_sync`` but for the last one)."""
    count = len(items) if not is_distributed() else int(all_reduce(len(items), "max"))
    for k in range(count):
        last = k == count - 1
        ctx = contextlib.nullcontext() if last or not is_distributed() else accelerator().no_sync(model)
        yield (items[k], 1.0, ctx) if k < len(items) else (filler, 0.0, ctx)
