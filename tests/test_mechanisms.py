"""Tests of the DP statistics: calibration, noise variance, empirical privacy, sufficient stats.

Noisy outputs are tested statistically; every such test states its false-alarm rate (at most
1e-6), so the suite does not flake. Reference numbers come from scipy, dp-accounting, numpy or
the published value, never from the code under test.
"""

import itertools
import math

import numpy as np
import opendp.prelude as dp
import pytest
from dp_accounting import gaussian_mechanism
from dp_accounting.pld import accountant, common
from scipy import stats

from fednipype.contract.calibration import (
    analytic_gaussian_sigma,
    sufficient_statistics_sensitivity,
)
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import (
    DataError,
    FednipypeError,
    PolicyError,
    PrivacyBudgetExceeded,
)
from fednipype.hub.regression import pooled_regression
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.mechanisms import _gaussian_noise, prepare_sufficient_statistics

dp.enable_features("contrib")

FALSE_ALARM = 1e-6
NAMES = {"terms": ["intercept", "a", "b"], "regions": ["r1", "r2", "r3"], "max_participants": 1000}


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
        res = prepare_sufficient_statistics(z, y, z_bounds, y_bounds, 1.0, 1e-5, **NAMES)._draw()
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


# -- empirical privacy -------------------------------------------------------------------------


EPSILON, DELTA = 1.0, 1e-5
#: Thresholds of the half-line sets, in units of the real mechanism's noise sd.
THRESHOLDS = np.linspace(-3.0, 3.0, 63)


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


def neighbours() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """D: 100 participants with y = 0; D': D plus one with y = 1 (intercept-only model).

    The released vector (n, ZᵀZ, Zᵀy, yᵀy) moves by (1, 1, 1, 1): its full L2 sensitivity 2,
    the worst case over the bounds [-1, 1].
    """
    z, y = np.ones((100, 1)), np.zeros((100, 1))
    return z, y, np.ones((101, 1)), np.vstack([y, [[1.0]]])


def _projected(stats_: SufficientStatistics, sigma: float) -> float:
    """Post-processing of one release: the sum of its 4 entries, in units of 2σ.

    Along the direction (1, 1, 1, 1)/2 of the neighbours' difference, the projection is
    Gaussian with sd σ and moves by the full sensitivity: the hardest 1-D test of the vector.
    """
    total = stats_.n + stats_.ztz[0, 0] + stats_.zty[0, 0] + stats_.yty[0] - 200.0
    return float(total / (2.0 * sigma))


def test_empirical_privacy_of_the_sufficient_statistics():
    """The real mechanism passes; false-alarm rate 1e-6 (see :func:`violations`)."""
    z, y, z2, y2 = neighbours()
    names = {"terms": ["intercept"], "regions": ["r"], "max_participants": 1000}
    bounds = (([1.0], [1.0]), ([-1.0], [1.0]))
    sigma = analytic_gaussian_sigma(EPSILON, DELTA, 2.0)

    def draw(zz, yy):
        prepared = prepare_sufficient_statistics(zz, yy, *bounds, EPSILON, DELTA, **names)
        return _projected(prepared._draw(), sigma)

    draws = 4000
    out_d = np.array([draw(z, y) for _ in range(draws)])
    out_d2 = np.array([draw(z2, y2) for _ in range(draws)])
    rejected, worst = violations(out_d, out_d2)
    assert rejected == 0, worst
    assert worst < 0


def test_empirical_privacy_flags_a_broken_mechanism():
    """The same test rejects the same release with noise scaled by 0.1 (same OpenDP sampler).

    The projection then moves by 2/(0.1 σ) ≈ 2.7 of its sd: the exact delta at epsilon=1 is
    about 0.7, far above what the Clopper-Pearson allowance absorbs with 1500 draws per dataset.
    """
    z, y, z2, y2 = neighbours()
    sigma = analytic_gaussian_sigma(EPSILON, DELTA, 2.0)
    broken = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)),
        dp.l2_distance(T=float),
        scale=0.1 * sigma,
    )

    def broken_release(zz: np.ndarray, yy: np.ndarray) -> float:
        exact = [len(zz), float(zz.sum()), float((zz * yy).sum()), float((yy**2).sum())]
        n, ztz, zty, yty = broken(exact)
        return float((n + ztz + zty + yty - 200.0) / (2.0 * sigma))

    out_d = np.array([broken_release(z, y) for _ in range(1500)])
    out_d2 = np.array([broken_release(z2, y2) for _ in range(1500)])
    rejected, worst = violations(out_d, out_d2)
    assert rejected > 0, worst


# -- sufficient statistics ---------------------------------------------------------------------


Z_BOUNDS = ([1.0, -3.0, 0.0], [1.0, 2.0, 1.0])  # intercept, a covariate, a 0/1 dummy
Y_BOUNDS = ([-1.0, 0.5], [4.0, 2.0])
TWO = {
    "terms": ["intercept", "age", "sex"],
    "regions": ["hippocampus", "amygdala"],
    "max_participants": 1000,
}


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
    mech = prepare_sufficient_statistics(z, y, Z_BOUNDS, Y_BOUNDS, 1.0, 1e-5, **TWO).mechanism
    assert mech.sensitivity == pytest.approx(expected, rel=1e-12)
    assert mech.noise_scale == pytest.approx(
        gaussian_mechanism.get_sigma_gaussian(1.0, 1e-5) * expected, rel=1e-9
    )


