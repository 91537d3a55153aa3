"""Stage 5, sim: simulated tasks (``envs``), batched multi-turn rollouts, user simulators and the
OpenAI-compatible server. Imports ``core``, ``data`` and ``model``.
"""
