"""Coordinator: poolability checks on release files, and pooling checked against statsmodels.

The release documents are built here from simulated raw rows (numpy), so every pooled number
has an independent reference: statsmodels OLS on the pooled raw rows with site dummies for the
pooled regression (without them for ``site_effects=False``), statsmodels OLS per site fed to
:func:`fednipype.hub.meta_analysis.random_effects` for the meta-analysis.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from support import (
    COVARIATES,
    EFFECTS,
    REGIONS,
    SCALING,
    TERMS,
    exact_release,
    exact_releases,
    release_doc,
    simulate_site,
    write_sites,
)

from fednipype.exceptions import MetaAnalysisError, ReleaseValidationError
from fednipype.hub.meta_analysis import fixed_effect, random_effects
from fednipype.hub.pooling import RESULT_COLUMNS, pool
from fednipype.hub.releases import load_releases


def ols(rows: pd.DataFrame, region: str):
    """statsmodels OLS of one region on the covariates, original units."""
    return sm.OLS(rows[region], sm.add_constant(rows[list(COVARIATES)])).fit()


def ols_site_dummies(raw: dict[str, pd.DataFrame], region: str):
    """statsmodels OLS of one region on site dummies (no common intercept) and the covariates.

    Also returns the contrast of the pooled ``intercept`` row: the site intercepts weighted by
    the sites' sizes, at the covariate centers.
    """
    rows = pd.concat(raw.values(), ignore_index=True)
    site = np.repeat(list(raw), [len(r) for r in raw.values()])
    dummies = pd.get_dummies(pd.Series(site, name="site"), prefix="site", dtype=float)
    design = pd.concat([dummies, rows[list(COVARIATES)]], axis=1)
    sizes = np.array([len(r) for r in raw.values()], dtype=float)
    contrast = np.concatenate([sizes / sizes.sum(), [SCALING[t]["center"] for t in COVARIATES]])
    return sm.OLS(rows[region], design).fit(), contrast


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _row(results: pd.DataFrame, region: str, term: str, method: str) -> pd.Series:
    rows = results[
        (results["region"] == region) & (results["term"] == term) & (results["method"] == method)
    ]
    assert len(rows) == 1, (region, term, method)
    return rows.iloc[0]


# --------------------------------------------------------------------------------------------
# Pooling without noise: exact references
# --------------------------------------------------------------------------------------------


def _assert_slopes_match(row: pd.Series, fit, term: str, n: int) -> None:
    ci = fit.conf_int()
    assert _rel(row["estimate"], fit.params[term]) < 1e-9
    assert _rel(row["se"], fit.bse[term]) < 1e-9
    assert _rel([row["ci_low"], row["ci_high"]], ci.loc[term]) < 1e-9
    assert _rel(row["statistic"], fit.tvalues[term]) < 1e-9
    assert row["p"] == pytest.approx(fit.pvalues[term], rel=1e-7, abs=1e-300)
    assert row["df"] == fit.df_resid and row["k"] == 3 and row["n"] == n


def test_pooled_regression_equals_statsmodels_ols_with_site_dummies(three_site_releases):
    _, raw = three_site_releases
    exact = exact_releases(raw)
    result = pool(exact)
    assert list(result.results.columns) == list(RESULT_COLUMNS)
    assert result.site_effects
    n = sum(len(rows) for rows in raw.values())
    for region in REGIONS:
        fit, contrast = ols_site_dummies(raw, region)
        assert fit.df_resid == n - 3 - len(COVARIATES)
        for term in COVARIATES:
            row = _row(result.results, region, term, "pooled_regression")
            _assert_slopes_match(row, fit, term, n)
            assert row["note"] == "site intercepts fitted (site as fixed effect)"
        # The intercept in original units: the site intercepts at the covariate centers,
        # weighted by the sites' sizes.
        test = fit.t_test(contrast)
        row = _row(result.results, region, "intercept", "pooled_regression")
        assert _rel(row["estimate"], test.effect[0]) < 1e-9
        assert _rel(row["se"], test.sd[0, 0]) < 1e-9
        assert _rel([row["ci_low"], row["ci_high"]], test.conf_int()[0]) < 1e-9
        assert "participant-weighted mean" in row["note"]
    assert not result.results["psd_projected"].any() and not result.notes


def test_common_intercept_equals_statsmodels_ols_on_pooled_rows(three_site_releases):
    _, raw = three_site_releases
    exact = exact_releases(raw)
    result = pool(exact, site_effects=False)
    assert not result.site_effects
    pooled_rows = pd.concat(raw.values(), ignore_index=True)
    for region in REGIONS:
        fit = ols(pooled_rows, region)
        for term in COVARIATES:
            row = _row(result.results, region, term, "pooled_regression")
            _assert_slopes_match(row, fit, term, len(pooled_rows))
            assert row["note"] == ""
        # The intercept in original units is the expected value at the covariate centers.
        centers = [1.0] + [SCALING[t]["center"] for t in COVARIATES]
        prediction = fit.get_prediction(np.array([centers])).summary_frame(alpha=0.05)
        row = _row(result.results, region, "intercept", "pooled_regression")
        assert _rel(row["estimate"], prediction["mean"].iloc[0]) < 1e-9
        assert _rel(row["se"], prediction["mean_se"].iloc[0]) < 1e-9
        assert _rel(row["ci_low"], prediction["mean_ci_lower"].iloc[0]) < 1e-9


def test_site_intercepts_recover_the_planted_male_effects(three_site_releases):
    """The sites differ in age range and offset: with a common intercept R_P01's male effect
    comes out near 134 mm³ for a planted 200, outside its interval."""
    paths, _ = three_site_releases
    fixed, common = pool(paths).results, pool(paths, site_effects=False).results
    for region, (_, _, male, _) in EFFECTS.items():
        row = _row(fixed, region, "sex[M]", "pooled_regression")
        assert row["ci_low"] <= male <= row["ci_high"], region
    row = _row(common, "R_P01", "sex[M]", "pooled_regression")
    assert row["ci_high"] < EFFECTS["R_P01"][2]


def test_site_intercepts_remove_the_pull_of_site_offsets(tmp_path):
    """Older sites read higher (offsets rise with the sites' ages): the common-intercept age
    slope is pulled up, the site-intercept slope is not."""
    design = {"siteA": (60, (20.0, 40.0), 0.0, 120.0), "siteB": (60, (40.0, 60.0), 300.0, 120.0),
              "siteC": (60, (60.0, 80.0), 600.0, 120.0)}  # fmt: skip
    releases = []
    for i, (site, (n, (lo, hi), offset, sd)) in enumerate(design.items()):
        rng = np.random.default_rng([11, i])
        rows = pd.DataFrame({"age": rng.uniform(lo, hi, n),
                             "sex[M]": (rng.random(n) < 0.5).astype(float),
                             "group[patient]": (np.arange(n) % 2).astype(float)})  # fmt: skip
        for region, (base, age, male, patient) in EFFECTS.items():
            rows[region] = (base + age * (rows["age"] - 50.0) + male * rows["sex[M]"]
                            + patient * rows["group[patient]"] + offset
                            + rng.normal(0.0, sd, n))  # fmt: skip
        releases.append(exact_release(site, rows))
    fixed, common = pool(releases).results, pool(releases, site_effects=False).results
    for region, (_, age, _, _) in EFFECTS.items():
        a = _row(fixed, region, "age", "pooled_regression")
        b = _row(common, region, "age", "pooled_regression")
        assert a["ci_low"] <= age <= a["ci_high"]
        assert b["ci_low"] > age  # 600 mm³ over 40 years: +15 mm³ per year of pull


def test_site_table_equals_statsmodels_ols_per_site(three_site_releases):
    _, raw = three_site_releases
    exact = exact_releases(raw)
    result = pool(exact)
    for site, rows in raw.items():
        for region in REGIONS:
            fit = ols(rows, region)
            sites = result.sites
            cell = sites[(sites["site"] == site) & (sites["region"] == region)].set_index("term")
            for term in COVARIATES:
                assert _rel(cell.loc[term, "estimate"], fit.params[term]) < 1e-9
                assert _rel(cell.loc[term, "se"], fit.bse[term]) < 1e-9
                assert _rel(cell.loc[term, "ci_high"], fit.conf_int().loc[term, 1]) < 1e-9
    assert result.sites["included"].all()
    weights = result.sites.groupby(["region", "term"])["weight_re"].sum()
    assert np.allclose(weights, 100.0)


@pytest.mark.parametrize(("method", "test"), [("REML", "z"), ("DL", "knha"), ("PM", "z")])
def test_meta_analysis_equals_random_effects_on_per_site_ols(three_site_releases, method, test):
    _, raw = three_site_releases
    exact = exact_releases(raw)
    result = pool(exact, method=method, test=test)
    for region in REGIONS:
        for term in COVARIATES:
            fits = [ols(rows, region) for rows in raw.values()]
            y = [f.params[term] for f in fits]
            v = [f.bse[term] ** 2 for f in fits]
            direct = random_effects(y, v, method=method, test=test)
            row = _row(result.results, region, term, f"random_effects_{method}")
            assert _rel(row["estimate"], direct.estimate) < 1e-9
            assert _rel(row["se"], direct.se) < 1e-9
            assert _rel(row["ci_low"], direct.ci_low) < 1e-9
            assert row["tau2"] == pytest.approx(direct.tau2, rel=1e-6, abs=1e-9 * direct.se**2)
            assert row["i2"] == pytest.approx(direct.i2, rel=1e-6, abs=1e-6)
            assert _rel(row["q"], direct.q) < 1e-9
            assert row["k"] == 3 and row["test"] == test
            fe = fixed_effect(y, v)
            row = _row(result.results, region, term, "fixed_effect")
            assert _rel([row["estimate"], row["se"], row["q"]], [fe.estimate, fe.se, fe.q]) < 1e-9
            assert row["test"] == "z"


def test_site_that_cannot_estimate_a_term_is_left_out_of_the_meta_analysis(tmp_path):
    """siteB has no patients: without noise its group effect is not identified (NaN)."""
    raw = {site: simulate_site(site) for site in ("siteA", "siteC")}
    raw["siteB"] = simulate_site("siteB", patients=False)
    result = pool(exact_releases(raw))
    term = "group[patient]"
    row = _row(result.results, "L_P12", term, "random_effects_REML")
    assert row["k"] == 2
    direct = random_effects(
        [ols(raw[s], "L_P12").params[term] for s in ("siteA", "siteC")],
        [ols(raw[s], "L_P12").bse[term] ** 2 for s in ("siteA", "siteC")],
    )
    assert _rel(row["estimate"], direct.estimate) < 1e-9
    site_b = result.sites[(result.sites["site"] == "siteB") & (result.sites["term"] == term)]
    assert not site_b["included"].any() and site_b["estimate"].isna().all()
    assert any("only 2 of 3 sites" in note for note in result.notes)
    # The pooled regression still uses every site, and equals OLS on all rows (site dummies).
    fit, _ = ols_site_dummies(raw, "L_P12")
    pooled = _row(result.results, "L_P12", term, "pooled_regression")
    assert _rel([pooled["estimate"], pooled["se"]], [fit.params[term], fit.bse[term]]) < 1e-9


def test_a_single_release_follows_metafor_k1(tmp_path):
    raw = {"siteC": simulate_site("siteC")}
    paths = exact_releases(raw)
    fit = ols(raw["siteC"], "L_P12")
    result = pool(paths, test="z")
    row = _row(result.results, "L_P12", "age", "random_effects_REML")
    assert row["k"] == 1 and row["tau2"] == 0.0 and row["q"] == 0.0 and row["i2"] == 0.0
    assert row["q_p"] == 1.0 and row["h2"] == 1.0
    assert _rel([row["estimate"], row["se"]], [fit.params["age"], fit.bse["age"]]) < 1e-9
    assert "k = 1" in row["note"]
    knha = _row(pool(paths, test="knha").results, "L_P12", "age", "random_effects_REML")
    assert _rel(knha["estimate"], fit.params["age"]) < 1e-9
    assert math.isnan(knha["se"]) and math.isnan(knha["p"]) and math.isnan(knha["ci_low"])
    assert "0 degrees of freedom" in knha["note"]


def test_regions_subset_and_bad_arguments(three_site_releases):
    paths, _ = three_site_releases
    result = pool(paths, regions=["L_P12", "L_P01"])
    assert result.regions == ["L_P01", "L_P12"]  # atlas order
    assert set(result.sites["region"]) == {"L_P01", "L_P12"}
    assert len(result.results) == 2 * len(TERMS) * 3
    with pytest.raises(MetaAnalysisError, match="'R_P99'.*not in the releases' atlas"):
        pool(paths, regions=["R_P99"])
    with pytest.raises(MetaAnalysisError, match="method must be one of"):
        pool(paths, method="FE")
    with pytest.raises(MetaAnalysisError, match="test must be one of"):
        pool(paths, test="t")


# --------------------------------------------------------------------------------------------
# With DP noise
# --------------------------------------------------------------------------------------------


def test_noisy_ztz_projection_is_reported(tmp_path, caplog):
    """Noise far above ZᵀZ's smallest eigenvalue forces the PSD projection; pool says so
    (ε = 0.5: σ ≈ 36 on statistics of 40–70 participants)."""
    paths, _ = write_sites(tmp_path, epsilon=0.5)
    with caplog.at_level("WARNING"):
        result = pool(paths)
    sites = result.sites.groupby("site")["psd_projected"].all()
    assert sites.all()
    pooled = result.results[result.results["method"] == "pooled_regression"]
    assert pooled["psd_projected"].all()
    meta = result.results[result.results["method"] == "fixed_effect"]
    assert meta["psd_projected"].all()
    assert any("psd_projected" in n and "siteA, siteB, siteC" in n for n in result.notes)
    assert "eigenvalues floored" in caplog.text


def test_small_noise_stays_close_to_ols_and_widens_the_intervals(tmp_path):
    noisy, raw = write_sites(tmp_path / "noisy", epsilon=5000.0)  # σ ≈ 0.06
    exact, dp = pool(exact_releases(raw)).results, pool(noisy).results
    for region in REGIONS:
        a = _row(exact, region, "age", "pooled_regression")
        b = _row(dp, region, "age", "pooled_regression")
        assert abs(b["estimate"] - a["estimate"]) < 4 * b["se"]
        assert b["se"] > a["se"]
    assert not dp["psd_projected"].any()


# --------------------------------------------------------------------------------------------
# load_releases: what cannot be pooled
# --------------------------------------------------------------------------------------------


def _write(folder: Path, name: str, doc: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture
def two_docs():
    return (
        release_doc("siteA", simulate_site("siteA")),
        release_doc("siteB", simulate_site("siteB")),
    )


def test_valid_releases_load_in_order(tmp_path, two_docs):
    a = _write(tmp_path, "a_release.json", two_docs[0])
    b = _write(tmp_path, "b_release.json", two_docs[1])
    releases = load_releases([b, a])
    assert [r.site for r in releases] == ["siteB", "siteA"]
    assert releases[0].path == b and releases[0].epsilon == 1e6
    assert releases[0].n == pytest.approx(55, abs=0.05)  # σ ≈ 0.004 at ε = 1e6


def test_malformed_release_is_named(tmp_path, two_docs):
    good = _write(tmp_path, "a_release.json", two_docs[0])
    broken = tmp_path / "broken_release.json"
    broken.write_text('{"schema_version": "1.0", ', encoding="utf-8")
    with pytest.raises(ReleaseValidationError, match="broken_release.json: not a readable JSON"):
        load_releases([good, broken])
    doc = copy.deepcopy(two_docs[1])
    del doc["statistics"]["sufficient_statistics"]["zty"]
    invalid = _write(tmp_path, "invalid_release.json", doc)
    with pytest.raises(ReleaseValidationError, match="invalid_release.json: field statistics"):
        load_releases([good, invalid])
    with pytest.raises(ReleaseValidationError, match="missing_release.json: release file not"):
        load_releases([good, tmp_path / "missing_release.json"])


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["atlas"].__setitem__("sha256", "b" * 64), "atlas/sha256"),
        (lambda d: d["atlas"]["regions"].reverse(), "atlas/regions"),
        (lambda d: d.__setitem__("feature", "mean"), "feature"),
        (
            lambda d: d["model"]["reference_levels"].__setitem__("sex", "M"),
            "model/reference_levels",
        ),
        (lambda d: d["model"].__setitem__("sessions", "first"), "model/sessions"),
    ],
)
def test_mismatched_release_names_the_file_and_field(tmp_path, two_docs, mutate, field):
    first, other = two_docs
    if field == "atlas/regions":  # keep the document self-consistent
        other["statistics"]["sufficient_statistics"]["regions"] = list(reversed(REGIONS))
    mutate(other)
    a = _write(tmp_path, "a_release.json", first)
    b = _write(tmp_path, "b_release.json", other)
    pattern = rf"b_release.json: field {re.escape(field)} differs from .*a_release.json"
    with pytest.raises(ReleaseValidationError, match=pattern):
        load_releases([a, b])


def test_different_model_terms_are_refused(tmp_path, two_docs):
    first, other = two_docs
    terms = ["intercept", "age", "sex[M]", "group[MCI]"]
    other["model"]["terms"] = terms
    other["statistics"]["sufficient_statistics"]["terms"] = terms
    other["statistics"]["sufficient_statistics"]["scaling"]["group[MCI]"] = {
        "center": 0.5,
        "scale": 0.5,
    }
    a = _write(tmp_path, "a_release.json", first)
    b = _write(tmp_path, "b_release.json", other)
    with pytest.raises(
        ReleaseValidationError,
        match=r"b_release.json: field model/terms differs from .*a_release.json: entry 3 is "
        r"'group\[MCI\]', not 'group\[patient\]'",
    ):
        load_releases([a, b])


def test_different_region_scaling_is_refused(tmp_path, two_docs):
    first, other = two_docs
    region = other["atlas"]["regions"][0]
    scaling = other["statistics"]["sufficient_statistics"]["scaling"]
    scaling[region] = {"center": 7000.0, "scale": 7000.0}  # another site's response bounds
    other["privacy"]["bounds"][region] = [0.0, 14000.0]
    a = _write(tmp_path, "a_release.json", first)
    b = _write(tmp_path, "b_release.json", other)
    with pytest.raises(
        ReleaseValidationError,
        match=rf"b_release.json: field statistics/sufficient_statistics/scaling/{region} "
        r"differs from .*a_release.json",
    ):
        load_releases([a, b])


def test_per_site_age_range_is_accepted(tmp_path, two_docs):
    """A site's own public age range: the hub converts its statistics to common units."""
    first, other = two_docs
    other["privacy"]["bounds"]["age"] = [5.0, 95.0]  # another site's public age bounds
    other["statistics"]["sufficient_statistics"]["scaling"]["age"] = {
        "center": 50.0,
        "scale": 45.0,
    }
    a = _write(tmp_path, "a_release.json", first)
    b = _write(tmp_path, "b_release.json", other)
    assert len(load_releases([a, b])) == 2


def test_different_schema_version_is_named(tmp_path, two_docs):
    first, other = two_docs
    other["schema_version"] = "3.0"
    a = _write(tmp_path, "a_release.json", first)
    b = _write(tmp_path, "b_release.json", other)
    with pytest.raises(ReleaseValidationError, match=r"b_release.json: schema_version .3\.0."):
        load_releases([a, b])


def test_duplicated_release_names_both_files(tmp_path, two_docs):
    a = _write(tmp_path, "a_release.json", two_docs[0])
    b = _write(tmp_path, "b_release.json", two_docs[1])
    copy_of_a = _write(tmp_path, "copy_release.json", two_docs[0])
    with pytest.raises(
        ReleaseValidationError, match=r"a_release.json and .*copy_release.json are the same"
    ):
        load_releases([a, b, copy_of_a])
    with pytest.raises(ReleaseValidationError, match=r"a_release.json and .*a_release.json"):
        load_releases([a, a])


def test_same_site_twice_names_both_files(tmp_path, two_docs):
    a = _write(tmp_path, "a_release.json", two_docs[0])
    again = release_doc("siteA", simulate_site("siteA", seed=99))  # a second, different release
    a2 = _write(tmp_path, "a2_release.json", again)
    with pytest.raises(
        ReleaseValidationError,
        match=r"a_release.json and .*a2_release.json are both releases of site 'siteA'",
    ):
        load_releases([a, a2])


def test_release_without_sufficient_statistics_is_refused(tmp_path, two_docs):
    doc = copy.deepcopy(two_docs[0])
    doc["statistics"].pop("sufficient_statistics")
    doc["privacy"]["budget_split"] = {}
    path = _write(tmp_path, "empty_release.json", doc)
    with pytest.raises(ReleaseValidationError, match="empty_release.json: field "):
        load_releases([path])


def test_no_release_is_an_error():
    with pytest.raises(ReleaseValidationError, match="no release files given"):
        load_releases([])


def test_the_same_data_under_a_second_site_label_is_refused(tmp_path, two_docs):
    """Resubmitting a site's release as another site (its participants counted twice)."""
    a = _write(tmp_path, "a_release.json", two_docs[0])
    renamed = copy.deepcopy(two_docs[0])
    renamed["site"] = "siteZ"
    z = _write(tmp_path, "z_release.json", renamed)
    with pytest.raises(ReleaseValidationError, match="same dataset .* under two site labels"):
        load_releases([a, z])
    # Another dataset name, but the same ledger: still the same participants.
    renamed["dataset"] = "another study"
    z = _write(tmp_path, "z_release.json", renamed)
    with pytest.raises(ReleaseValidationError, match="same privacy ledger .* two site labels"):
        load_releases([a, z])


def test_intercept_tests_its_original_units_value_against_zero(three_site_releases):
    """t = estimate / se and p from t on df, for the intercept in original units (not against
    the bound midpoint the statistics were centred on)."""
    _, raw = three_site_releases
    for site_effects in (True, False):
        table = pool(exact_releases(raw), site_effects=site_effects).results
        rows = table[(table["term"] == "intercept") & (table["method"] == "pooled_regression")]
        t = rows["estimate"] / rows["se"]
        assert np.allclose(rows["statistic"], t, rtol=1e-12)
        expected_p = 2 * stats.t.sf(np.abs(t), rows["df"])
        assert np.allclose(rows["p"], expected_p, rtol=1e-9, atol=1e-300)
        assert (rows["p"] < 1e-10).all()  # volumes of ~7000 mm³ are far from 0
