"""Tests of the DP statistics: calibration, noise variance, empirical privacy, sufficient stats.

Noisy outputs are tested statistically; every such test states its false-alarm rate (at most
1e-6), so the suite does not flake. Reference numbers come from scipy, dp-accounting, numpy or
the published value, never from the code under test.
"""

import itertools
import math

import numpy as np
import opendp.prelude as dp
import pandas as pd
import pytest
from dp_accounting import gaussian_mechanism
from dp_accounting.pld import accountant, common
from scipy import stats

from fednipype.exceptions import DisclosureError, FednipypeError, PolicyError
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.mechanisms import (
    STATISTICS,
    BudgetSplit,
    add_gaussian_noise,
    analytic_gaussian_sigma,
    dp_count,
    dp_group_means,
    dp_histogram,
    dp_mean,
    dp_sufficient_statistics,
    dp_variance,
    prepare,
    sufficient_statistics_sensitivity,
)

dp.enable_features("contrib")

FALSE_ALARM = 1e-6


def exact_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Balle & Wang (2018) Theorem 8, written directly with scipy's normal cdf."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return stats.norm.cdf(a - b) - math.exp(epsilon) * stats.norm.cdf(-a - b)


# -- calibration ------------------------------------------------------------------------------


def test_analytic_sigma_published_value():
    sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0
    assert abs(sigma - 3.7306) < 5e-5
    assert abs(classic - 4.8448) < 5e-5
    assert sigma < classic


@pytest.mark.parametrize(
    ("epsilon", "delta", "sensitivity"),
    [
        (0.1, 1e-6, 1.0),
        (0.5, 1e-5, 7.0),
        (1.0, 1e-5, 1.0),
        (2.0, 1e-8, 0.3),
        (5.0, 1e-3, 1.0),
        (10.0, 1e-10, 2.5),
    ],
)
def test_analytic_sigma_meets_balle_wang_with_equality(epsilon, delta, sensitivity):
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    achieved = exact_delta(sigma, epsilon, sensitivity)
    assert achieved <= delta * (1 + 1e-9)
    assert achieved >= delta * (1 - 1e-6)  # not larger than needed
    # Two independent implementations in dp-accounting agree.
    pld = accountant.get_smallest_gaussian_noise(
        common.DifferentialPrivacyParameters(epsilon, delta), sensitivity=sensitivity
    )
    closed = gaussian_mechanism.get_sigma_gaussian(epsilon, delta) * sensitivity
    assert sigma == pytest.approx(pld, rel=1e-7)
    assert sigma == pytest.approx(closed, rel=1e-9)
    # Linear in the sensitivity.
    assert sigma == pytest.approx(sensitivity * analytic_gaussian_sigma(epsilon, delta, 1.0))


@pytest.mark.parametrize(
    ("epsilon", "delta", "sensitivity", "match"),
    [
        (0.0, 1e-5, 1.0, "epsilon"),
        (-1.0, 1e-5, 1.0, "epsilon"),
        (math.nan, 1e-5, 1.0, "epsilon"),
        (math.inf, 1e-5, 1.0, "epsilon"),
        (1.0, 0.0, 1.0, "delta must be > 0"),
        (1.0, 1.0, 1.0, "delta"),
        (1.0, math.nan, 1.0, "delta"),
        (1.0, 1e-5, 0.0, "l2_sensitivity"),
        (1.0, 1e-5, math.inf, "l2_sensitivity"),
    ],
)
def test_analytic_sigma_refuses_bad_parameters(epsilon, delta, sensitivity, match):
    with pytest.raises(PolicyError, match=match):
        analytic_gaussian_sigma(epsilon, delta, sensitivity)


def test_laplace_scale_agrees_with_opendp_map():
    data = np.linspace(0, 1, 50)
    for epsilon in (0.3, 0.7, 1.9):
        mech = dp_histogram(data, [0, 0.5, 1], epsilon).mechanism
        assert mech.name == "laplace" and mech.sensitivity == 1.0
        assert mech.noise_scale == pytest.approx(1.0 / epsilon, rel=1e-12)
        meas = dp.m.make_laplace(
            dp.vector_domain(dp.atom_domain(T=float, nan=False)),
            dp.l1_distance(T=float),
            scale=mech.noise_scale,
        )
        assert meas.map(1.0) <= epsilon


