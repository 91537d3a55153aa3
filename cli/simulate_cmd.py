"""``itpo-batch simulate``: logs from a built-in simulated task, played by a scripted or HF policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pyarrow.parquet as pq
import typer

from itpo_batch.cli.common import OverwriteOpt, from_config, out, user_errors
from itpo_batch.core.config import apply_overrides
from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import claim_output
from itpo_batch.data.validate import read_logs
from itpo_batch.sim.envs.base import load_task

if TYPE_CHECKING:
    from itpo_batch.sim.rollout import RolloutConfig


def _rollout() -> RolloutConfig:
    """The defaults (imported on demand: itpo_batch.sim.rollout imports torch)."""
    from itpo_batch.sim.rollout import RolloutConfig

    return RolloutConfig()


@user_errors
def simulate(
    task: Annotated[
        str,
        typer.Option(
            "--task", "-t", help="medical, math, docwrite, clarify, or module:Class for your own task."
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Parquet file to write (nested logs shape).")
    ],
    overwrite: OverwriteOpt = False,
    n: Annotated[int, typer.Option(help="Number of conversations.")] = from_config(lambda: _rollout().n),
    policy: Annotated[
        str, typer.Option(help="'scripted', 'tiny', 'smollm2', or a local HF model directory.")
    ] = "scripted",
    group_size: Annotated[
        int, typer.Option(help="Conversations per hidden case (RLOO/GRPO groups).")
    ] = from_config(lambda: _rollout().group_size),
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical logs.")] = from_config(
        lambda: _rollout().seed
    ),
    skill: Annotated[
        float, typer.Option(help="Scripted policy: probability of a useful action.")
    ] = from_config(lambda: _rollout().skill),
    user: Annotated[str, typer.Option(help="User simulator: rule, hf:PATH|smollm2, openai:URL.")] = "rule",
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = from_config(
        lambda: _rollout().temperature
    ),
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = from_config(lambda: _rollout().top_p),
    max_new_tokens: Annotated[int, typer.Option(help="Max tokens per assistant turn.")] = from_config(
        lambda: _rollout().max_new_tokens
    ),
    max_turns: Annotated[
        int | None, typer.Option(help="Max assistant turns per conversation (default: the task's).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Conversations generated together (HF policies).")
    ] = from_config(lambda: _rollout().batch_size),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Task setting KEY=VALUE, as in iterate: task_settings.n_diseases=6."),
    ] = None,
) -> None:
    """Simulate conversations and write them as logs that `validate`, `sft` and `score` read.

    Example: itpo-batch simulate --task medical --n 512 --policy scripted --group-size 8 -o logs.parquet
    """
    from itpo_batch.sim.rollout import (  # torch: import lazily
        HFPolicy,
        RolloutConfig,
        ScriptedPolicy,
        rollout,
    )
    from itpo_batch.sim.users import parse_user

    if n < 1 or group_size < 1:
        raise ItpoError("--n and --group-size must be positive")
    claim = claim_output(output, "file", "simulate", overwrite=overwrite)
    env = load_task(task, settings=task_settings(set_, max_turns))
    cfg = RolloutConfig(
        n=n, group_size=group_size, seed=seed, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, skill=skill,
    )  # fmt: skip
    actor = ScriptedPolicy(env, skill) if policy == "scripted" else HFPolicy.from_pretrained(policy, cfg)
    table = rollout(env, actor, cfg, user=parse_user(user), progress=True)
    with claim.atomic() as tmp:
        pq.write_table(table, tmp, compression="zstd")
        logs = read_logs(
            [tmp]
        )  # what we write passes the same contract as any user's logs, or is not written
    s = logs.report.summary
    out.print(
        f"wrote {output}: {s['conversations']} conversations, {s['assistant_turns']} assistant turns, "
        f"outcome mean {s['outcome']['mean']:.3f}"
    )


def task_settings(overrides: list[str] | None, max_turns: int | None) -> dict[str, Any]:
    """The task settings of ``--set task_settings.KEY=VALUE`` (the only section simulate has) and ``--max-turns``."""
    data = apply_overrides({}, overrides or [])
    other = sorted(set(data) - {"task_settings"})
    if other or not isinstance(data.get("task_settings", {}), dict):
        bad = ", ".join(other) or "task_settings"
        raise ItpoError(f"simulate --set takes task_settings.KEY=VALUE only, not {bad}")
    settings = dict(data.get("task_settings", {}))
    if max_turns is not None:
        settings["max_assistant_turns"] = max_turns
    return settings
