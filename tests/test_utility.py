"""Utility of the DP sufficient statistics at ε = 1 per site, on cohorts large enough for it.

The bundled sites (24–45 participants) are far too small for ε = 1 (bench/privacy_utility.py
measures how far). This test takes the planted effects of three regions from the bundled
ground truth, simulates regional volumes of 10 sites × 5000 participants from them, releases
each site's sufficient statistics with real OpenDP noise at ε = 1, δ = 1e-5 per site, and pools
them as the coordinator does. The simulated features come from a seeded numpy generator (test
data, not DP noise); the DP noise is OpenDP's and cannot be seeded, so every assertion is
statistical: each estimate must lie within 6 of its own standard errors of the planted value,
and its sign must be right (the planted effects are at least 8 standard errors from zero here),
a false-alarm rate below 1e-6 for the whole test (Bonferroni over 9 estimates).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy.stats import norm
from support import BUNDLED

from fednipype.contract.scaling import Scaling
from fednipype.hub.regression import pooled_regression
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.mechanisms import prepare_sufficient_statistics

REGIONS = ["L_P12", "R_P12", "L_P27"]
TERMS = ["intercept", "age", "sex[M]", "group[patient]"]
AGE_BOUNDS = (18.0, 90.0)
Y_BOUNDS = (0.0, 12000.0)


def _truth():
    regions = {
        r["name"]: r for r in json.loads((BUNDLED / "ground_truth.json").read_text())["regions"]
    }
    return {name: regions[name] for name in REGIONS}


def test_epsilon_one_recovers_planted_effects_with_large_sites(tmp_path):
    truth = _truth()
    rng = np.random.default_rng(20261128)
    age_c, age_s = (AGE_BOUNDS[0] + AGE_BOUNDS[1]) / 2, (AGE_BOUNDS[1] - AGE_BOUNDS[0]) / 2
    y_c, y_s = (Y_BOUNDS[0] + Y_BOUNDS[1]) / 2, (Y_BOUNDS[1] - Y_BOUNDS[0]) / 2
    stats = {}
    for site in range(10):
        n = 5000
        lo = rng.uniform(20, 35)
        age = rng.uniform(lo, lo + 50, n)
        male = rng.integers(0, 2, n).astype(float)
        patient = rng.integers(0, 2, n).astype(float)
        offset = rng.normal(0, 0.02)
        y = np.column_stack(
            [
                truth[r]["baseline_volume_mm3"] * (1 + offset + rng.normal(0, 0.02, n))
                + truth[r]["age_slope_mm3_per_year"] * (age - 50)
                + truth[r]["male_mm3"] * male
                + truth[r]["patient_mm3"] * patient
                for r in REGIONS
            ]
        )
        z = np.column_stack([np.ones(n), (age - age_c) / age_s, 2 * male - 1, 2 * patient - 1])
        ledger = PrivacyLedger.create(tmp_path / f"site{site}.sqlite", f"site{site}", 1.0, 1e-5)
        prepared = prepare_sufficient_statistics(
            z,
            (y - y_c) / y_s,
            ([1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]),
            ([-1.0] * len(REGIONS), [1.0] * len(REGIONS)),
            1.0,
            1e-5,
            terms=TERMS,
            regions=REGIONS,
            max_participants=10_000,
        )
        with ledger.reserve(1.0, 1e-5, "utility test", prepared.audit_parameters()) as spend:
            stats[f"site{site}"] = prepared.release(spend)
    scaling = Scaling.from_bounds(
        numeric={"age": AGE_BOUNDS},
        dummies=TERMS[2:],
        regions=dict.fromkeys(REGIONS, Y_BOUNDS),
    )
    table = scaling.unscale(pooled_regression(stats)).set_index(["region", "term"])

    keys = {"age": "age_slope_mm3_per_year", "sex[M]": "male_mm3", "group[patient]": "patient_mm3"}
    z_limit = norm.isf(1e-6 / 2 / 9)  # two-sided, Bonferroni over 9 estimates: ≈ 5.9
    rows = []
    for region in REGIONS:
        for term, key in keys.items():
            est, se = table.loc[(region, term), ["estimate", "se"]]
            planted = truth[region][key]
            rows.append((region, term, planted, est, se))
            assert abs(est - planted) < z_limit * se, (region, term, planted, est, se)
            assert np.sign(est) == np.sign(planted), (region, term, planted, est, se)
            assert abs(planted) > 8 * se  # the design has the power the claim needs
    print(pd.DataFrame(rows, columns=["region", "term", "planted", "estimate", "se"]))