# -- noise variance ----------------------------------------------------------------------------


def test_gaussian_noise_variance_matches_stated_variance():
    """Sum of squared standardised errors over many releases is chi-square.

    Each of 800 releases of sufficient statistics (p=3 terms, r=3 regions) gives 19 independent
    noisy entries (n, 6 of Z^T Z's upper triangle, 9 of Z^T Y, 3 of y^T y). For each block the
    sum of (error^2 / stated variance) must lie in the chi-square acceptance band; two-sided,
    Bonferroni over the 4 blocks: false-alarm rate 1e-6 in total.
    """
    rng = np.random.default_rng(1)
    n = 60
    z = np.column_stack([np.ones(n), rng.uniform(-1, 1, n), rng.integers(0, 2, n)])
    y = rng.uniform(0, 1, (n, 3))
    z_bounds = ([1, -1, 0], [1, 1, 1])
    y_bounds = ([0, 0, 0], [1, 1, 1])
    iu = np.triu_indices(3)
    exact = {"n": np.array([n]), "ztz": (z.T @ z)[iu], "zty": z.T @ y, "yty": (y**2).sum(0)}
    chi = dict.fromkeys(exact, 0.0)
    releases = 800
    for _ in range(releases):
        res = dp_sufficient_statistics(z, y, z_bounds, y_bounds, 1.0, 1e-5)
        assert np.array_equal(res.ztz, res.ztz.T)
        got = {"n": np.array([res.n]), "ztz": res.ztz[iu], "zty": res.zty, "yty": res.yty}
        stated = {
            "n": res.n_noise_var,
            "ztz": res.ztz_noise_var,
            "zty": res.zty_noise_var,
            "yty": res.yty_noise_var,
        }
        for key in exact:
            chi[key] += float(np.sum((got[key] - exact[key]) ** 2) / stated[key])
    sensitivity = sufficient_statistics_sensitivity(z_bounds, y_bounds)
    sigma = gaussian_mechanism.get_sigma_gaussian(1.0, 1e-5) * sensitivity
    assert res.ztz_noise_var == pytest.approx(sigma**2, rel=1e-9)
    alpha = FALSE_ALARM / (2 * len(chi))
    for key, value in chi.items():
        df = releases * exact[key].size
        lo, hi = stats.chi2.ppf(alpha, df), stats.chi2.isf(alpha, df)
        assert lo < value < hi, (key, value / df, lo / df, hi / df)


def test_laplace_noise_variance_matches_stated_variance():
    """|Laplace(b)| is Exponential(b): the sum of |error| / b over N draws is Gamma(N, 1).

    800 histograms of 8 bins at epsilon=0.5 (b = 2, stated variance 2 b^2 = 8); the sum is
    tested against the Gamma acceptance band, two-sided at false-alarm rate 1e-6, and the
    sample variance is reported alongside.
    """
    rng = np.random.default_rng(2)
    values = rng.uniform(0, 8, 200)
    edges = np.arange(9.0)
    exact, _ = np.histogram(values, bins=edges)
    draws = np.array([dp_histogram(values, edges, 0.5).value - exact for _ in range(800)])
    stated = dp_histogram(values, edges, 0.5).noise_var
    assert np.allclose(stated, 8.0, rtol=1e-12)
    b = math.sqrt(stated[0] / 2)
    total = float(np.abs(draws).sum() / b)
    lo = stats.gamma.ppf(FALSE_ALARM / 2, draws.size)
    hi = stats.gamma.isf(FALSE_ALARM / 2, draws.size)
    assert lo < total < hi, (total / draws.size, lo / draws.size, hi / draws.size)