def test_sufficient_statistics_converge_and_are_clamped(tmp_path):
    """At huge epsilon the noisy statistics equal numpy's on the clamped rows.

    Tolerance: |error| < z * sigma with z for a two-sided 1e-6 false-alarm rate, Bonferroni
    over every released entry.
    """
    rng = np.random.default_rng(5)
    n = 40
    z = np.column_stack([np.ones(n), rng.uniform(-3, 2, n), rng.integers(0, 2, n)])
    y = np.column_stack([rng.uniform(-1, 4, n), rng.uniform(0.5, 2, n)])
    z[0, 1], y[1, 0], y[2, 1] = 25.0, -30.0, 9.0  # outside the bounds
    prepared = prepare_sufficient_statistics(z, y, Z_BOUNDS, Y_BOUNDS, 1e6, 1e-5, **TWO)
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1e6, 1e-5)
    with ledger.reserve(1e6, 1e-5, "test", prepared.audit_parameters()) as spend:
        res = prepared.release(spend)

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
    assert res.terms == ("intercept", "age", "sex")
    assert res.regions == ("hippocampus", "amygdala")
    assert np.array_equal(res.ztz, res.ztz.T)
    assert res.n_noise_var == res.ztz_noise_var == sigma**2

    mech = prepared.audit_parameters()
    assert mech["mechanism"] == "gaussian" and mech["privacy_unit"] == "participant"
    assert mech["epsilon"] == 1e6 and mech["delta"] == 1e-5
    assert mech["clamp_bounds"]["Z"] == {"lo": Z_BOUNDS[0], "hi": Z_BOUNDS[1]}
    assert mech["noise_scale"] == sigma and len(mech["released"]) == 1 + 6 + 6 + 2


def test_sufficient_statistics_are_the_type_the_hub_pools():
    """The site's release is the contract's SufficientStatistics, pooled as it is."""
    rng = np.random.default_rng(6)
    z = np.column_stack([np.ones(30), rng.uniform(-3, 2, 30), rng.integers(0, 2, 30)])
    y = rng.uniform(0.5, 2, (30, 2))
    prepared = prepare_sufficient_statistics(z, y, Z_BOUNDS, Y_BOUNDS, 1e4, 1e-5, **TWO)
    res = prepared._draw()
    assert isinstance(res, SufficientStatistics)
    assert res.ztz_noise_var == prepared.mechanism.noise_variance
    table = pooled_regression([res])
    assert set(table["term"]) == {"intercept", "age", "sex"}
    assert SufficientStatistics.from_document(res.to_document()).zty.tolist() == res.zty.tolist()


# -- spending and public checks ----------------------------------------------------------------


def _small() -> dict:
    z = np.column_stack([np.ones(20), np.linspace(-1, 1, 20)])
    y = np.full((20, 1), 0.123456789)
    names = {"terms": ["intercept", "x"], "regions": ["r"], "max_participants": 500}
    return {"Z": z, "Y": y, "z_bounds": ([1, -1], [1, 1]), "y_bounds": (-1, 1), **names}


def test_release_needs_an_open_charge_that_covers_it(tmp_path):
    prepared = prepare_sufficient_statistics(epsilon=1.0, delta=1e-3, **_small())
    assert "0.123" not in repr(prepared)
    assert prepared.epsilon == 1.0 and prepared.delta == 1e-3
    assert "statistic" in prepared.audit_parameters()
    with pytest.raises(PolicyError, match="needs the ledger reservation"):
        prepared.release(None)
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 10.0, 1e-2)
    with ledger.reserve(0.5, 1e-3, "too little", {}) as spend:
        with pytest.raises(PrivacyBudgetExceeded, match="sufficient_statistics needs epsilon=1"):
            prepared.release(spend)
    with ledger.reserve(1.0, 1e-3, "enough", {}) as spend:
        prepared.release(spend)
        with pytest.raises(FednipypeError, match="already released"):
            prepared.release(spend)
    again = prepare_sufficient_statistics(epsilon=1.0, delta=1e-3, **_small())
    with pytest.raises(PrivacyBudgetExceeded, match="is closed"):
        again.release(spend)


def test_delta_is_checked_against_the_public_maximum_cohort_not_the_data():
    """20 rows, max_participants 500: δ = 0.01 (< 1/20, ≥ 1/500) is refused; the message
    names the public maximum only, so it reveals nothing of the data's size."""
    with pytest.raises(PolicyError, match="1/max_participants = 0.002") as info:
        prepare_sufficient_statistics(epsilon=1.0, delta=0.01, **_small())
    assert "20" not in str(info.value)
    ok = prepare_sufficient_statistics(epsilon=1.0, delta=0.0019, **_small())
    assert ok.mechanism.delta == 0.0019


