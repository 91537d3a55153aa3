"""itpo-batch: turn-level credit (implicit PRM / ITPO) and batch policy improvement from logged conversations.

Stages, one module each: ``logs``/``validate`` (read, check, normalise) → ``render`` (messages → ids,
assistant mask, turn ids) → ``packing`` (padding-free buffers) → ``logprobs`` (packed, chunked) →
``prm`` (implicit PRM) → ``credit`` (turn rewards) → ``qvalue`` (turn Q-values) → ``score`` → ``store`` /
``sql`` (run directory, DuckDB). ``envs`` + ``rollout`` + ``users`` simulate logs; ``sft`` warm-starts a
policy; ``models``/``tiny`` load models and build the embedded default.
"""

__version__ = "0.1.0"