def test_mean_with_released_count_noise_variance():
    """With a released count, the mean's noise variance is exactly sigma^2 / n~^2.

    1500 releases; the sum of squared standardised errors is chi-square(1500); two-sided
    acceptance band at false-alarm rate 1e-6.
    """
    rng = np.random.default_rng(3)
    x = rng.uniform(4, 6, (200, 1))
    n_public = 197.3  # e.g. a count released earlier
    target = 5.0 + (x - 5.0).sum() / n_public
    chi = 0.0
    for _ in range(1500):
        res = dp_mean(x, (0, 10), 1.0, 1e-5, released_n=n_public)
        chi += float((res.value[0] - target) ** 2 / res.noise_var[0])
    # Half-width 5, no count released: sensitivity 5 (reference sigma from dp-accounting).
    sigma = gaussian_mechanism.get_sigma_gaussian(1.0, 1e-5) * 5.0
    assert res.noise_var[0] == pytest.approx(sigma**2 / n_public**2, rel=1e-9)
    lo, hi = stats.chi2.ppf(FALSE_ALARM / 2, 1500), stats.chi2.isf(FALSE_ALARM / 2, 1500)
    assert lo < chi < hi


# -- empirical privacy -------------------------------------------------------------------------


EPSILON, DELTA = 1.0, 1e-5
THRESHOLDS = np.linspace(0.85, 1.16, 63)


def violations(out_d: np.ndarray, out_d2: np.ndarray) -> tuple[int, float]:
    """Count sets S where P[M(D) in S] <= e^eps P[M(D') in S] + delta is rejected.

    Sets are half-lines (-inf, t] and (t, inf) over fixed thresholds, both directions (D vs
    D' and D' vs D). For each, a one-sided Clopper-Pearson lower bound of the first probability
    and upper bound of the second, each at level alpha; if the true probabilities satisfy the
    inequality, a rejection needs one bound to fail, so the false-alarm rate is at most
    2 * alpha * (number of sets * 2). alpha is set so the total is 1e-6.
    Returns the number of rejected sets and the largest margin L - (e^eps U + delta).
    """
    n_tests = len(THRESHOLDS) * 2 * 2
    alpha = FALSE_ALARM / (2 * n_tests)
    rejected, worst = 0, -math.inf
    for first, second in ((out_d, out_d2), (out_d2, out_d)):
        for t in THRESHOLDS:
            for side in (0, 1):
                k1 = int(np.sum(first <= t)) if side == 0 else int(np.sum(first > t))
                k2 = int(np.sum(second <= t)) if side == 0 else int(np.sum(second > t))
                n1, n2 = first.size, second.size
                lower = stats.beta.ppf(alpha, k1, n1 - k1 + 1) if k1 > 0 else 0.0
                upper = stats.beta.isf(alpha, k2 + 1, n2 - k2) if k2 < n2 else 1.0
                margin = lower - (math.exp(EPSILON) * upper + DELTA)
                worst = max(worst, margin)
                rejected += margin > 0
    return rejected, worst


def neighbours() -> tuple[np.ndarray, np.ndarray]:
    """D: 100 participants at the bounds' midpoint; D': D plus one at the upper bound.

    With bounds [0, 2], the released vector (centred sum, count) moves by (1, 1): its full
    L2 sensitivity sqrt(2).
    """
    d = np.ones((100, 1))
    return d, np.vstack([d, [[2.0]]])


def test_empirical_privacy_of_dp_mean():
    """The real mechanism passes; false-alarm rate 1e-6 (see :func:`violations`)."""
    d, d2 = neighbours()
    draws = 4000
    out_d = np.array([dp_mean(d, (0, 2), EPSILON, DELTA).value[0] for _ in range(draws)])
    out_d2 = np.array([dp_mean(d2, (0, 2), EPSILON, DELTA).value[0] for _ in range(draws)])
    rejected, worst = violations(out_d, out_d2)
    assert rejected == 0, worst
    assert worst < 0


