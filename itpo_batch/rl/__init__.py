"""Stage 4, rl: advantage estimators (RLOO/GRPO/PPO) and the method registry (arms), the PPO-style loss,
the policy update, the critic, and Iterative PPO. Imports ``core``, ``data``, ``model`` and ``credit``.
"""
