"""itpo-batch: turn-level credit (implicit PRM / ITPO) and batch policy improvement from logged conversations.

Stages, one module each: ``logs``/``validate`` (read, check, normalise) → ``render`` (messages → ids,
assistant mask, turn ids) → ``packing`` (padding-free buffers) → ``models``/``tiny`` (loaders, the
embedded default model). Later stages (PRM, credit, Q-values, rounds) build on these.
"""

__version__ = "0.1.0"
