"""Intervals from real releases cover at their nominal rate: n released once, the pooled fit.

Each replicate releases ten simulated sites through the real mechanism (OpenDP noise, n
released once and set on the intercept's and the ±1 dummies' ZᵀZ diagonal, which then share
its noise) and pools them with site intercepts. The truth is the simulation's; the acceptance
band 93–97 % is more than 4 binomial standard errors wide on each side.
"""

from __future__ import annotations

import numpy as np

from fednipype.contract.calibration import sufficient_statistics_sensitivity
from fednipype.hub.regression import pooled_regression, site_estimates
from fednipype.site.mechanisms import prepare_sufficient_statistics

TERMS = ("intercept", "age", "sex[M]", "group[patient]")
N_TERMS = ("intercept", "sex[M]", "group[patient]")
REGIONS = ("r1", "r2")
SLOPES = {"r1": (0.08, -0.05, 0.10), "r2": (-0.06, 0.04, -0.12)}
BOUNDS = (([1.0, -1.0, -1.0, -1.0], [1.0] * 4), ([-1.0, -1.0], [1.0, 1.0]))


def _site(rng: np.random.Generator, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
    z = np.column_stack(
        [
            np.ones(n),
            rng.uniform(-1, 1, n),
            rng.choice([-1.0, 1.0], n),
            rng.choice([-1.0, 1.0], n),
        ]
    )
    offset = rng.uniform(-0.2, 0.2)
    y = np.column_stack(
        [offset + z[:, 1:] @ np.array(SLOPES[r]) + rng.normal(0, 0.05, n) for r in REGIONS]
    )
    return z, np.clip(y, -1, 1)


def test_n_is_released_once():
    rng = np.random.default_rng(0)
    z, y = _site(rng)
    prepared = prepare_sufficient_statistics(
        z, y, *BOUNDS, 1.0, 1e-5, terms=TERMS, regions=REGIONS, max_participants=1000,
        n_terms=N_TERMS,
    )  # fmt: skip
    layout = prepared.mechanism.released
    assert layout.count("n") == 1
    assert not {f"ztz:{t}:{t}" for t in N_TERMS} & set(layout)
    assert "ztz:age:age" in layout
    # Sensitivity: 1 (n) + 7 of ZᵀZ's 10 upper entries + 8 of Zᵀy + 2 of yᵀy, all at most 1.
    assert prepared.mechanism.sensitivity == np.sqrt(18.0)
    assert np.sqrt(18.0) == sufficient_statistics_sensitivity(*BOUNDS, [0, 2, 3])
    stats = prepared._draw()
    assert stats.ztz[0, 0] == stats.ztz[2, 2] == stats.ztz[3, 3] == stats.n


def test_pooled_intervals_cover_with_n_released_once():
    rng = np.random.default_rng(20261129)
    sites = [_site(rng) for _ in range(10)]
    covered, total = 0, 0
    site_covered, site_total = 0, 0
    for _ in range(400):
        released = [
            prepare_sufficient_statistics(
                z, y, *BOUNDS, 1.0, 1e-5, terms=TERMS, regions=REGIONS,
                max_participants=1000, n_terms=N_TERMS,
            )._draw()
            for z, y in sites
        ]  # fmt: skip
        table = pooled_regression(released).set_index(["region", "term"])
        for region, slopes in SLOPES.items():
            for term, truth in zip(TERMS[1:], slopes, strict=True):
                low, high = table.loc[(region, term), ["ci_low", "ci_high"]]
                covered += bool(low <= truth <= high)
                total += 1
        per_site = site_estimates(released[:2])  # each site's own fit, as the forest plots
        for row in per_site[per_site["term"] != "intercept"].itertuples():
            truth = SLOPES[row.region][TERMS.index(row.term) - 1]
            site_covered += bool(row.ci_low <= truth <= row.ci_high)
            site_total += 1
    assert total == 2400 and site_total == 4800
    assert 0.93 <= covered / total <= 0.97, covered / total
    assert 0.93 <= site_covered / site_total <= 0.97, site_covered / site_total