def test_empirical_privacy_flags_a_broken_mechanism():
    """The same test rejects the mean with noise scaled by 0.1 (same OpenDP sampler).

    At this scale the shift between D and D' is ~1.9 noise sd: the exact delta at epsilon=1
    is ~0.46; after the Clopper-Pearson allowance the best set still exceeds the bound by
    ~0.27 (observed 0.24-0.29), over ten standard errors, with 1500 draws per dataset.
    """
    d, d2 = neighbours()
    sigma = analytic_gaussian_sigma(EPSILON, DELTA, math.sqrt(2.0))
    broken = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)),
        dp.l2_distance(T=float),
        scale=0.1 * sigma,
    )

    def broken_mean(x: np.ndarray) -> float:
        centred = np.clip(x, 0, 2) - 1.0
        s, n = broken([float(centred.sum()), float(len(x))])
        return float(np.clip(1.0 + s / max(n, 1.0), 0, 2))

    out_d = np.array([broken_mean(d) for _ in range(1500)])
    out_d2 = np.array([broken_mean(d2) for _ in range(1500)])
    rejected, worst = violations(out_d, out_d2)
    assert rejected > 0, worst


# -- sufficient statistics ---------------------------------------------------------------------


Z_BOUNDS = ([1.0, -3.0, 0.0], [1.0, 2.0, 1.0])  # intercept, a covariate, a 0/1 dummy
Y_BOUNDS = ([-1.0, 0.5], [4.0, 2.0])


def brute_force_sensitivity(z_bounds, y_bounds) -> float:
    """Max over the corners of the bounds box of the norm of one row's contribution."""
    corners = itertools.product(*zip(*z_bounds, strict=True), *zip(*y_bounds, strict=True))
    p = len(z_bounds[0])
    best = 0.0
    for corner in corners:
        z, y = np.array(corner[:p]), np.array(corner[p:])
        vec = [1.0]
        vec += [z[i] * z[j] for i in range(p) for j in range(i, p)]
        vec += [zi * yk for zi in z for yk in y]
        vec += [yk**2 for yk in y]
        best = max(best, float(np.linalg.norm(vec)))
    return best


def test_sensitivity_equals_brute_force_over_corners():
    expected = brute_force_sensitivity(Z_BOUNDS, Y_BOUNDS)
    assert sufficient_statistics_sensitivity(Z_BOUNDS, Y_BOUNDS) == pytest.approx(expected)
    rng = np.random.default_rng(4)
    z = rng.uniform(Z_BOUNDS[0], Z_BOUNDS[1], (30, 3))
    y = rng.uniform(Y_BOUNDS[0], Y_BOUNDS[1], (30, 2))
    res = dp_sufficient_statistics(z, y, Z_BOUNDS, Y_BOUNDS, 1.0, 1e-5)
    assert res.mechanism.sensitivity == pytest.approx(expected, rel=1e-12)
    assert res.mechanism.noise_scale == pytest.approx(
        gaussian_mechanism.get_sigma_gaussian(1.0, 1e-5) * expected, rel=1e-9
    )


def test_sufficient_statistics_converge_and_are_clamped():
    """At huge epsilon the noisy statistics equal numpy's on the clamped rows.

    Tolerance: |error| < z * sigma with z for a two-sided 1e-6 false-alarm rate, Bonferroni
    over every released entry.
    """
    rng = np.random.default_rng(5)
    n = 40
    z = np.column_stack([np.ones(n), rng.uniform(-3, 2, n), rng.integers(0, 2, n)])
    y = np.column_stack([rng.uniform(-1, 4, n), rng.uniform(0.5, 2, n)])
    z[0, 1], y[1, 0], y[2, 1] = 25.0, -30.0, 9.0  # outside the bounds
    z_df = pd.DataFrame(z, columns=["intercept", "age", "sex"])
    y_df = pd.DataFrame(y, columns=["hippocampus", "amygdala"])
    res = dp_sufficient_statistics(z_df, y_df, Z_BOUNDS, Y_BOUNDS, 1e6, 1e-5)

    zc = z.copy()
    zc[0, 1] = 2.0
    yc = y.copy()
    yc[1, 0], yc[2, 1] = -1.0, 2.0
    sigma = math.sqrt(res.ztz_noise_var)
    tol = stats.norm.isf(FALSE_ALARM / (2 * (1 + 6 + 6 + 2))) * sigma
    assert sigma < 0.05
    np.testing.assert_allclose(res.ztz, zc.T @ zc, rtol=0, atol=tol)
    np.testing.assert_allclose(res.zty, zc.T @ yc, rtol=0, atol=tol)
    np.testing.assert_allclose(res.yty, (yc**2).sum(0), rtol=0, atol=tol)
    assert abs(res.n - n) < tol
    # The unclamped values are far outside the tolerance: clamping is what made them agree.
    assert np.max(np.abs(res.ztz - z.T @ z)) > 100 * tol
    assert np.max(np.abs(res.yty - (y**2).sum(0))) > 100 * tol
    assert res.terms == ["intercept", "age", "sex"]
    assert res.regions == ["hippocampus", "amygdala"]
    assert np.array_equal(res.ztz, res.ztz.T)

    mech = res.mechanism.as_dict()
    assert mech["mechanism"] == "gaussian" and mech["privacy_unit"] == "participant"
    assert mech["epsilon"] == 1e6 and mech["delta"] == 1e-5
    assert mech["clamp_bounds"]["Z"] == {"lo": Z_BOUNDS[0], "hi": Z_BOUNDS[1]}
    assert mech["noise_scale"] == sigma and len(mech["released"]) == 1 + 6 + 6 + 2


