"""Hub maths: metafor agreement, pooled OLS equivalence, DP coverage, bad input."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
from numpy.testing import assert_allclose
from scipy import optimize, stats
from statsmodels.stats.meta_analysis import combine_effects

from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import MetaAnalysisError
from fednipype.hub.meta_analysis import MetaResult, fixed_effect, random_effects
from fednipype.hub.regression import pooled_regression, site_estimates

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------------------------------------
# Reference data
# ---------------------------------------------------------------------------------------------

# dat.bcg (Colditz et al., 1994), the 2x2 counts shipped with metafor (also dat.colditz1994,
# printed on metafor-project.org/doku.php/analyses:vanhouwelingen2002).
BCG_TPOS = [4, 6, 3, 62, 33, 180, 8, 505, 29, 17, 186, 5, 27]
BCG_TNEG = [119, 300, 228, 13536, 5036, 1361, 2537, 87886, 7470, 1699, 50448, 2493, 16886]
BCG_CPOS = [11, 29, 11, 248, 47, 372, 10, 499, 45, 65, 141, 3, 29]
BCG_CNEG = [128, 274, 209, 12619, 5761, 1079, 619, 87892, 7232, 1600, 27197, 2338, 17825]

# escalc(measure="RR", ai=tpos, bi=tneg, ci=cpos, di=cneg, data=dat.bcg) as printed in the
# metafor documentation (4 decimals); used only to check the transcription of the counts.
BCG_YI_PRINTED = [-0.8893, -1.5854, -1.3481, -1.4416, -0.2175, -0.7861, -1.6209,
                  0.0120, -0.4694, -1.3713, -0.3394, 0.4459, -0.0173]  # fmt: skip
BCG_VI_PRINTED = [0.3256, 0.1946, 0.4154, 0.0200, 0.0512, 0.0069, 0.2230,
                  0.0040, 0.0564, 0.0730, 0.0124, 0.5325, 0.0714]  # fmt: skip

# Published metafor results on dat.bcg (log risk ratios), four decimals.
#  * FE and DL: metafor's own test suite, tests/testthat/test_misc_metan_vs_rma.uni_with_dat.bcg.r
#    (estimate, CI, z, Q; DL tau2 and I2) and test_misc_confint.r (DL: tau2 0.3088, I2 92.1173,
#    H2 12.6861; the FE model's Q-based I2 and H2 are the same numbers, (Q - 12)/Q and Q/12).
#    FE se 0.0405 and DL se 0.1787 as printed by rma().
#  * REML (rma's default): the output printed in metafor's documentation for
#    rma(yi, vi, data=dat): tau2 0.3132, I2 92.22%, H2 12.86, Q(df = 12) = 152.2330,
#    estimate -0.7145, se 0.1798, zval -3.9744, CI -1.0669 to -0.3622.
#  * REML with test="knha": as printed by metafor for rma(yi, vi, data=dat, test="knha"):
#    -0.7145, se 0.1808, tval -3.9522 on 12 df, p 0.0019, CI -1.1084 to -0.3206. (Corroborating;
#    the full-precision Knapp-Hartung references are the statsmodels and PyMARE sets below.)
#  * PM: metafor's test_misc_rma_uni.r gives tau2 = 0.3181 for method="DLIT" on dat.bcg, and
#    rma.uni.r documents that DLIT, when it converges, is the Paule-Mandel estimate.
BCG_REFERENCE = {
    ("FE", "z"): dict(estimate=-0.4303, se=0.0405, statistic=-10.6247, ci_low=-0.5097,
                      ci_high=-0.3509, q=152.2330, i2=92.1173, h2=12.6861),
    ("DL", "z"): dict(estimate=-0.7141, se=0.1787, statistic=-3.9952, ci_low=-1.0644,
                      ci_high=-0.3638, tau2=0.3088, q=152.2330, i2=92.1173, h2=12.6861),
    ("REML", "z"): dict(estimate=-0.7145, se=0.1798, statistic=-3.9744, ci_low=-1.0669,
                        ci_high=-0.3622, tau2=0.3132, q=152.2330, i2=92.22, h2=12.86),
    ("REML", "knha"): dict(estimate=-0.7145, se=0.1808, statistic=-3.9522, df=12, p=0.0019,
                           ci_low=-1.1084, ci_high=-0.3206, tau2=0.3132),
    ("PM", "z"): dict(tau2=0.3181),
}  # fmt: skip

# Kacker (2004) example, computed with R metafor by the statsmodels developers:
# statsmodels/stats/tests/results/results_meta.py (objects exk1_metafor [PM, control tol=1e-9],
# exk1_dl, exk1_dl_hksj, exk1_fe, exk1_fe_hksj), full precision.
KACKER_Y = [61.0, 61.4, 62.21, 62.3, 62.34, 62.6, 62.7, 62.84, 65.9]
KACKER_V = [0.2025, 1.2100, 0.0900, 0.2025, 0.3844, 0.5625, 0.0676, 0.0225, 1.8225]
_KACKER_HET = dict(q=24.801897741835, q_p=0.00167935146372742)
KACKER_REFERENCE = {
    ("PM", "z"): dict(estimate=62.4076199113286, se=0.338030602684471,
                      statistic=184.621213037276, ci_low=61.7450921043947,
                      ci_high=63.0701477182625, tau2=0.705395309224248, i2=83.7218626490482,
                      h2=6.14320900751909, **_KACKER_HET),
    ("DL", "z"): dict(estimate=62.3901386044504, se=0.245749668040304,
                      statistic=253.876797075543, ci_low=61.9084781058787,
                      ci_high=62.8717991030221, tau2=0.288049246973751, i2=67.744403741711,
                      h2=3.10023721772938, **_KACKER_HET),
    ("DL", "knha"): dict(estimate=62.3901386044504, se=0.29477605699879,
                         statistic=211.652666908108, p=2.77938607433693e-16,
                         ci_low=61.710383798052, ci_high=63.0698934108488,
                         tau2=0.288049246973751, i2=67.744403741711, h2=3.10023721772938,
                         **_KACKER_HET),
    ("FE", "z"): dict(estimate=62.5833970939982, se=0.107845705498231,
                      statistic=580.304953311515, ci_low=62.3720233953344,
                      ci_high=62.7947707926621, tau2=0.0, i2=67.744403741711,
                      h2=3.10023721772938, **_KACKER_HET),
    ("FE", "knha"): dict(estimate=62.5833970939982, se=0.189889223522271,
                         statistic=329.57845597098, p=8.04326466920145e-18,
                         ci_low=62.1455117593252, ci_high=63.0212824286713, tau2=0.0,
                         i2=67.744403741711, h2=3.10023721772938, **_KACKER_HET),
}  # fmt: skip

# CLASP example of DerSimonian & Kacker (2007), metafor's own test
# tests/testthat/test_analysis_example_dersimonian2007.r: escalc(measure="OR") of these counts,
# then rma(method=...) rounded to 4 decimals (tau, mu, se).
CLASP_N1 = [156, 303, 565, 1570, 103, 4659]
CLASP_N2 = [74, 303, 477, 1565, 105, 4650]
CLASP_AI = [5, 5, 12, 69, 9, 313]
CLASP_CI = [8, 17, 9, 94, 11, 352]
CLASP_REFERENCE = {
    "PM": dict(tau=0.3681, estimate=-0.3811, se=0.2060),
    "DL": dict(tau=0.2323, estimate=-0.3240, se=0.1540),
    "REML": dict(tau=0.1843, estimate=-0.2980, se=0.1343),
}

# metafor 4.6.0 rma.uni() outputs on four designs (k = 5, 5, 10, 20), FE/DL/REML x z/knha,
# full precision, pinned by PyMARE; see the "source" record in the file.
METAFOR_GRID = json.loads((DATA / "meta_metafor_reference.json").read_text())


def bcg_log_risk_ratios() -> tuple[np.ndarray, np.ndarray]:
    """escalc(measure="RR"): log risk ratio and its large-sample variance (no zero cells)."""
    tpos, tneg, cpos, cneg = (np.array(x, dtype=float) for x in
                              (BCG_TPOS, BCG_TNEG, BCG_CPOS, BCG_CNEG))  # fmt: skip
    yi = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
    vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
    return yi, vi


def clasp_log_odds_ratios() -> tuple[np.ndarray, np.ndarray]:
    """escalc(measure="OR") of the CLASP counts (no zero cells, so no correction)."""
    n1, n2, ai, ci = (np.array(x, dtype=float) for x in
                      (CLASP_N1, CLASP_N2, CLASP_AI, CLASP_CI))  # fmt: skip
    bi, di = n1 - ai, n2 - ci
    return np.log(ai * di / (bi * ci)), 1 / ai + 1 / bi + 1 / ci + 1 / di


def fit(method: str, test: str, y, v) -> MetaResult:
    if method == "FE":
        return fixed_effect(y, v, test=test)
    return random_effects(y, v, method=method, test=test)


# ---------------------------------------------------------------------------------------------
# Agreement with metafor
# ---------------------------------------------------------------------------------------------


def test_bcg_counts_reproduce_the_printed_escalc_values():
    yi, vi = bcg_log_risk_ratios()
    assert_allclose(yi, BCG_YI_PRINTED, atol=5e-5)
    assert_allclose(vi, BCG_VI_PRINTED, atol=5e-5)


@pytest.mark.parametrize(("method", "test"), list(BCG_REFERENCE))
def test_bcg_matches_published_metafor_to_4_decimals(method, test):
    res = fit(method, test, *bcg_log_risk_ratios())
    for name, expected in BCG_REFERENCE[(method, test)].items():
        printed = repr(float(expected)).split(".")[1]  # compare at the printed precision
        decimals = 0 if printed == "0" else len(printed)
        assert round(getattr(res, name), decimals) == pytest.approx(expected, abs=1e-12), name
    assert res.k == 13 and res.q_df == 12
    assert res.dist == ("t" if test == "knha" else "z")


@pytest.mark.parametrize(("method", "test"), list(KACKER_REFERENCE))
def test_kacker_matches_metafor_full_precision(method, test):
    res = fit(method, test, KACKER_Y, KACKER_V)
    for name, expected in KACKER_REFERENCE[(method, test)].items():
        assert getattr(res, name) == pytest.approx(expected, rel=1e-9, abs=1e-12), name
    if test == "knha":
        assert res.dist == "t" and res.df == 8 and res.z is None and res.t == res.statistic


@pytest.mark.parametrize("method", list(CLASP_REFERENCE))
def test_clasp_matches_metafor_test_suite_to_4_decimals(method):
    res = random_effects(*clasp_log_odds_ratios(), method=method)
    expected = CLASP_REFERENCE[method]
    assert round(res.tau, 4) == pytest.approx(expected["tau"], abs=1e-12)
    assert round(res.estimate, 4) == pytest.approx(expected["estimate"], abs=1e-12)
    assert round(res.se, 4) == pytest.approx(expected["se"], abs=1e-12)


@pytest.mark.parametrize(
    "case", METAFOR_GRID["cases"], ids=lambda c: f"{c['design']}-{c['method']}-{c['test']}"
)
def test_metafor_grid(case):
    design = METAFOR_GRID["designs"][case["design"]]
    res = fit(case["method"], case["test"], design["y"], design["v"])
    ours = [res.estimate, res.se, res.p, res.ci_low, res.ci_high, res.tau2, res.i2, res.h2]
    ref = [case[k] for k in ("beta", "se", "pval", "ci_lb", "ci_ub", "tau2", "I2", "H2")]
    if case["method"] == "REML":
        # metafor stops Fisher scoring once tau2 moves by < 1e-5; we solve the REML score
        # equation to machine precision, so REML agrees to metafor's own convergence.
        assert_allclose(ours, ref, rtol=1e-5, atol=5e-5)
    else:
        assert_allclose(ours, ref, rtol=1e-10, atol=1e-14)
    assert res.q == pytest.approx(case["QE"], rel=1e-12)
    assert res.q_p == pytest.approx(case["QEp"], rel=1e-10, abs=1e-300)
    assert res.df == case["dof"]


def test_reml_solves_the_score_equation_beyond_metafor_default_tolerance():
    # metafor's REML for unequal_k5 stopped at tau2 = 3.0539045 (score not yet 0); ours is the
    # root itself: the restricted log-likelihood is maximal there.
    y, v = (np.array(METAFOR_GRID["designs"]["unequal_k5"][k]) for k in ("y", "v"))
    tau2 = random_effects(y, v).tau2

    def neg_reml(t):
        w = 1 / (v + t)
        resid = y - w @ y / w.sum()
        return 0.5 * (np.log(v + t).sum() + math.log(w.sum()) + w @ resid**2)

    best = optimize.minimize_scalar(neg_reml, bounds=(0, 50), method="bounded",
                                    options={"xatol": 1e-12})  # fmt: skip
    assert tau2 == pytest.approx(best.x, rel=1e-8)
    assert neg_reml(tau2) <= neg_reml(3.0539045155524738)


def test_agrees_with_statsmodels_where_statsmodels_agrees_with_metafor():
    y, v = bcg_log_risk_ratios()
    sm_res = combine_effects(y, v, method_re="dl")
    fe, dl = fixed_effect(y, v), random_effects(y, v, method="DL")
    assert fe.estimate == pytest.approx(sm_res.mean_effect_fe, rel=1e-12)
    assert fe.se == pytest.approx(sm_res.sd_eff_w_fe, rel=1e-12)
    assert fe.q == pytest.approx(sm_res.q, rel=1e-12)
    assert dl.tau2 == pytest.approx(sm_res.tau2, rel=1e-12)
    assert dl.estimate == pytest.approx(sm_res.mean_effect_re, rel=1e-12)
    assert dl.se == pytest.approx(sm_res.sd_eff_w_re, rel=1e-12)
    kh = random_effects(y, v, method="DL", test="knha")
    assert kh.se == pytest.approx(math.sqrt(sm_res.var_hksj_re), rel=1e-12)
    pm = combine_effects(y, v, method_re="pm", atol=1e-12, maxiter=200)
    assert random_effects(y, v, method="PM").tau2 == pytest.approx(pm.tau2, rel=1e-9)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_dl_is_truncated_at_zero_unlike_statsmodels():
    # Q < k - 1: metafor (and we) set tau2 = 0; statsmodels' combine_effects goes negative,
    # which is why the estimators are not delegated to it (see fednipype.hub.regression docstring).
    y, v = [0.10, 0.12, 0.11, 0.09], [0.01, 0.02, 0.015, 0.01]
    assert combine_effects(np.array(y), np.array(v), method_re="dl").tau2 < 0
    for method in ("DL", "REML", "PM"):
        res = random_effects(y, v, method=method)
        assert res.tau2 == 0.0
        assert res.estimate == pytest.approx(fixed_effect(y, v).estimate, rel=1e-14)
        assert res.i2 == 0.0 and res.h2 == 1.0


def test_result_is_frozen_and_weights_match_metafor_definition():
    y, v = bcg_log_risk_ratios()
    res = random_effects(y, v)
    with pytest.raises(AttributeError):
        res.estimate = 0.0  # type: ignore[misc]
    assert_allclose(res.weights, 1 / (v + res.tau2), rtol=1e-14)
    assert math.fsum(res.weights_percent) == pytest.approx(100.0)
    assert res.z == res.statistic and res.t is None
    narrow = random_effects(y, v, level=0.5)
    assert narrow.ci_high - narrow.ci_low < res.ci_high - res.ci_low


def test_k1_behaves_as_metafor():
    res = random_effects([0.3], [0.04])
    assert (res.tau2, res.q, res.q_p, res.i2, res.h2, res.k) == (0.0, 0.0, 1.0, 0.0, 1.0, 1)
    assert res.estimate == 0.3 and res.se == pytest.approx(0.2)
    assert res.ci_low == pytest.approx(0.3 - stats.norm.ppf(0.975) * 0.2)
    assert "k = 1" in res.note
    fe = fixed_effect([0.3], [0.04])
    assert fe.estimate == 0.3 and fe.i2 == 0.0 and fe.h2 == 1.0


# ---------------------------------------------------------------------------------------------
# Pooled regression without noise equals OLS on the pooled rows
# ---------------------------------------------------------------------------------------------

TERMS = ("intercept", "age", "sex", "group")
REGIONS = ("hippocampus", "amygdala", "thalamus")


def make_sites(rng, n_sites, *, single_group_site=None, group_value=0.0):
    """Raw per-site data: age in years, sex and group 0/1, three regional volumes (cm3)."""
    sites = []
    for s in range(n_sites):
        n = int(rng.integers(15, 400))
        age = rng.uniform(20, 85, n)
        sex = rng.integers(0, 2, n).astype(float)
        group = (rng.random(n) < rng.uniform(0.2, 0.6)).astype(float)
        if s == single_group_site:
            group[:] = group_value
        z = np.column_stack([np.ones(n), age, sex, group])
        beta = np.array([[4.2, 1.6, 8.0], [-0.02, -0.005, -0.03], [0.3, 0.1, 0.5],
                         [-0.25, -0.1, 0.05]])  # fmt: skip
        y = z @ beta + rng.normal(0, [0.4, 0.15, 0.6], (n, 3)) + rng.normal(0, 0.2)
        sites.append((z, y))
    return sites


def as_stats(z, y):
    return SufficientStatistics(TERMS, REGIONS, z.T @ z, z.T @ y, (y * y).sum(axis=0), n=len(z))


def site_dummy_design(sites):
    """The pooled rows with one indicator column per site in place of the common intercept."""
    z_all = np.vstack([z for z, _ in sites])
    y_all = np.vstack([y for _, y in sites])
    labels = np.repeat(np.arange(len(sites)), [len(z) for z, _ in sites])
    dummies = (labels[:, None] == np.arange(len(sites))).astype(float)
    return np.column_stack([dummies, z_all[:, 1:]]), y_all


def assert_matches_ols(rows, ols, columns, *, intercept=None):
    """Rows of a pooled_regression table equal statsmodels OLS (``columns`` of its design).

    ``intercept``: contrast vector whose statsmodels t_test the intercept row must equal.
    """
    slopes = rows.iloc[1:]
    assert_allclose(slopes.estimate, ols.params[columns], rtol=1e-9)
    assert_allclose(slopes.se, ols.bse[columns], rtol=1e-9)
    assert_allclose(slopes.t, ols.tvalues[columns], rtol=1e-9)
    assert_allclose(slopes.p, ols.pvalues[columns], rtol=1e-7, atol=1e-300)
    ci = ols.conf_int()[columns]
    assert_allclose(slopes.ci_low, ci[:, 0], rtol=1e-9)
    assert_allclose(slopes.ci_high, ci[:, 1], rtol=1e-9)
    assert (rows.df == ols.df_resid).all() and (rows.resid_df == ols.df_resid).all()
    assert rows.sigma2.iloc[0] == pytest.approx(ols.scale, rel=1e-9)
    if intercept is not None:
        test = ols.t_test(intercept)
        first = rows.iloc[0]
        assert first.estimate == pytest.approx(test.effect[0], rel=1e-9)
        assert first.se == pytest.approx(test.sd[0, 0], rel=1e-9)
        assert first.t == pytest.approx(test.tvalue[0, 0], rel=1e-9)
        assert [first.ci_low, first.ci_high] == pytest.approx(test.conf_int()[0], rel=1e-9)


@pytest.mark.parametrize("n_sites", [3, 50])
def test_pooled_regression_without_site_effects_equals_pooled_ols(n_sites):
    rng = np.random.default_rng(20240 + n_sites)
    sites = make_sites(rng, n_sites, single_group_site=1)
    assert len({len(z) for z, _ in sites}) > 1  # unbalanced
    assert np.ptp(sites[1][0][:, 3]) == 0  # one site's group covariate is constant
    table = pooled_regression([as_stats(z, y) for z, y in sites], site_effects=False)
    z_all = np.vstack([z for z, _ in sites])
    y_all = np.vstack([y for _, y in sites])
    assert list(table.region.unique()) == list(REGIONS)
    for r, region in enumerate(REGIONS):
        ols = sm.OLS(y_all[:, r], z_all).fit()
        rows = table[table.region == region]
        assert list(rows.term) == list(TERMS)
        assert_allclose(rows.estimate.iloc[0], ols.params[0], rtol=1e-9)
        assert_allclose(rows.se.iloc[0], ols.bse[0], rtol=1e-9)
        assert_matches_ols(rows, ols, [1, 2, 3])
    assert not table.psd_projected.any() and not table.sigma2_floored.any()
    assert table.estimable.all()
    assert (table.n == len(z_all)).all()


@pytest.mark.parametrize("n_sites", [3, 50])
def test_pooled_regression_with_site_effects_equals_ols_with_site_dummies(n_sites):
    """Site intercepts and common slopes: OLS on the pooled rows with C(site) dummies.

    One site's group covariate is constant: its own model cannot separate group from its
    intercept, but the pooled design with site dummies is still of full rank.
    """
    rng = np.random.default_rng(20240 + n_sites)
    sites = make_sites(rng, n_sites, single_group_site=1)
    assert len({len(z) for z, _ in sites}) > 1  # unbalanced
    assert np.ptp(sites[1][0][:, 3]) == 0  # one site's group covariate is constant
    x, y_all = site_dummy_design(sites)
    assert np.linalg.matrix_rank(x) == x.shape[1] == n_sites + 3  # still full rank
    table = pooled_regression([as_stats(z, y) for z, y in sites])
    sizes = np.array([len(z) for z, _ in sites], dtype=float)
    weights = np.concatenate([sizes / sizes.sum(), np.zeros(3)])  # Σ n_k α_k / n
    for r, region in enumerate(REGIONS):
        ols = sm.OLS(y_all[:, r], x).fit()
        assert ols.df_resid == len(x) - n_sites - 3
        rows = table[table.region == region]
        assert list(rows.term) == list(TERMS)
        assert_matches_ols(rows, ols, list(range(n_sites, n_sites + 3)), intercept=weights)
    assert not table.psd_projected.any() and not table.sigma2_floored.any()
    assert table.estimable.all()
    assert (table.n == len(x)).all()


def test_site_effects_remove_the_bias_of_site_offsets_correlated_with_age():
    """Older sites read higher: a common intercept turns that into a flatter age slope."""
    rng = np.random.default_rng(404)
    beta = np.array([4.2, -0.02, 0.3, -0.25])  # intercept, per year, sex, group
    offsets = [0.0, 0.4, 0.8, 1.2]  # grow with the sites' age ranges
    sites = []
    for s, offset in enumerate(offsets):
        n = (60, 120, 90, 150)[s]
        age = rng.uniform(20 + 15 * s, 40 + 15 * s, n)
        z = np.column_stack([np.ones(n), age, rng.integers(0, 2, (2, n)).T.astype(float)])
        y = z @ beta + offset + rng.normal(0, 0.3, n)
        sites.append((z, np.column_stack([y, y, y])))
    stats_ = [as_stats(z, y) for z, y in sites]
    fixed = pooled_regression(stats_).query("region == 'hippocampus'").set_index("term")
    common = pooled_regression(stats_, site_effects=False)
    common = common.query("region == 'hippocampus'").set_index("term")

    x, y_all = site_dummy_design(sites)
    ols = sm.OLS(y_all[:, 0], x).fit()
    assert_allclose(fixed.estimate.iloc[1:], ols.params[4:], rtol=1e-9)
    assert_allclose(fixed.se.iloc[1:], ols.bse[4:], rtol=1e-9)
    naive = sm.OLS(y_all[:, 0], np.vstack([z for z, _ in sites])).fit()
    assert_allclose(common.estimate, naive.params, rtol=1e-9)

    age_fixed, age_common = fixed.loc["age"], common.loc["age"]
    print(
        f"\nage slope: truth {beta[1]}, site intercepts {age_fixed.estimate:.4f} "
        f"[{age_fixed.ci_low:.4f}, {age_fixed.ci_high:.4f}], common intercept "
        f"{age_common.estimate:.4f} [{age_common.ci_low:.4f}, {age_common.ci_high:.4f}]"
    )
    assert age_fixed.ci_low <= beta[1] <= age_fixed.ci_high
    assert abs(age_fixed.estimate - beta[1]) < 0.1 * abs(beta[1])
    assert age_common.ci_low > beta[1]  # biased towards 0 by far more than its interval
    assert age_common.estimate - beta[1] > 10 * age_common.se


def test_single_site_fit_is_the_same_with_and_without_site_effects():
    rng = np.random.default_rng(5)
    ((z, y),) = make_sites(rng, 1)
    noise = dict(ztz_noise_var=4.0, zty_noise_var=1.0, yty_noise_var=9.0)
    for extra in ({}, noise):
        site = SufficientStatistics(TERMS, REGIONS, z.T @ z, z.T @ y, (y * y).sum(0), n=len(z),
                                    **extra)  # fmt: skip
        with_sites, without = (
            pooled_regression([site]),
            pooled_regression(site, site_effects=False),
        )
        numeric = ["estimate", "se", "t", "df", "p", "ci_low", "ci_high", "sigma2"]
        assert_allclose(with_sites[numeric], without[numeric], rtol=1e-12)
        assert (with_sites[["term", "estimable", "resid_df"]] ==
                without[["term", "estimable", "resid_df"]]).all().all()  # fmt: skip


def test_covariate_constant_within_every_site_is_not_identified_with_site_effects(caplog):
    """Group by site (patients at some sites, controls at others): site and group confounded."""
    rng = np.random.default_rng(17)
    sites = make_sites(rng, 4)
    for i, (z, _) in enumerate(sites):
        z[:, 3] = float(i % 2)
    with caplog.at_level(logging.WARNING, logger="fednipype.hub.regression"):
        table = pooled_regression([as_stats(z, y) for z, y in sites])
    x, y_all = site_dummy_design(sites)
    for r, region in enumerate(REGIONS):
        rows = table[table.region == region].set_index("term")
        # Only Σ n_k α_k over sites with the same group is identified: neither the weighted
        # mean intercept nor the group effect; age and sex are, and equal OLS without group.
        assert list(rows.estimable) == [False, True, True, False]
        assert rows.estimate[["intercept", "group"]].isna().all()
        ols = sm.OLS(y_all[:, r], x[:, :-1]).fit()
        assert_allclose(rows.estimate[["age", "sex"]], ols.params[4:6], rtol=1e-9)
        assert_allclose(rows.se[["age", "sex"]], ols.bse[4:6], rtol=1e-9)
        assert (rows.df[["age", "sex"]] == ols.df_resid).all()
        assert (rows.resid_df == ols.df_resid).all()
    assert "not identified" in caplog.text and "['intercept', 'group']" in caplog.text


def test_site_estimates_without_noise_equal_each_sites_ols(caplog):
    rng = np.random.default_rng(7)
    sites = make_sites(rng, 4, single_group_site=2, group_value=1.0)
    stats_by_site = {f"site-{i}": as_stats(z, y) for i, (z, y) in enumerate(sites)}
    with caplog.at_level(logging.WARNING, logger="fednipype.hub.regression"):
        table = site_estimates(stats_by_site)
    assert list(table.site.unique()) == list(stats_by_site)
    for i, (z, y) in enumerate(sites):
        rows = table[table.site == f"site-{i}"]
        for r, region in enumerate(REGIONS):
            part = rows[rows.region == region]
            if i == 2:
                # group == 1 everywhere: confounded with the intercept; age and sex are still
                # identified and equal OLS without the group column.
                ols = sm.OLS(y[:, r], z[:, :3]).fit()
                assert list(part.estimable) == [False, True, True, False]
                assert part.estimate.iloc[[0, 3]].isna().all()
                assert_allclose(part.estimate.iloc[1:3], ols.params[1:3], rtol=1e-9)
                assert_allclose(part.se.iloc[1:3], ols.bse[1:3], rtol=1e-9)
                assert (part.df.iloc[1:3] == ols.df_resid).all()
            else:
                ols = sm.OLS(y[:, r], z).fit()
                assert_allclose(part.estimate, ols.params, rtol=1e-9)
                assert_allclose(part.se, ols.bse, rtol=1e-9)
    assert "not identified" in caplog.text and "site-2" in caplog.text


def test_noisy_indefinite_ztz_is_projected_and_reported(caplog):
    rng = np.random.default_rng(3)
    z, y = make_sites(rng, 1)[0]
    ztz = z.T @ z
    ztz[2, 3] = ztz[3, 2] = ztz[2, 2] + 50.0  # as if noise pushed sex x group past its bound
    assert np.linalg.eigvalsh(ztz)[0] < 0
    noise = dict(ztz_noise_var=25.0, zty_noise_var=25.0, yty_noise_var=25.0)
    noisy = SufficientStatistics(TERMS, REGIONS, ztz, z.T @ y, (y * y).sum(0), n=len(z), **noise)
    with caplog.at_level(logging.WARNING, logger="fednipype.hub.regression"):
        table = pooled_regression([noisy])
        per_site = site_estimates([noisy])
    assert table.psd_projected.all() and per_site.psd_projected.all()
    assert np.isfinite(table.se).all() and (table.se > 0).all()
    assert "psd_projected=True" in caplog.text


@pytest.mark.parametrize("site_effects", [True, False])
def test_noise_inflates_standard_errors_and_noise_free_stats_do_not(site_effects):
    rng = np.random.default_rng(11)
    sites = make_sites(rng, 5)
    clean = [as_stats(z, y) for z, y in sites]
    noisy = [
        SufficientStatistics(TERMS, REGIONS, s.ztz, s.zty, s.yty, n=s.n, ztz_noise_var=4.0,
                             zty_noise_var=4.0, yty_noise_var=4.0)
        for s in clean
    ]  # fmt: skip
    base = pooled_regression(clean, site_effects=site_effects)
    with_noise = pooled_regression(noisy, site_effects=site_effects)
    assert_allclose(with_noise.estimate, base.estimate, rtol=1e-12)  # same numbers released
    assert (with_noise.se > base.se).all()
    assert np.isfinite(with_noise.df).all() and (with_noise.df > 0).all()


# ---------------------------------------------------------------------------------------------
# Coverage under DP noise
# ---------------------------------------------------------------------------------------------


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest σ for which N(0, σ²) noise is (ε, δ)-DP (Balle & Wang 2018, Theorem 8).

    δ(σ) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ) decreases in σ; solve δ(σ) = δ.
    """

    def excess(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return stats.norm.cdf(a - b) - math.exp(epsilon) * stats.norm.cdf(-a - b) - delta

    return optimize.brentq(excess, 1e-6 * sensitivity, 1e3 * sensitivity, xtol=1e-12)


@pytest.mark.slow
def test_dp_noise_confidence_intervals_keep_nominal_coverage(caplog):
    """10 sites x 200 subjects, ε = 1, δ = 1e-5 per site: 95% CIs cover 93–97% of the time.

    The sites share one intercept here, so the pooled regression is fitted with a common
    intercept (``site_effects=False``); site intercepts are covered by the next test.

    Model per region: thickness − 2.5 mm = β0 + β1 age + β2 sex + β3 group + ε, ε ~ N(0, 0.1²),
    with age = (years − 50)/30 for ages in the public bounds [20, 80], sex and group coded ±1,
    and regional cortical thickness in the public bounds [1.5, 3.5] mm. Each site releases ZᵀZ
    (upper triangle), ZᵀY and yᵀy with one analytic Gaussian mechanism whose L2 sensitivity (one
    subject added or removed) follows from those bounds; n is released as the noisy ZᵀZ[0, 0].
    The noise is drawn here with numpy (this tests the inference, not the sampler).

    Coverage is counted over 1000 replicates x 3 regions x 4 coefficients = 12 000
    replicate-coefficients per method (≥ 1900 needed for a binomial SE ≤ 0.005, i.e. a
    93–97% band at least 4 SE wide on each side; each coefficient alone has 1000).
    """
    n_rep, n_sites, n_subj, chunk = 1000, 10, 200, 100
    p, n_regions = len(TERMS), 3
    beta = np.array([[0.05, -0.05, 0.00],  # intercept (mm above 2.5 mm)
                     [-0.15, -0.10, -0.05],  # per 30 years of age
                     [0.02, -0.02, 0.00],  # sex (±1)
                     [-0.05, 0.05, -0.10]])  # group (±1)  # fmt: skip
    z_bound, y_bound = np.ones(p), 1.0  # |z_j| ≤ 1 for every column, |y| ≤ 1 mm
    upper = np.triu_indices(p)
    sensitivity = math.sqrt(
        (np.outer(z_bound, z_bound)[upper] ** 2).sum()  # ZᵀZ upper triangle
        + n_regions * (z_bound**2).sum() * y_bound**2  # ZᵀY
        + n_regions * y_bound**4  # yᵀy
    )
    sigma = analytic_gaussian_sigma(1.0, 1e-5, sensitivity)
    prevalence = np.linspace(0.3, 0.6, n_sites)  # group share differs between sites
    rng = np.random.default_rng(20250101)
    truth = beta.T.ravel()  # region-major, as the tables
    covered = {"pooled": [], "RE REML z": [], "RE REML knha": []}

    start = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="fednipype.hub.regression"):
        for _ in range(n_rep // chunk):
            shape = (chunk, n_sites, n_subj)
            age = rng.uniform(-1, 1, shape)
            sex = rng.choice([-1.0, 1.0], shape)
            group = np.where(rng.random(shape) < prevalence[:, None], 1.0, -1.0)
            z = np.stack([np.ones(shape), age, sex, group], axis=-1)
            y = z @ beta + rng.normal(0, 0.1, (*shape, n_regions))
            assert np.abs(y).max() <= y_bound  # inside the public bounds: clamping is a no-op
            ztz = np.einsum("rsni,rsnj->rsij", z, z)
            zty = np.einsum("rsni,rsnk->rsik", z, y)
            yty = (y**2).sum(axis=2)
            noise = np.zeros_like(ztz)
            noise[..., upper[0], upper[1]] = rng.normal(0, sigma, (*ztz.shape[:2], len(upper[0])))
            ztz = ztz + noise + np.triu(noise, 1).swapaxes(-1, -2)
            zty = zty + rng.normal(0, sigma, zty.shape)
            yty = yty + rng.normal(0, sigma, yty.shape)
            for rep in range(chunk):
                released = [
                    SufficientStatistics(TERMS, REGIONS, ztz[rep, s], zty[rep, s], yty[rep, s],
                                         n=ztz[rep, s, 0, 0], ztz_noise_var=sigma**2,
                                         zty_noise_var=sigma**2, yty_noise_var=sigma**2)
                    for s in range(n_sites)
                ]  # fmt: skip
                pooled = pooled_regression(released, site_effects=False)
                covered["pooled"].append(
                    (pooled.ci_low.to_numpy() <= truth) & (truth <= pooled.ci_high.to_numpy())
                )
                per_site = site_estimates(released)
                est = per_site.estimate.to_numpy().reshape(n_sites, -1)
                var = per_site.se.to_numpy().reshape(n_sites, -1) ** 2
                for test, key in (("z", "RE REML z"), ("knha", "RE REML knha")):
                    fits = [random_effects(est[:, j], var[:, j], test=test)
                            for j in range(truth.size)]  # fmt: skip
                    covered[key].append([f.ci_low <= t <= f.ci_high
                                         for f, t in zip(fits, truth, strict=True)])  # fmt: skip
    elapsed = time.perf_counter() - start

    print(f"\nDP coverage ({n_rep} replicates x {truth.size} coefficients, sigma = {sigma:.3f}, "
          f"L2 sensitivity = {sensitivity:.3f}, {elapsed:.1f} s):")  # fmt: skip
    for key, hits in covered.items():
        hits = np.asarray(hits, dtype=float)
        per_coef = " ".join(f"{x:.3f}" for x in hits.mean(axis=0))
        print(f"  {key:13s} {hits.mean():.4f}  (per region x term: {per_coef})")
        assert 0.93 <= hits.mean() <= 0.97, key


def dp_sensitivity(p: int, n_regions: int) -> float:
    """L2 sensitivity of (ZᵀZ upper triangle, ZᵀY, yᵀy) when |z_j| ≤ 1 and |y| ≤ 1."""
    return math.sqrt(p * (p + 1) / 2 + n_regions * p + n_regions)


@pytest.mark.slow
def test_dp_noise_site_effects_intervals_keep_nominal_coverage(caplog):
    """Site intercepts under DP noise: 95% CIs of the slopes cover 93–97% of the time.

    The design of the previous test, except that the sites differ: site s recruits ages
    (scaled) in a window of half-width 0.7 centred at c_s from −0.3 to 0.3, has group
    prevalence π_s from 0.2 to 0.8, and reads higher by offset_s = 0.5 c_s + 0.15 (2π_s − 1)
    mm — offsets correlated with age and group, which bias a common-intercept fit. Each site
    releases its statistics with ε = 1, δ = 1e-5 (the analytic Gaussian σ; numpy draws the
    noise) and n as the noisy ZᵀZ[0, 0]. The site-intercept fit's slope intervals are counted
    over 1000 replicates x 3 regions x 3 slopes = 9000 replicate-coefficients; its intercept
    row (Σ ñ_k α_k / Σ ñ_k with the released counts ñ_k) over 3000. The common-intercept
    fit's coverage shows the bias the site intercepts remove.

    The intervals lean to the conservative side where the sites' covariate ranges overlap
    little: the ZᵀZ-noise term of the variance needs each site intercept α_k, whose estimate
    then inherits much of the age slope's noise, and its plug-in over-states the term.
    """
    n_rep, n_sites, n_subj, chunk = 1000, 10, 200, 100
    p, n_regions = len(TERMS), 3
    beta = np.array([[0.05, -0.05, 0.00],  # intercept (mm above 2.5 mm)
                     [-0.15, -0.10, -0.05],  # per 30 years of age
                     [0.02, -0.02, 0.00],  # sex (±1)
                     [-0.05, 0.05, -0.10]])  # group (±1)  # fmt: skip
    upper = np.triu_indices(p)
    sensitivity = dp_sensitivity(p, n_regions)
    sigma = analytic_gaussian_sigma(1.0, 1e-5, sensitivity)
    centre = np.linspace(-0.3, 0.3, n_sites)[:, None]
    prevalence = np.linspace(0.2, 0.8, n_sites)[:, None]
    offset = 0.5 * centre + 0.15 * (2.0 * prevalence - 1.0)  # (sites, 1)
    rng = np.random.default_rng(20250611)
    slopes = beta[1:].T.ravel()  # region-major
    covered = {"site intercepts: slopes": [], "site intercepts: intercept": [],
               "common intercept: slopes": []}  # fmt: skip

    start = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="fednipype.hub.regression"):
        for _ in range(n_rep // chunk):
            shape = (chunk, n_sites, n_subj)
            age = centre + rng.uniform(-0.7, 0.7, shape)
            sex = rng.choice([-1.0, 1.0], shape)
            group = np.where(rng.random(shape) < prevalence, 1.0, -1.0)
            z = np.stack([np.ones(shape), age, sex, group], axis=-1)
            y = z @ beta + offset[..., None] + rng.normal(0, 0.1, (*shape, n_regions))
            assert np.abs(y).max() <= 1.0 and np.abs(age).max() <= 1.0  # inside the bounds
            ztz = np.einsum("rsni,rsnj->rsij", z, z)
            zty = np.einsum("rsni,rsnk->rsik", z, y)
            yty = (y**2).sum(axis=2)
            noise = np.zeros_like(ztz)
            noise[..., upper[0], upper[1]] = rng.normal(0, sigma, (*ztz.shape[:2], len(upper[0])))
            ztz = ztz + noise + np.triu(noise, 1).swapaxes(-1, -2)
            zty = zty + rng.normal(0, sigma, zty.shape)
            yty = yty + rng.normal(0, sigma, yty.shape)
            for rep in range(chunk):
                released = [
                    SufficientStatistics(TERMS, REGIONS, ztz[rep, s], zty[rep, s], yty[rep, s],
                                         n=ztz[rep, s, 0, 0], ztz_noise_var=sigma**2,
                                         zty_noise_var=sigma**2, yty_noise_var=sigma**2)
                    for s in range(n_sites)
                ]  # fmt: skip
                weights = ztz[rep, :, 0, 0] / ztz[rep, :, 0, 0].sum()
                intercepts = beta[0] + weights @ offset  # (regions,)
                fits = {
                    "site intercepts": pooled_regression(released),
                    "common intercept": pooled_regression(released, site_effects=False),
                }
                for key, fit in fits.items():
                    low = fit.ci_low.to_numpy().reshape(n_regions, p)
                    high = fit.ci_high.to_numpy().reshape(n_regions, p)
                    hit = (low[:, 1:].ravel() <= slopes) & (slopes <= high[:, 1:].ravel())
                    covered[f"{key}: slopes"].append(hit)
                    if key == "site intercepts":
                        covered[f"{key}: intercept"].append(
                            (low[:, 0] <= intercepts) & (intercepts <= high[:, 0])
                        )
    elapsed = time.perf_counter() - start

    print(f"\nDP coverage with site offsets ({n_rep} replicates, sigma = {sigma:.3f}, "
          f"{elapsed:.1f} s):")  # fmt: skip
    rates = {}
    for key, hits in covered.items():
        hits = np.asarray(hits, dtype=float)
        rates[key] = hits.mean()
        per_coef = " ".join(f"{x:.3f}" for x in hits.mean(axis=0))
        print(f"  {key:27s} {hits.mean():.4f} over {hits.size} (per coefficient: {per_coef})")
    assert 0.93 <= rates["site intercepts: slopes"] <= 0.97
    assert 0.93 <= rates["site intercepts: intercept"] <= 0.98  # conservative: see above
    assert rates["common intercept: slopes"] < 0.9  # the bias the site intercepts remove


# ---------------------------------------------------------------------------------------------
# Bad input: MetaAnalysisError naming the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "v", "kwargs", "match"),
    [
        ([], [], {}, r"^y is empty"),
        ([0.1, 0.2], [0.01], {}, r"y and v must have the same length.*len\(y\) = 2, len\(v\) = 1"),
        ([0.1, float("nan")], [0.01, 0.02], {}, r"^y must be finite; y\[1\] = nan"),
        ([0.1, float("inf")], [0.01, 0.02], {}, r"^y must be finite; y\[1\] = inf"),
        ([0.1, 0.2], [0.01, float("nan")], {}, r"^v must be finite.*v\[1\] = nan"),
        ([0.1, 0.2], [0.01, float("inf")], {}, r"^v must be finite.*v\[1\] = inf"),
        ([0.1, 0.2], [0.01, 0.0], {}, r"^v must be positive.*v\[1\] = 0.0"),
        ([0.1, 0.2], [-0.01, 0.02], {}, r"^v must be positive.*v\[0\] = -0.01"),
        (["a", "b"], [0.01, 0.02], {}, r"^y must be a sequence of numbers"),
        ([[0.1, 0.2]], [[0.01, 0.02]], {}, r"^y must be a one-dimensional"),
        (0.1, 0.01, {}, r"^y must be a one-dimensional"),
        ([0.1, 0.2], None, {}, r"^v must be"),
        ([0.1, 0.2], [0.01, 0.02], {"method": "ML"}, r"^method must be one of DL, REML, PM"),
        ([0.1, 0.2], [0.01, 0.02], {"method": "FE"}, r"^method .*use fixed_effect\(\)"),
        ([0.1, 0.2], [0.01, 0.02], {"test": "adhoc"}, r"^test must be one of z, knha"),
        ([0.1, 0.2], [0.01, 0.02], {"level": 95}, r"^level must be a confidence level"),
        ([0.1, 0.2], [0.01, 0.02], {"level": "high"}, r"^level must be a number"),
        ([0.1], [0.01], {"test": "knha"}, r"^test='knha' needs at least 2 estimates"),
    ],
)
def test_random_effects_bad_input(y, v, kwargs, match):
    with pytest.raises(MetaAnalysisError, match=match):
        random_effects(y, v, **kwargs)


