"""Foundations every stage may import: errors, registries, typed YAML configs, seed derivation.

Nothing here imports another stage of ``itpo_batch``.
"""
