"""The learning sanity check: every arm must lift a weak π_0 on the ``clarify`` task within a few rounds.

Issue 15 asked for a "CartPole" of this toolkit: a task where the better behaviour is plain and the tiny
model learns it in minutes, so that a broken update path shows up as a flat curve, whatever the unit
tests say. :mod:`itpo_batch.sim.envs.clarify` is that task (ask which option the user wants, then name
it); this module holds the recipe, shared by ``tests/test_sanity.py``, ``quickstart --task clarify`` and
``bench/sanity.py``:

- **π_0** (:func:`sanity_pi0`): the scripted policy at skill 0.1 (it asks first one time in ten) on
  2,048 requests of which half state the preference ("… I would like tea."), imitated by SFT without a
  filter (6 epochs). The explicit half teaches the one skill asking needs afterwards, naming a stated
  preference; on ambiguous requests π_0 asks about 12% of the time and succeeds about 0.27 (T = 1).
  With 1,024 requests × 4 epochs the copy after a question was right only 63% of the time and the
  arms plateaued near 0.5.
- **Rounds** (:func:`sanity_iterate_config`): ambiguous requests only (the task's defaults: 5 options,
  5% vague replies, no word cost), eight rounds of 32 conversations (4 cases × 8), AdamW lr 1e-4 with
  ε = 1e-5 and a linear warm-up over each round's first 4 steps, 4 epochs of mini-batches of 16 (8 steps
  a round), a KL budget of 0.03 to the collecting policy (the update stops at the first mini-batch past
  it; Iterative PPO keeps its own 0.05) and a k3 KL penalty to π_0 of 0.05; the default clip and entropy
  settings; evaluation on 64 fixed cases every round, sampled and greedy.
- **Why the warm-up and eight rounds** (2026-12, docs/results.md "Sanity: on another CPU"): every round
  starts a fresh AdamW, whose first step moves every weight by about lr whatever its gradient; on the
  tiny model one such step at 1e-4 could move the policy's own samples a whole nat per token from π_0
  before the KL budget could see it (rounds that took a single step, then stopped), and on another CPU
  the six-round recipe, tuned on one machine's seed 0, left a third of the arm-seed runs collapsed or
  short of the bar. Starting each round at lr/4 makes the first steps small enough for the budget to
  stop the update in time; learning is steadier and a little slower, hence eight rounds.
- **Why ε = 1e-5** (the official 1e-8 is kept as the package default): every round starts a fresh
  AdamW, whose first steps move each weight by about lr·g/(|g| + ε). The tiny model ties its input and
  output embeddings, and 90% of its 4,096 embedding rows (tokens that never occur in the batch) get
  gradients of only ~1e-8 through the softmax normaliser, against ~1e-4 for the other weights
  (``bench`` note in docs/results.md, "Sanity"); with ε = 1e-8 those rows move by about lr/2 each, all
  in the direction the normaliser pushes, and within a few rounds the policy's own T = 1 samples turn to
  broken text ("Here is yourg.", " bl w green.") 1–5 nats per token from π_0, while the KL on the
  training batch stays small. With ε = 1e-5 they move by ~lr/1000.
- **Measured on the way** (docs/results.md, "Sanity"): lr 1e-3 collapsed within two rounds; lr 3e-4
  without a KL budget let single rounds jump by 0.2–0.5 nats and three arms collapse; a linear LR warm-up
  over the first two steps of a round (tried with a temporary patch, not kept) did not prevent the drift; ε = 1e-5 with
  the official KL coefficient 0.001 still let two arms drift past 2 nats; ε = 1e-5 with 0.05 kept every
  arm below 0.6 nats per token and learning, but a single round could still drop an arm from 0.97 to
  0.06 greedy; lr 1e-4 with twice the steps keeps every arm but one below 0.35 nats per token and
  learns as fast over six rounds.
"""

from __future__ import annotations

from pathlib import Path

from itpo_batch.core.config import apply_overrides, from_mapping
from itpo_batch.model.sft import SFTConfig
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.pi0 import ScriptedPi0, SFTHook, scripted_pi0

PI0 = ScriptedPi0("clarify", n_logs=2048, skill=0.1, sft=SFTConfig(epochs=6, batch_tokens=1024),
                  settings={"explicit_rate": 0.5})  # fmt: skip
"How the sanity π_0 is made (module docstring)."
SANITY_ROUNDS = {
    "task": "clarify", "n": 32, "group_size": 8, "max_new_tokens": 16, "rollout_batch": 32,
    "update": {"lr": 1e-4, "mini_batch": 16, "epochs": 4, "eps": 1e-5, "kl_budget": 0.03, "warmup_steps": 4,
               "loss": {"kl_coef": 0.05}},
    "ippo": {"max_states": 32, "samples_per_state": 4, "max_new_tokens": 16,
             "update": {"lr": 1e-4, "mini_batch": 32, "epochs": 4, "eps": 1e-5, "warmup_steps": 4}},
    "eval": {"n": 64, "max_new_tokens": 16, "sampled_every": 1, "greedy_every": 1},
}  # fmt: skip
"The rounds' settings over IterateConfig's defaults (module docstring); unnamed keys keep their defaults."


def sanity_pi0(out: Path, seed: int = 0, sft_step: SFTHook | None = None) -> Path:
    """Build (or reuse) the sanity π_0 in ``out/pi0`` from scripted logs in ``out/scripted.parquet``."""
    return scripted_pi0(PI0, out / "scripted.parquet", out / "pi0", seed=seed, sft_step=sft_step)


def sanity_iterate_config(pi0: Path | str, methods: list[str], rounds: int = 8, seed: int = 0,
                          overrides: list[str] | None = None) -> IterateConfig:  # fmt: skip
    """The sanity rounds for ``methods`` from ``pi0`` (``overrides``: ``key.sub=value`` strings)."""
    base = SANITY_ROUNDS | {"rounds": rounds, "methods": methods, "model": str(pi0), "seed": seed}
    return from_mapping(IterateConfig, apply_overrides(base, overrides or []))
