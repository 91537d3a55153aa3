"""95% t-intervals without scipy (and without torch: the report imports this, not the models).

:func:`t_quantile_975` reads a table for df 1..30 (bisection on the exact
integer-df t CDF of Abramowitz & Stegun 26.7.3-4, 6 decimals) and uses the Cornish-Fisher expansion
(A&S 26.7.5, four terms) beyond; at df = 30 the two agree to 3e-5 and the expansion's CDF error is
below 1e-8 there, so there is no jump at the switch (a plain normal 1.96 would be 4% narrow at df 31).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# two-sided 95% (one-sided 0.975) quantiles of Student's t, df = 1..30
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
Z975 = 1.959963984540054  # standard normal 0.975 quantile
NAN = float("nan")


def t_quantile_975(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[int(df) - 1]
    z, v = Z975, float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t·sd/√n with ``sd`` at ddof=1; (x, nan, nan) for n = 1, all nan for n = 0.

    Only ``level=0.95`` is supported (the one t quantile shipped); it is a parameter so callers say it.
    Identical values give a zero-width interval exactly. Non-finite values raise.
    """
    if level != 0.95:
        raise ValueError(f"only level=0.95 is supported, got {level}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("mean_ci got non-finite values")
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size == 1:
        return mean, NAN, NAN
    sd = 0.0 if x.min() == x.max() else float(x.std(ddof=1))
    half = t_quantile_975(x.size - 1) * sd / math.sqrt(x.size)
    return mean, mean - half, mean + half
