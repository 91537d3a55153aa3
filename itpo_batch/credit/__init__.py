"""Stage 3, credit: turn-level credit from the outcome alone.

``prm`` (with ``prm_data`` and ``prm_metrics``) fits the implicit PRM (PRIME); ``turns`` turns token
rewards into ITPO / Norm-ITPO / PRIME turn rewards; ``qvalue`` fits turn Q-values; ``alignment`` and
``stats`` measure agreement with the oracle; ``score`` is the ``score`` command's pipeline.
Imports ``core``, ``data`` and ``model``.
"""
