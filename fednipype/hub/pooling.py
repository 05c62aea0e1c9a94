"""Pooling site releases two ways side by side: pooled regression and meta-analysis.

:func:`pool` takes releases checked by :func:`fednipype.hub.releases.load_releases` and pools
their sufficient statistics as

- a **pooled regression** (mega-analysis): one least-squares problem solved exactly from the
  sites' sufficient statistics, with an intercept per site (site as a fixed effect) and common
  slopes, :func:`fednipype.hub.regression.pooled_regression`;
- a **meta-analysis** of each site's own estimates, fixed-effect and random-effects
  (:func:`fednipype.hub.meta_analysis.fixed_effect`,
  :func:`fednipype.hub.meta_analysis.random_effects`),

with every number converted back to the original units of the feature and the covariates
(:meth:`fednipype.contract.scaling.Scaling.unscale`). Nothing here draws plots or writes
files: :mod:`fednipype.hub.reports` does that.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fednipype.contract.scaling import Scaling
from fednipype.exceptions import MetaAnalysisError
from fednipype.hub.meta_analysis import RE_METHODS, TESTS, fixed_effect, random_effects
from fednipype.hub.regression import pooled_regression, site_estimates
from fednipype.hub.releases import SiteRelease, load_releases, short_list

LOGGER = logging.getLogger(__name__)

__all__ = [
    "RESULT_COLUMNS",
    "SITE_COLUMNS",
    "PoolResult",
    "pool",
]

#: Columns of :attr:`PoolResult.results`, one row per region, term and method.
RESULT_COLUMNS = (
    "region",
    "term",
    "method",
    "test",
    "estimate",
    "se",
    "statistic",
    "df",
    "p",
    "ci_low",
    "ci_high",
    "k",
    "n",
    "tau2",
    "i2",
    "h2",
    "q",
    "q_df",
    "q_p",
    "psd_projected",
    "sigma2_floored",
    "note",
)

#: Columns of :attr:`PoolResult.sites`, one row per site, region and term.
SITE_COLUMNS = (
    "site",
    "region",
    "term",
    "estimate",
    "se",
    "df",
    "p",
    "ci_low",
    "ci_high",
    "n",
    "estimable",
    "included",
    "weight_fe",
    "weight_re",
    "psd_projected",
    "sigma2_floored",
)

POOLED_REGRESSION = "pooled_regression"
FIXED_EFFECT = "fixed_effect"
RE_PREFIX = "random_effects_"


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoolResult:
    """What :func:`pool` returns.

    Attributes
    ----------
    results : pandas.DataFrame
        One row per region, term and method, columns :data:`RESULT_COLUMNS`, in original
        units. ``method`` is ``"pooled_regression"`` (mega-analysis with site intercepts unless
        ``site_effects`` is False, t test with ``df`` degrees of freedom, ``df = inf`` meaning
        z; its ``intercept`` row is the participant-weighted mean of the site intercepts and
        its ``note`` says site intercepts were fitted), ``"fixed_effect"``
        (inverse-variance, z test) or ``"random_effects_<METHOD>"`` (τ² estimator ``METHOD``,
        ``test`` z or Knapp–Hartung). ``statistic`` is t or z; ``k`` the number of sites the
        row pools; ``n`` their (noisy) participant count. ``tau2`` (squared original units),
        ``i2`` (percent), ``h2``, ``q``, ``q_df``, ``q_p`` are the heterogeneity statistics of
        the meta-analysis rows (NaN for the pooled regression). ``psd_projected`` and
        ``sigma2_floored`` say whether the DP noise forced a correction (for meta-analysis
        rows: at any of the pooled sites). ``note`` explains special cases (k = 1, a term no
        site could estimate).
    sites : pandas.DataFrame
        Each site's own fit, one row per site, region and term, columns :data:`SITE_COLUMNS`,
        in original units: the input of the meta-analysis and of the forest plots.
        ``included`` marks the rows the meta-analysis used; ``weight_fe`` and ``weight_re``
        are their weights in percent.
    releases : tuple of SiteRelease
        The releases pooled, in order.
    method, test : str
        The random-effects τ² estimator and test.
    level : float
        Confidence level of every interval.
    notes : tuple of str
        Warnings for the reader (PSD projections, floored residual variances, special cases).
    site_effects : bool
        Whether the pooled regression fitted one intercept per site.
    """

    results: pd.DataFrame
    sites: pd.DataFrame
    releases: tuple[SiteRelease, ...]
    method: str
    test: str
    level: float
    notes: tuple[str, ...] = field(default=())
    site_effects: bool = True

    @property
    def regions(self) -> list[str]:
        """Regions in the results, in atlas order."""
        return list(dict.fromkeys(self.results["region"]))

    @property
    def terms(self) -> list[str]:
        """Model terms, intercept first."""
        return list(self.releases[0].doc["model"]["terms"])

    @property
    def feature(self) -> str:
        """The regional feature that was modelled."""
        return str(self.releases[0].doc["feature"])

    @property
    def re_method(self) -> str:
        """The ``method`` label of the random-effects rows."""
        return RE_PREFIX + self.method


def pool(
    releases: Sequence[SiteRelease | str | os.PathLike[str]],
    method: str = "REML",
    test: str = "z",
    regions: Sequence[str] | None = None,
    *,
    level: float = 0.95,
    site_effects: bool = True,
) -> PoolResult:
    """Pool site releases by pooled regression and by fixed- and random-effects meta-analysis.

    Parameters
    ----------
    releases : sequence of SiteRelease or path-like
        From :func:`load_releases`; paths are loaded (and checked) with it.
    method : {"REML", "DL", "PM"}
        τ² estimator of the random-effects meta-analysis.
    test : {"z", "knha"}
        Inference of the random-effects model: Wald z or Knapp–Hartung t with k − 1 df. The
        fixed-effect model always uses z (Knapp–Hartung is a random-effects method).
    regions : sequence of str, optional
        Regions to report (all by default), in atlas order.
    level : float
        Confidence level, default 0.95.
    site_effects : bool
        Fit the pooled regression with one intercept per site and common slopes (default), as
        a mega-analysis with site as a fixed effect: site offsets that go with the sites'
        covariates (age ranges, patient shares) then do not bias the slopes. ``False`` fits one
        common intercept.

    Returns
    -------
    PoolResult

    Notes
    -----
    Every site contributes to the pooled regression. With site intercepts, its ``intercept``
    row is their mean weighted by the sites' (noisy) participant counts; a slope is then
    estimated from the covariate's variation within sites, so a covariate that is constant
    within every site (all patients at some sites, all controls at others) is not identified
    there. The meta-analysis of a region and term
    uses the sites whose own estimate is finite (a site that cannot estimate a term — e.g. no
    patients, without DP noise — is left out and marked ``included = False``). With one site
    left, the meta-analysis follows metafor: τ² = 0, Q = 0 (p = 1), I² = 0, H² = 1; a
    Knapp–Hartung test would have 0 degrees of freedom, so — as metafor's NA — the standard
    error, p-value and interval of that random-effects row are NaN. The intercept, in original
    units, is the expected feature value at the covariates' centers
    (:meth:`fednipype.contract.scaling.Scaling.unscale`).

    Raises
    ------
    ReleaseValidationError
        As :func:`load_releases`.
    MetaAnalysisError
        Unknown method, test or region, or statistics that cannot be solved.
    """
    items = list(releases)
    if not items or not all(isinstance(r, SiteRelease) for r in items):
        items = load_releases([r.path if isinstance(r, SiteRelease) else r for r in items])
    method_name = str(method).upper()
    if method_name not in RE_METHODS:
        raise MetaAnalysisError(
            f"method must be one of {', '.join(RE_METHODS)} (random-effects τ² estimator); "
            f"got {method!r}"
        )
    test_name = str(test).lower()
    if test_name not in TESTS:
        raise MetaAnalysisError(f"test must be one of {', '.join(TESTS)}; got {test!r}")
    all_regions = list(items[0].doc["atlas"]["regions"])
    selected = _select_regions(all_regions, regions)

    stats = {release.site: release.statistics() for release in items}
    terms = list(items[0].doc["model"]["terms"])
    # Sites may have released covariates in their own public ranges: report in the envelope's
    # units, each site's statistics converted exactly (Scaling.conversion_to).
    scaling = Scaling.envelope([release.scaling for release in items], terms)
    units = {release.site: release.scaling.conversion_to(scaling, terms) for release in items}
    pooled = pooled_regression(stats, site_effects=site_effects, level=level, units=units)
    per_site = site_estimates(stats, level=level, units=units)
    pooled = scaling.unscale(_keep_regions(pooled, selected))
    per_site = scaling.unscale(_keep_regions(per_site, selected))

    notes = _noise_notes(pooled, per_site)
    rows: list[dict[str, Any]] = []
    weights_fe = np.full(len(per_site), np.nan)
    weights_re = np.full(len(per_site), np.nan)
    included = np.zeros(len(per_site), dtype=bool)
    by_cell = per_site.groupby(["region", "term"], sort=False).indices
    for prow in pooled.itertuples(index=False):
        rows.append(_pooled_row(prow, n_sites=len(items), site_effects=site_effects))
        index = by_cell[(prow.region, prow.term)]
        cell = per_site.iloc[index]
        ok = (
            np.isfinite(cell["estimate"].to_numpy(dtype=float))
            & np.isfinite(cell["se"].to_numpy(dtype=float))
            & (cell["se"].to_numpy(dtype=float) > 0.0)
        )
        included[index] = ok
        fe_row, re_row, w_fe, w_re = _meta_rows(
            cell[ok], prow.region, prow.term, method_name, test_name, level
        )
        rows += [fe_row, re_row]
        weights_fe[index[ok]] = w_fe
        weights_re[index[ok]] = w_re

    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    notes += _coverage_notes(results, len(items))
    sites = per_site.assign(included=included, weight_fe=weights_fe, weight_re=weights_re)
    sites = sites[list(SITE_COLUMNS)].reset_index(drop=True)
    for note in notes:
        LOGGER.warning("%s", note)
    return PoolResult(
        results=results,
        sites=sites,
        releases=tuple(items),
        method=method_name,
        test=test_name,
        level=float(level),
        notes=tuple(dict.fromkeys(notes)),
        site_effects=bool(site_effects),
    )


def _select_regions(all_regions: list[str], regions: Sequence[str] | None) -> list[str]:
    if regions is None:
        return all_regions
    if isinstance(regions, str):
        regions = [regions]
    unknown = [r for r in regions if r not in all_regions]
    if unknown:
        raise MetaAnalysisError(
            f"region(s) {short_list(unknown)} are not in the releases' atlas; its regions are "
            f"{short_list(all_regions)}"
        )
    if not regions:
        raise MetaAnalysisError("regions is empty: name at least one region, or pass None")
    wanted = set(regions)
    return [r for r in all_regions if r in wanted]


def _keep_regions(table: pd.DataFrame, regions: list[str]) -> pd.DataFrame:
    return table[table["region"].isin(regions)].reset_index(drop=True)


def _noise_notes(pooled: pd.DataFrame, per_site: pd.DataFrame) -> list[str]:
    """Say where the DP noise forced a PSD projection or a floored residual variance."""
    notes = []
    if pooled["psd_projected"].any():
        notes.append(
            "pooled regression: the noisy ZᵀZ of its normal equations was not positive definite "
            "beyond the noise level; its eigenvalues were floored at the DP noise sd "
            "(psd_projected)"
        )
    projected = list(dict.fromkeys(per_site.loc[per_site["psd_projected"], "site"]))
    if projected:
        notes.append(
            f"site(s) {', '.join(map(str, projected))}: the noisy ZᵀZ was not positive definite "
            "beyond the noise level; eigenvalues floored at the DP noise sd (psd_projected)"
        )
    floored = pooled.loc[pooled["sigma2_floored"], "region"].unique()
    if len(floored):
        notes.append(
            f"pooled regression: residual variance of {short_list(list(floored))} fell below "
            "the DP noise level and was floored at one noise sd (sigma2_floored)"
        )
    floored_sites = list(dict.fromkeys(per_site.loc[per_site["sigma2_floored"], "site"]))
    if floored_sites:
        notes.append(
            f"site(s) {', '.join(map(str, floored_sites))}: residual variance of some regions "
            "fell below the DP noise level and was floored at one noise sd (sigma2_floored)"
        )
    return notes


def _coverage_notes(results: pd.DataFrame, n_sites: int) -> list[str]:
    """Summarise the meta-analyses that could not use every site."""
    meta = results[results["method"] == FIXED_EFFECT]
    if n_sites == 1:
        return [
            "one release: the meta-analysis rows summarise a single site (k = 1: tau2 = 0, "
            "Q = 0, I2 = 0, as metafor)"
        ]
    notes = []
    short = meta[meta["k"] < n_sites]
    for (term, k), cell in short.groupby(["term", "k"], sort=False):
        notes.append(
            f"term {term}: only {k} of {n_sites} sites could estimate it in "
            f"{short_list(list(cell['region']))}; the meta-analysis there pools k = {k}"
            + (" (tau2 = 0, Q = 0, I2 = 0, as metafor)" if k == 1 else "")
        )
    return notes


#: ``note`` of the pooled-regression rows fitted with site intercepts.
SITE_EFFECTS_NOTE = "site intercepts fitted (site as fixed effect)"
SITE_INTERCEPT_NOTE = SITE_EFFECTS_NOTE + "; intercept = participant-weighted mean of them"


def _pooled_row(prow: Any, n_sites: int, site_effects: bool) -> dict[str, Any]:
    df = float(prow.df)
    notes = []
    if site_effects:
        notes.append(SITE_INTERCEPT_NOTE if prow.term == "intercept" else SITE_EFFECTS_NOTE)
    if not prow.estimable:
        notes.append("term not identified by the pooled data")
    return {
        "region": prow.region,
        "term": prow.term,
        "method": POOLED_REGRESSION,
        "test": "z" if math.isinf(df) else "t",
        "estimate": float(prow.estimate),
        "se": float(prow.se),
        "statistic": float(prow.t),
        "df": df,
        "p": float(prow.p),
        "ci_low": float(prow.ci_low),
        "ci_high": float(prow.ci_high),
        "k": n_sites,
        "n": float(prow.n),
        "tau2": math.nan,
        "i2": math.nan,
        "h2": math.nan,
        "q": math.nan,
        "q_df": math.nan,
        "q_p": math.nan,
        "psd_projected": bool(prow.psd_projected),
        "sigma2_floored": bool(prow.sigma2_floored),
        "note": "; ".join(notes),
    }


def _empty_meta_row(region: str, term: str, method: str, test: str, note: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS, math.nan)
    row.update(
        region=region,
        term=term,
        method=method,
        test=test,
        k=0,
        n=0.0,
        psd_projected=False,
        sigma2_floored=False,
        note=note,
    )
    return row


def _meta_rows(
    cell: pd.DataFrame, region: str, term: str, method: str, test: str, level: float
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray, np.ndarray]:
    """Fixed-effect and random-effects rows for one region and term, and the site weights."""
    re_label = RE_PREFIX + method
    k = len(cell)
    if k == 0:
        note = "no site could estimate this term"
        return (
            _empty_meta_row(region, term, FIXED_EFFECT, "z", note),
            _empty_meta_row(region, term, re_label, test, note),
            np.array([]),
            np.array([]),
        )
    y = cell["estimate"].to_numpy(dtype=float)
    v = cell["se"].to_numpy(dtype=float) ** 2
    common = {
        "region": region,
        "term": term,
        "k": k,
        "n": float(cell["n"].sum()),
        "psd_projected": bool(cell["psd_projected"].any()),
        "sigma2_floored": bool(cell["sigma2_floored"].any()),
    }
    fe = fixed_effect(y, v, test="z", level=level)
    fe_row = {**common, **_meta_fields(fe), "method": FIXED_EFFECT}
    if k == 1 and test == "knha":
        re = random_effects(y, v, method=method, test="z", level=level)
        re_row = {
            **common,
            **_meta_fields(re),
            "method": re_label,
            "test": "knha",
            "se": math.nan,
            "statistic": math.nan,
            "df": 0.0,
            "p": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "note": (
                "k = 1: tau2 set to 0, Q = 0 (p = 1), I2 = 0 and H2 = 1; the Knapp-Hartung t "
                "test has 0 degrees of freedom, so se, p and interval are not available (NA in "
                "metafor)"
            ),
        }
    else:
        re = random_effects(y, v, method=method, test=test, level=level)
        re_row = {**common, **_meta_fields(re), "method": re_label}
    w_fe = 100.0 * np.asarray(fe.weights) / math.fsum(fe.weights)
    w_re = 100.0 * np.asarray(re.weights) / math.fsum(re.weights)
    return fe_row, re_row, w_fe, w_re


def _meta_fields(res: Any) -> dict[str, Any]:
    return {
        "test": res.test,
        "estimate": res.estimate,
        "se": res.se,
        "statistic": res.statistic,
        "df": math.inf if res.df is None else float(res.df),
        "p": res.p,
        "ci_low": res.ci_low,
        "ci_high": res.ci_high,
        "tau2": res.tau2,
        "i2": res.i2,
        "h2": res.h2,
        "q": res.q,
        "q_df": float(res.q_df),
        "q_p": res.q_p,
        "note": res.note or "",
    }