@pytest.mark.parametrize(
    ("y", "v", "kwargs", "match"),
    [
        ([], [], {}, r"^y is empty"),
        ([0.1], [0.01, 0.02], {}, r"^y and v must have the same length"),
        ([0.1, 0.2], [0.01, -1.0], {}, r"^v must be positive"),
        ([0.1, 0.2], [0.01, 0.02], {"test": "t"}, r"^test must be one of"),
        ([0.1, 0.2], [0.01, 0.02], {"level": 0.0}, r"^level must be a confidence level"),
        ([0.1], [0.01], {"test": "knha"}, r"^test='knha' needs at least 2"),
    ],
)
def test_fixed_effect_bad_input(y, v, kwargs, match):
    with pytest.raises(MetaAnalysisError, match=match):
        fixed_effect(y, v, **kwargs)


def _good_fields():
    return dict(terms=("intercept", "age"), regions=("roi",), ztz=[[10.0, 5.0], [5.0, 30.0]],
                zty=[[3.0], [4.0]], yty=[20.0], n=10)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"terms": ("age", "intercept")},
            r"SufficientStatistics\.terms must start with 'intercept'",
        ),
        ({"terms": "intercept"}, r"SufficientStatistics\.terms must be a sequence of names"),
        ({"terms": ("intercept", "")}, r"SufficientStatistics\.terms must be a non-empty"),
        ({"regions": ("roi", "roi")}, r"SufficientStatistics\.regions has duplicate names"),
        ({"regions": ()}, r"SufficientStatistics\.regions must be a non-empty"),
        ({"ztz": [[10.0]]}, r"SufficientStatistics\.ztz must have shape 2x2.*got \(1, 1\)"),
        ({"ztz": [[10.0, 5.0], [4.0, 30.0]]}, r"SufficientStatistics\.ztz must be symmetric"),
        ({"ztz": [[10.0, np.nan], [np.nan, 30.0]]}, r"SufficientStatistics\.ztz contains NaN"),
        ({"zty": [3.0, 4.0]}, r"SufficientStatistics\.zty must have shape 2x1"),
        ({"zty": [[3.0], [np.inf]]}, r"SufficientStatistics\.zty contains NaN or inf"),
        ({"yty": [20.0, 1.0]}, r"SufficientStatistics\.yty must have shape length 1"),
        ({"yty": ["x"]}, r"SufficientStatistics\.yty must be numeric"),
        ({"n": np.nan}, r"SufficientStatistics\.n must be finite"),
        ({"n": "ten"}, r"SufficientStatistics\.n must be a number"),
        ({"ztz_noise_var": -1.0}, r"SufficientStatistics\.ztz_noise_var must be a variance >= 0"),
        ({"zty_noise_var": np.inf}, r"SufficientStatistics\.zty_noise_var must be finite"),
        ({"yty_noise_var": None}, r"SufficientStatistics\.yty_noise_var must be a number"),
    ],
)
def test_sufficient_statistics_bad_input(change, match):
    with pytest.raises(MetaAnalysisError, match=match):
        SufficientStatistics(**{**_good_fields(), **change})


