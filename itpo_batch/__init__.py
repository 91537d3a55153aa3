"""itpo-batch: turn-level credit (implicit PRM / ITPO) and batch policy improvement from logged conversations.

One sub-package per stage; imports point only down this flow (``tests/test_architecture.py`` checks it)::

    core     errors, registries, typed YAML configs, seed derivation          (used by every stage)
      ↓
    data     logs → validate → Logs; data contracts; atomic io; run directory; DuckDB views
      ↓
    model    load HF models / the embedded tiny; render (ids, assistant mask, turn ids); packing;
             packed log-probs; generation; the training-loop helper; SFT
      ↓
    credit   implicit PRM (PRIME) → ITPO / Norm-ITPO / PRIME turn credit; turn Q-values; oracle
             alignment; ``score``
      ↓
    rl       advantage estimators and arms (registries); PPO-style loss; policy update; critic;
             Iterative PPO
      ↓
    sim      simulated tasks, user simulators, batched multi-turn rollouts, OpenAI-compatible server
      ↓
    run      ``iterate``: config, context, arm state and step, rounds, evaluation, report, quickstart
      ↓
    cli      the typer app (``itpo-batch``), parsing only
"""

__version__ = "0.1.0"
