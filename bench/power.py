"""Power to detect Δ = +0.05 over π_0 (docs/results.md, "Power"), by simulation; prints a markdown table.

The per-case paired sd of Δ (π_k − π_0 on the same cases and user draws) is 0.40: from the 256-case
paired evaluation of the earlier quickstart policies (95% half-widths 0.045–0.052 → sd = hw·√256/1.97).
One run, per-case paired t-interval: n = ((z_.975 + z_.8)·sd/δ)² cases for 80% power. Several seeds,
each with its own evaluation cases: each seed's Δ ~ N(δ, sd²/n + σ_train²), and the report's t-interval
across seeds (df = seeds − 1) must exclude zero; simulated 20,000 times per cell.

    python bench/power.py
"""

import numpy as np

from itpo_batch.run.intervals import t_quantile_975

sd_case, delta, sims = 0.40, 0.05, 20000
rng = np.random.default_rng(0)
print(
    "one run, per-case paired: cases for 80% power =", round(((1.959964 + 0.841621) * sd_case / delta) ** 2)
)
print("| training-seed sd | seeds | 256 cases | 512 | 1024 |\n|---|---:|---:|---:|---:|")
for sig in (0.0, 0.02, 0.04):
    for k in (3, 5, 10):
        cells = []
        for n in (256, 512, 1024):
            se = np.sqrt(sd_case**2 / n + sig**2)
            d = rng.normal(delta, se, size=(sims, k))
            m, s = d.mean(1), d.std(1, ddof=1)
            lo = m - t_quantile_975(k - 1) * s / np.sqrt(k)
            cells.append(f"{(lo > 0).mean():.2f}")
        print(f"| {sig} | {k} | " + " | ".join(cells) + " |")