def test_small_data_is_not_refused_before_the_charge():
    """Three rows: prepared without complaint (the minimum cohort is checked on the released
    noisy count, after the charge), so preparing is no oracle for the data's size."""
    data = _small()
    data["Z"], data["Y"] = data["Z"][:3], data["Y"][:3]
    assert prepare_sufficient_statistics(epsilon=1.0, delta=1e-4, **data).mechanism.epsilon == 1


def test_opendp_is_the_noise_source():
    out = _gaussian_noise(np.zeros(6), 1.0)
    assert out.shape == (6,) and np.all(out != 0)
    with pytest.raises(DataError, match="finite"):
        _gaussian_noise(np.array([np.inf]), 1.0)


# -- bad input costs nothing -------------------------------------------------------------------


GOOD = np.random.default_rng(9).uniform(0, 1, (40, 2))
WITH_NAN = GOOD.copy()
WITH_NAN[5, 1] = np.nan
WITH_INF = GOOD.copy()
WITH_INF[6, 0] = np.inf
Z_OK = np.column_stack([np.ones(40), GOOD[:, 0]])
Z_B = ([1, 0], [1, 1])
SS = {"terms": ["intercept", "x"], "regions": ["r1", "r2"]}

BAD = {
    "eps zero": ((Z_OK, GOOD, Z_B, (0, 1), 0.0, 1e-5), PolicyError, "statistics: epsilon"),
    "eps nan": ((Z_OK, GOOD, Z_B, (0, 1), math.nan, 1e-5), PolicyError, "epsilon"),
    "eps inf": ((Z_OK, GOOD, Z_B, (0, 1), math.inf, 1e-5), PolicyError, "epsilon"),
    "delta one": ((Z_OK, GOOD, Z_B, (0, 1), 1.0, 1.0), PolicyError, "statistics: delta"),
    "delta zero": ((Z_OK, GOOD, Z_B, (0, 1), 1.0, 0.0), PolicyError, "delta must be > 0"),
    "delta public": ((Z_OK, GOOD, Z_B, (0, 1), 1.0, 1e-2), PolicyError, "max_participants"),
    "y bounds inverted": ((Z_OK, GOOD, Z_B, (1, 0), 1.0, 1e-5), PolicyError, "lo < hi"),
    "y bounds missing": ((Z_OK, GOOD, Z_B, None, 1.0, 1e-5), PolicyError, "bounds: missing"),
    "y bounds nan": ((Z_OK, GOOD, Z_B, (0, math.nan), 1.0, 1e-5), PolicyError, "finite"),
    "z bounds inverted": ((Z_OK, GOOD, ([1, 1], [1, 0]), (0, 1), 1.0, 1e-5), PolicyError,
                          "Z bounds"),
    "nan in Y": ((Z_OK, WITH_NAN, Z_B, (0, 1), 1.0, 1e-5), DataError,
                 "sufficient_statistics: Y: 1 row"),
    "inf in Y": ((Z_OK, WITH_INF, Z_B, (0, 1), 1.0, 1e-5), DataError, "infinite"),
    "strings": ((Z_OK, [["a"]] * 40, Z_B, (0, 1), 1.0, 1e-5), DataError, "numeric"),
    "row mismatch": ((Z_OK[:30], GOOD, Z_B, (0, 1), 1.0, 1e-5), DataError,
                     "different numbers of rows"),
    "max participants": ((Z_OK, GOOD, Z_B, (0, 1), 1.0, 1e-5, {"max_participants": 0}),
                         PolicyError, "max_participants must be >= 1"),
}  # fmt: skip


def _prepare(args: tuple, kwargs: dict):
    return prepare_sufficient_statistics(*args, **{**SS, "max_participants": 1000, **kwargs})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_before_any_charge(tmp_path, case):
    """The documented pattern: prepare (validates), then charge, then release."""
    args, error, match = BAD[case]
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    args = args[:-1] if kwargs else args
    ledger = PrivacyLedger.create(tmp_path / "ledger.sqlite", "d", 10.0, 1e-3)
    with pytest.raises(error, match=match):
        prepared = _prepare(args, kwargs)
        with ledger.reserve(prepared.epsilon, prepared.delta, "test", {}) as spend:
            prepared.release(spend)
    assert ledger.spent() == (0.0, 0.0)
    assert ledger.audit_trail() == []


def test_good_input_is_charged_through_the_same_pattern(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "ledger.sqlite", "d", 10.0, 1e-3)
    prepared = _prepare((Z_OK, GOOD, Z_B, (0, 1), 1.0, 1e-5), {})
    with ledger.reserve(prepared.epsilon, prepared.delta, "ss", prepared.audit_parameters()) as s:
        prepared.release(s)
    assert ledger.spent() == (1.0, 1e-5)
    # The largest contribution of one row over the corners of the bounds (brute force).
    sensitivity = ledger.audit_trail()[0].parameters["sensitivity"]
    assert sensitivity == pytest.approx(brute_force_sensitivity(Z_B, ([0, 0], [1, 1])))