def test_sufficient_statistics_feed_the_meta_analysis():
    from fednipype.hub.regression import SufficientStatistics

    rng = np.random.default_rng(6)
    z = np.column_stack([np.ones(30), rng.uniform(-3, 2, 30), rng.integers(0, 2, 30)])
    y = rng.uniform(0.5, 2, (30, 2))
    res = dp_sufficient_statistics(
        z, y, Z_BOUNDS, Y_BOUNDS, 1e4, 1e-5, terms=["intercept", "age", "sex"]
    )
    stats_ = SufficientStatistics(**res.meta_fields())
    assert stats_.terms == ("intercept", "age", "sex")
    assert stats_.ztz_noise_var == res.mechanism.noise_variance


# -- other statistics at huge epsilon -------------------------------------------------------


def test_statistics_match_numpy_at_huge_epsilon():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (80, 3))
    x[0, 0] = 7.0  # clamped to 1
    xc = np.clip(x, 0, 1)
    groups = np.array(["ctrl", "case"] * 40)
    for delta in (0.0, 1e-5):
        mean = dp_mean(x, (0, 1), 1e6, delta)
        np.testing.assert_allclose(mean.value, xc.mean(0), atol=1e-3)
        assert abs(mean.n - 80) < 0.05
        var = dp_variance(x, (0, 1), 1e6, delta)
        np.testing.assert_allclose(var.value, xc.var(0, ddof=1), atol=1e-3)
        gm = dp_group_means(x, groups, ["ctrl", "case"], (0, 1), 1e6, delta)
        expected = pd.DataFrame(xc).groupby(groups).mean().loc[["ctrl", "case"]].to_numpy()
        np.testing.assert_allclose(gm.value, expected, atol=1e-3)
        np.testing.assert_allclose(gm.n, [40, 40], atol=0.05)
    assert abs(dp_count(x, 1e6).value[0] - 80) < 0.05
    hist = dp_histogram(x[:, 1], [0, 0.25, 0.5, 1.0], 1e6)
    np.testing.assert_allclose(
        hist.value, np.histogram(x[:, 1], [0, 0.25, 0.5, 1.0])[0], atol=0.05
    )
    # Per-column bounds; value out of range clamps into the last bin.
    mean = dp_mean(x, ([0, 0, 0], [0.5, 1, 1]), 1e6, 1e-5)
    np.testing.assert_allclose(mean.value[0], np.clip(x[:, 0], 0, 0.5).mean(), atol=1e-3)


def test_missing_drop_uses_complete_rows_only():
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, (50, 2))
    x[[3, 7, 11], [0, 1, 0]] = np.nan
    complete = x[~np.isnan(x).any(axis=1)]
    with pytest.raises(FednipypeError, match="mean: data: 3 row"):
        dp_mean(x, (0, 1), 1e6, 1e-5)
    res = dp_mean(x, (0, 1), 1e6, 1e-5, missing="drop")
    np.testing.assert_allclose(res.value, complete.mean(0), atol=1e-3)
    assert abs(res.n - 47) < 0.05


