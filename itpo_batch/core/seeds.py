"""One seed derivation for every seeded component.

Every random stream of a run (cases, sampling, shuffles, initialisations, held-out splits) takes its seed
from :func:`derived_seed` of the run's seed and a tuple naming the stream, e.g.
``derived_seed(seed, "rollout", round)`` or ``derived_seed(seed, method, round, "prm")``. Python's
``hash`` is salted per process, so a keyed BLAKE2b digest is used instead: the same parts give the same
seed in every process, which exact ``--resume`` and multi-process runs depend on.
"""

from __future__ import annotations

import hashlib
from typing import Any


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)
