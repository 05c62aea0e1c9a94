"""Sites that release in their own covariate units (per-site public age ranges).

The hub converts each site's statistics exactly to common units
(:meth:`Scaling.conversion_to`); the expected numbers come from statsmodels on the pooled raw
rows, converted to the common units by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from fednipype.contract.scaling import Scaling
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import MetaAnalysisError
from fednipype.hub.regression import pooled_regression, site_estimates

TERMS = ("intercept", "age", "sex[M]")
RANGES = ((20.0, 40.0), (30.0, 70.0), (50.0, 90.0))
VOLUME = (0.0, 12000.0)


def _sites(rng: np.random.Generator, n: int = 200) -> list[tuple[np.ndarray, ...]]:
    sites = []
    for k, (lo, hi) in enumerate(RANGES):
        age = rng.uniform(lo, hi, n)
        male = (rng.random(n) < 0.5).astype(float)
        y = 6000.0 + 300.0 * k - 20.0 * (age - 55.0) + 150.0 * male + rng.normal(0, 400, n)
        sites.append((age, male, np.clip(y, *VOLUME)))
    return sites


def _scaling(bounds: tuple[float, float]) -> Scaling:
    return Scaling.from_bounds(
        numeric={"age": bounds}, dummies=["sex[M]"], regions={"roi": VOLUME}
    )


def _stats(site, scaling: Scaling, noise_sd: float = 0.0, rng=None) -> SufficientStatistics:
    age, male, y = site
    z = scaling.scale_design(np.column_stack([np.ones_like(age), age, male]), TERMS)
    ys = scaling.scale_response(y[:, None], ["roi"])
    ztz, zty, yty, n = z.T @ z, z.T @ ys, (ys**2).sum(0), float(len(age))
    if noise_sd:
        upper = np.triu(rng.normal(0.0, noise_sd, ztz.shape))
        ztz = ztz + upper + np.triu(upper, 1).T
        zty = zty + rng.normal(0.0, noise_sd, zty.shape)
        yty = yty + rng.normal(0.0, noise_sd, yty.shape)
    var = noise_sd**2
    return SufficientStatistics(
        TERMS, ("roi",), ztz, zty, yty, n, ztz_noise_var=var, zty_noise_var=var,
        yty_noise_var=var,
    )  # fmt: skip


def _converted(sites):
    scalings = [_scaling(r) for r in RANGES]
    common = Scaling.envelope(scalings, TERMS)
    units = [s.conversion_to(common, TERMS) for s in scalings]
    return scalings, common, units


def test_envelope_is_the_union_of_the_ranges():
    _, common, units = _converted(None)
    assert common.center("age") == pytest.approx(55.0)
    assert common.scale("age") == pytest.approx(35.0)
    d, e = units[0]
    # site 0 maps age 20..40 onto [-1, 1]: d = 10/35, e = (30 - 55)/35
    assert d.tolist() == pytest.approx([1.0, 10.0 / 35.0, 1.0])
    assert e.tolist() == pytest.approx([0.0, -25.0 / 35.0, 0.0])


def test_pooled_fit_in_site_units_equals_ols_on_common_rows():
    rng = np.random.default_rng(7)
    sites = _sites(rng)
    scalings, common, units = _converted(sites)
    stats = [_stats(site, s) for site, s in zip(sites, scalings, strict=True)]
    table = pooled_regression(stats, units=units).set_index("term")
    # statsmodels: site dummies (no constant) + common-unit covariates, pooled raw rows
    rows = pd.DataFrame(
        [
            {"site": k, "age": a, "male": m, "y": y}
            for k, site in enumerate(sites)
            for a, m, y in zip(*site, strict=True)
        ]
    )
    design = pd.get_dummies(rows["site"], prefix="site", dtype=float)
    design["age"] = (rows["age"] - common.center("age")) / common.scale("age")
    design["sex"] = 2.0 * rows["male"] - 1.0
    response = (rows["y"] - common.center("roi")) / common.scale("roi")
    fit = sm.OLS(response, design).fit()
    for term, column in (("age", "age"), ("sex[M]", "sex")):
        assert table.loc[term, "estimate"] == pytest.approx(fit.params[column], rel=1e-9)
        assert table.loc[term, "se"] == pytest.approx(fit.bse[column], rel=1e-9)
    weights = np.array([len(site[0]) for site in sites], dtype=float)
    contrast = np.zeros(len(fit.params))
    contrast[:3] = weights / weights.sum()
    test = fit.t_test(contrast)
    assert table.loc["intercept", "estimate"] == pytest.approx(
        float(np.squeeze(test.effect)), rel=1e-9
    )
    assert table.loc["intercept", "se"] == pytest.approx(float(np.squeeze(test.sd)), rel=1e-9)
    # and the same fit as releasing everyone in the common units
    same = pooled_regression([_stats(site, common) for site in sites]).set_index("term")
    np.testing.assert_allclose(table["estimate"], same["estimate"], rtol=1e-9)
    np.testing.assert_allclose(table["se"], same["se"], rtol=1e-9)


def test_site_estimates_in_site_units_equal_each_sites_ols_in_common_units():
    rng = np.random.default_rng(11)
    sites = _sites(rng)
    scalings, common, units = _converted(sites)
    stats = {
        f"s{k}": _stats(site, s) for k, (site, s) in enumerate(zip(sites, scalings, strict=True))
    }
    table = site_estimates(stats, units=dict(zip(stats, units, strict=True)))
    for k, (age, male, y) in enumerate(sites):
        z = np.column_stack(
            [np.ones_like(age), (age - common.center("age")) / common.scale("age"), 2 * male - 1]
        )
        fit = sm.OLS((y - common.center("roi")) / common.scale("roi"), z).fit()
        mine = table[table["site"] == f"s{k}"]
        np.testing.assert_allclose(mine["estimate"], fit.params, rtol=1e-9)
        np.testing.assert_allclose(mine["se"], fit.bse, rtol=1e-9)


def test_common_intercept_needs_common_units():
    sites = _sites(np.random.default_rng(3))
    scalings, _, units = _converted(sites)
    stats = [_stats(site, s) for site, s in zip(sites, scalings, strict=True)]
    with pytest.raises(MetaAnalysisError, match="common units"):
        pooled_regression(stats, units=units, site_effects=False)


@pytest.mark.slow
def test_noisy_site_units_intervals_cover():
    """95 % CIs of the pooled age slope cover the planted slope 93-97 % of 600 replicates.

    Each replicate draws new participants and new noise. Binomial(600, 0.95) falls outside
    [0.93, 0.97] with probability about 0.02 at the nominal rate; the seed is fixed, so the
    test is reproducible.
    """
    rng = np.random.default_rng(2024)
    scalings, common, units = _converted(None)
    planted = -20.0 * common.scale("age") / common.scale("roi")  # in common scaled units
    covered, reps = 0, 600
    for _ in range(reps):
        sites = _sites(rng, n=400)
        noisy = [_stats(site, s, 4.0, rng) for site, s in zip(sites, scalings, strict=True)]
        row = pooled_regression(noisy, units=units).set_index("term").loc["age"]
        covered += bool(row["ci_low"] <= planted <= row["ci_high"])
    assert 0.93 <= covered / reps <= 0.97