def test_pooled_regression_refuses_a_non_positive_n():
    """A noisy n may be <= 0 in a release; the hub cannot solve with it (it floors n first)."""
    stats_ = SufficientStatistics(**{**_good_fields(), "n": 0})
    with pytest.raises(MetaAnalysisError, match=r"SufficientStatistics\.n must be positive"):
        pooled_regression([stats_])


def test_sufficient_statistics_are_read_only_copies():
    fields = _good_fields()
    ztz = np.array(fields.pop("ztz"))
    stats_ = SufficientStatistics(ztz=ztz, **fields)
    ztz[0, 0] = 99.0
    assert stats_.ztz[0, 0] == 10.0
    with pytest.raises(ValueError):
        stats_.ztz[0, 0] = 1.0
    assert not stats_.noisy


@pytest.mark.parametrize("function", [pooled_regression, site_estimates])
def test_regression_bad_input(function):
    good = SufficientStatistics(**_good_fields())
    other = SufficientStatistics(**{**_good_fields(), "regions": ("other",)})
    with pytest.raises(MetaAnalysisError, match=r"^stats is empty"):
        function([])
    with pytest.raises(MetaAnalysisError, match=r"^stats\[1\] must be SufficientStatistics"):
        function([good, {"ztz": 1}])
    with pytest.raises(MetaAnalysisError, match=r"^stats must be SufficientStatistics or a"):
        function(42)
    with pytest.raises(MetaAnalysisError, match=r"^stats\[1\]\.regions .* differ from stats\[0\]"):
        function([good, other])
    with pytest.raises(MetaAnalysisError, match=r"^stats\['b'\]\.regions"):
        function({"a": good, "b": other})
    with pytest.raises(MetaAnalysisError, match=r"^level must be a confidence level"):
        function([good], level=1.5)
    tiny = SufficientStatistics(**{**_good_fields(), "n": 2})
    with pytest.raises(
        MetaAnalysisError, match=r"n = 2 must exceed the number of estimable terms"
    ):
        function([tiny])


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_site_effects_must_be_a_bool(value):
    with pytest.raises(MetaAnalysisError, match=r"^site_effects must be True or False"):
        pooled_regression([SufficientStatistics(**_good_fields())], site_effects=value)