def test_prepared_statistic_releases_once_and_hides_data():
    x = np.full((20, 1), 0.123456789)
    prepared = prepare("mean", x, (0, 1), 1.0, 1e-3)
    assert "0.123" not in repr(prepared)
    assert prepared.epsilon == 1.0 and prepared.delta == 1e-3
    assert "statistic" in prepared.audit_parameters()
    prepared.release()
    with pytest.raises(FednipypeError, match="already released"):
        prepared.release()


def test_delta_must_be_below_one_over_n():
    x = np.full((100, 1), 0.5)
    with pytest.raises(DisclosureError, match="1/n"):
        dp_mean(x, (0, 1), 1.0, 0.01)
    assert dp_mean(x, (0, 1), 1.0, 0.0099).mechanism.delta == 0.0099


def test_opendp_is_the_noise_source():
    out = add_gaussian_noise(np.zeros((2, 3)), 1.0)
    assert out.shape == (2, 3) and np.all(out != 0)
    with pytest.raises(FednipypeError, match="finite"):
        add_gaussian_noise([np.inf], 1.0)


# -- bad input costs nothing -------------------------------------------------------------------


GOOD = np.random.default_rng(9).uniform(0, 1, (40, 2))
WITH_NAN = GOOD.copy()
WITH_NAN[5, 1] = np.nan
WITH_INF = GOOD.copy()
WITH_INF[6, 0] = np.inf
GROUPS = np.array(["a"] * 30 + ["b"] * 10)
Z_OK = np.column_stack([np.ones(40), GOOD[:, 0]])

BAD = {
    "eps zero": (("mean", GOOD, (0, 1), 0.0, 1e-5), PolicyError, "mean: epsilon"),
    "eps negative": (("mean", GOOD, (0, 1), -1.0, 1e-5), PolicyError, "mean: epsilon"),
    "eps nan": (("mean", GOOD, (0, 1), math.nan, 1e-5), PolicyError, "mean: epsilon"),
    "eps inf": (("mean", GOOD, (0, 1), math.inf, 1e-5), PolicyError, "mean: epsilon"),
    "delta one": (("mean", GOOD, (0, 1), 1.0, 1.0), PolicyError, "mean: delta"),
    "delta nan": (("mean", GOOD, (0, 1), 1.0, math.nan), PolicyError, "mean: delta"),
    "delta 1/n": (("mean", GOOD, (0, 1), 1.0, 1 / 40), DisclosureError, "1/n"),
    "bounds inverted": (("mean", GOOD, (1, 0), 1.0, 1e-5), PolicyError, "bounds.*lo < hi"),
    "bounds equal": (("mean", GOOD, (1, 1), 1.0, 1e-5), PolicyError, "bounds.*lo < hi"),
    "bounds missing": (("mean", GOOD, None, 1.0, 1e-5), PolicyError, "bounds: missing"),
    "bounds nan": (("mean", GOOD, (0, math.nan), 1.0, 1e-5), PolicyError, "must be finite"),
    "bounds per column wrong": (
        ("mean", GOOD, ([0, 0, 0], [1, 1, 1]), 1.0, 1e-5),
        PolicyError,
        "one per column",
    ),
    "nan rows": (("mean", WITH_NAN, (0, 1), 1.0, 1e-5), FednipypeError, "mean: data: 1 row"),
    "inf rows": (("variance", WITH_INF, (0, 1), 1.0, 1e-5), FednipypeError, "infinite"),
    "strings": (("mean", [["a"], ["b"]], (0, 1), 1.0, 1e-5), FednipypeError, "numeric"),
    "small cohort": (("mean", GOOD[:9], (0, 1), 1.0, 1e-5), DisclosureError, "minimum cohort"),
    "small group": (
        ("group_means", GOOD, GROUPS, ["a", "b"], (0, 1), 1.0, 1e-5, {"min_cohort": 11}),
        DisclosureError,
        "group 'b'",
    ),
    "unknown level": (
        ("group_means", GOOD, GROUPS, ["a", "c"], (0, 1), 1.0, 1e-5),
        FednipypeError,
        "not among the declared levels",
    ),
    "unknown statistic": (("median", GOOD, (0, 1), 1.0, 1e-5), PolicyError, "unknown statistic"),
    "ss delta zero": (
        ("sufficient_statistics", Z_OK, GOOD, ([1, 0], [1, 1]), (0, 1), 1.0, 0.0),
        PolicyError,
        "delta must be > 0",
    ),
    "ss z bounds inverted": (
        ("sufficient_statistics", Z_OK, GOOD, ([1, 1], [1, 0]), (0, 1), 1.0, 1e-5),
        PolicyError,
        "Z bounds",
    ),
    "ss nan in Y": (
        ("sufficient_statistics", Z_OK, WITH_NAN, ([1, 0], [1, 1]), (0, 1), 1.0, 1e-5),
        FednipypeError,
        "sufficient_statistics: Y: 1 row",
    ),
    "ss row mismatch": (
        ("sufficient_statistics", Z_OK[:30], GOOD, ([1, 0], [1, 1]), (0, 1), 1.0, 1e-5),
        FednipypeError,
        "different numbers of rows",
    ),
    "histogram edges": (("histogram", GOOD[:, 0], [0, 1, 0.5], 1.0), PolicyError, "increasing"),
    "histogram no edges": (("histogram", GOOD[:, 0], None, 1.0), PolicyError, "edges: missing"),
    "count eps": (("count", GOOD, 0.0), PolicyError, "count: epsilon"),
    "min cohort zero": (("count", GOOD, 1.0, {"min_cohort": 0}), PolicyError, "min_cohort"),
    "missing policy": (("count", GOOD, 1.0, {"missing": "impute"}), FednipypeError, "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_before_any_charge(tmp_path, case):
    """The documented pattern: prepare (validates), then charge, then release."""
    args, error, match = BAD[case]
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    args = args[:-1] if kwargs else args
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", "d", 10.0, 1e-3)
    with pytest.raises(error, match=match):
        prepared = prepare(*args, **kwargs)
        with ledger.reserve(prepared.epsilon, prepared.delta, "test", {}):
            prepared.release()
    assert ledger.spent() == (0.0, 0.0)
    assert ledger.audit_trail() == []


def test_good_input_is_charged_through_the_same_pattern(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", "d", 10.0, 1e-3)
    prepared = prepare("mean", GOOD, (0, 1), 1.0, 1e-5)
    with ledger.reserve(prepared.epsilon, prepared.delta, "mean", prepared.audit_parameters()):
        prepared.release()
    assert ledger.spent() == (1.0, 1e-5)
    assert ledger.audit_trail()[0].parameters["sensitivity"] == pytest.approx(math.sqrt(0.5 + 1))
    assert set(STATISTICS) >= {"count", "mean", "sufficient_statistics"}


# -- budget split ------------------------------------------------------------------------------


def test_budget_split():
    split = BudgetSplit(1.0, 1e-6, {"count": (0.1, 0.0), "means": (0.3, 4e-7), "ss": (0.6, 6e-7)})
    assert split["means"] == (0.3, 4e-7)
    assert split.as_dict()["parts"]["ss"] == {"epsilon": 0.6, "delta": 6e-7}
    with pytest.raises(PolicyError, match="no budget for statistic 'median'"):
        split["median"]
    with pytest.raises(PolicyError, match="epsilon add up to"):
        BudgetSplit(1.0, 0.0, {"a": (0.5, 0.0), "b": (0.6, 0.0)})
    with pytest.raises(PolicyError, match="delta add up to"):
        BudgetSplit(1.0, 1e-6, {"a": (0.5, 0.0), "b": (0.5, 0.0)})
    with pytest.raises(PolicyError, match="b epsilon"):
        BudgetSplit(1.0, 0.0, {"a": (1.0, 0.0), "b": (0.0, 0.0)})
    thirds = BudgetSplit.proportional(
        1.0, 1e-6, {"a": 1, "b": 1, "c": 1}, {"a": 0, "b": 1, "c": 1}
    )
    assert math.fsum(e for e, _ in thirds.parts.values()) == pytest.approx(1.0, rel=1e-15)
    assert thirds["a"][1] == 0.0 and thirds["b"][1] == pytest.approx(5e-7)
