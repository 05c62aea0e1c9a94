"""The hub's side of a federated request: from the securely summed vector to pooled tables.

The hub receives only the consortium's sum of the sites' integer vectors
(:mod:`fednipype.contract.secure_sum`) and the list of sites that contributed to it. From the
sum it solves the same pooled regression as ``fednipype-meta`` — one intercept per
contributing site and common slopes (site as a fixed effect) — with every standard error
carrying the noise of the mode (:func:`fednipype.hub.regression.fit_normal_equations`), and
converts the results to the original units of the feature and covariates, as a release is.

With site slots α_k (k contributing), covariate terms C and summed pieces (n_k, s_k = Σ z,
t_k = Σ y per slot; S = Σ ZᵀZ over C, U = Σ ZᵀY over C, yᵀy), the normal equations are::

    [ diag(n_k)  [s_kᵀ] ] [α]   [ t_k ]
    [ [s_k]        S    ] [β] = [  U  ]

where the diagonal entries of S of the ±1 dummies are Σ n_k (not sent). A site that did not
contribute has a zero slot (or a slot of noise only, in distributed-dp): it is left out of the
system. The noise variances are those of :meth:`SumLayout.noise_variance`; the counts' noise
is tied (n_k is both α_k's diagonal and, summed, the dummies' diagonals).

Nothing here draws noise or talks to the network: it is post-processing of the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import Grid, SumLayout, dp_sigma
from fednipype.exceptions import FederationError, RequestError
from fednipype.hub.pooling import (
    POOLED_REGRESSION,
    RESULT_COLUMNS,
    SITE_COLUMNS,
    SITE_EFFECTS_NOTE,
    SITE_INTERCEPT_NOTE,
)
from fednipype.hub.regression import NormalEquations, fit_normal_equations

LOGGER = logging.getLogger(__name__)

__all__ = ["contributing_slots", "normal_equations", "pooled_from_sum"]

#: Prefix of the site-intercept rows in the internal fit (split off into the per-site table).
_SITE_TERM = "intercept@"


def contributing_slots(request: AnalysisRequest, contributing: Sequence[str]) -> list[int]:
    """The slots of the contributing sites, checked against the request.

    Raises
    ------
    FederationError
        A site is unknown or listed twice, or fewer than ``min_sites`` contributed.
    """
    if isinstance(contributing, str):
        contributing = [contributing]
    labels = list(contributing)
    if len(set(labels)) != len(labels):
        raise FederationError(f"{request.source}: a contributing site is listed twice: {labels}")
    try:
        slots = sorted(request.slot(site) for site in labels)
    except RequestError as err:
        raise FederationError(str(err)) from err
    if len(slots) < request.min_sites:
        raise FederationError(
            f"{request.source}: only {len(slots)} of {request.k} sites contributed; the request "
            f"needs at least min_sites = {request.min_sites}"
        )
    return slots


def _noise_sd(request: AnalysisRequest, noise_sd: float | None) -> float:
    if request.mode == "exact":
        if noise_sd not in (None, 0, 0.0):
            raise RequestError(f"{request.source}: exact mode has no noise; got {noise_sd!r}")
        return 0.0
    if noise_sd is None:
        if request.mode == "distributed-dp":
            raise RequestError(
                f"{request.source}: distributed-dp needs the sites' noise sd (grid units x step)"
            )
        return dp_sigma(request)
    if not (math.isfinite(noise_sd) and noise_sd >= 0):
        raise RequestError(f"{request.source}: noise sd must be >= 0, got {noise_sd!r}")
    return float(noise_sd)


def normal_equations(
    request: AnalysisRequest, summed: Any, slots: Sequence[int], noise_sd: float
) -> NormalEquations:
    """The system with site intercepts from a decoded sum (scaled units) and its noise.

    Parameters
    ----------
    request : AnalysisRequest
    summed : array_like
        The decoded sum, length :attr:`SumLayout.size`.
    slots : sequence of int
        The contributing slots (:func:`contributing_slots`).
    noise_sd : float
        One site's noise sd per coordinate (scaled units); 0 without noise.

    Returns
    -------
    NormalEquations
        Unknowns (α_k for each contributing slot, then the covariate slopes); reported rows:
        the n-weighted mean of the α_k (``intercept``), the slopes, then each α_k.
    """
    layout = SumLayout.from_request(request)
    parts = layout.split(summed)
    var = layout.split(layout.noise_variance(request.mode, noise_sd, slots))
    slots = list(slots)
    m, c = len(slots), layout.c
    size = m + c
    cov = list(request.terms[1:])
    dummies = [cov.index(d) for d in request.dummies]
    n_k = parts.n[slots]
    a = np.zeros((size, size))
    a_var = np.zeros((size, size))
    k = np.arange(m)
    a[k, k] = n_k
    a[:m, m:] = parts.z[slots]
    a[m:, :m] = parts.z[slots].T
    a[m:, m:] = parts.ztz
    a[m + np.array(dummies, dtype=int), m + np.array(dummies, dtype=int)] = n_k.sum()
    a_var[:m, m:] = var.z[slots]
    a_var[m:, :m] = var.z[slots].T
    a_var[m:, m:] = var.ztz  # dummies' diagonal is 0 there: they are tied to the counts
    tied = np.zeros((m, size))
    tied[k, k] = 1.0
    tied[:, m + np.array(dummies, dtype=int)] = 1.0
    weights = np.maximum(n_k, 1.0)  # a noisy count can be small or negative
    contrasts = np.zeros((1 + c + m, size))
    contrasts[0, :m] = weights / weights.sum()
    contrasts[1 : 1 + c, m:] = np.eye(c)
    contrasts[1 + c :, :m] = np.eye(m)
    n_total = float(n_k.sum())
    if noise_sd > 0 and n_total < size + 1:
        LOGGER.warning("noisy n = %.1f raised to %d (unknowns + 1)", n_total, size + 1)
        n_total = float(size + 1)
    return NormalEquations(
        a=a,
        b=np.vstack([parts.y[slots], parts.zty]),
        c=parts.yty,
        n=n_total,
        a_var=a_var,
        b_var=np.concatenate([var.y[slots].max(axis=1), var.zty.max(axis=1)]),
        c_var=float(var.yty.max()),
        tied=tied,
        tied_var=var.n[slots],
        contrasts=contrasts,
        terms=(*request.terms, *(_SITE_TERM + request.sites[s] for s in slots)),
        regions=request.regions,
    )


def pooled_from_sum(
    request: AnalysisRequest,
    summed: Any,
    contributing: Sequence[str],
    *,
    noise_sd: float | None = None,
    grid: Grid | None = None,
    level: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pooled regression of a federated request from its securely summed vector.

    Parameters
    ----------
    request : AnalysisRequest
        The request the sites answered.
    summed : array_like of int
        The sum of the sites' integer vectors (length :attr:`SumLayout.size`).
    contributing : sequence of str
        Labels of the sites whose vectors are in the sum (the others' slots are ignored).
    noise_sd : float, optional
        One site's noise sd per coordinate, scaled units. Default: 0 in exact mode,
        :func:`~fednipype.contract.secure_sum.dp_sigma` in dp mode; required in
        distributed-dp (the integer sd times the grid step).
    grid : Grid, optional
        The grid the sites encoded on (default :meth:`Grid.for_request`).
    level : float
        Confidence level.

    Returns
    -------
    pooled : pandas.DataFrame
        Columns :data:`fednipype.hub.pooling.RESULT_COLUMNS`, method ``pooled_regression``,
        one row per region and term, original units (as ``pooled_results.tsv``).
    sites : pandas.DataFrame
        Columns :data:`fednipype.hub.pooling.SITE_COLUMNS`: each contributing site's own
        intercept (the expected feature at the covariates' centers at that site), original
        units; a secure sum holds no per-site slopes, so there are no other rows.

    Raises
    ------
    FederationError
        Too few contributing sites, an unknown site, a sum of the wrong shape or, in exact
        mode, a non-zero slot of a site that is not listed as contributing.
    """
    layout = SumLayout.from_request(request)
    slots = contributing_slots(request, contributing)
    sd = _noise_sd(request, noise_sd)
    grid = grid or Grid.for_request(request)
    ints = np.asarray(summed)
    if ints.shape != (layout.size,) or ints.dtype.kind not in "iu":
        raise FederationError(
            f"{request.source}: expected a summed integer vector of {layout.size} entries, got "
            f"{ints.dtype} of shape {ints.shape}"
        )
    if np.abs(ints).max(initial=0) > request.k * grid.bound:
        raise FederationError(f"{request.source}: a summed entry exceeds {request.k} x bound")
    if request.mode != "distributed-dp":
        for s in set(range(request.k)) - set(slots):
            if ints[layout.slot_range(s)].any():
                raise FederationError(
                    f"{request.source}: the slot of {request.sites[s]!r} is not zero, but the "
                    "site is not listed as contributing"
                )
    eq = normal_equations(request, grid.decode(ints), slots, sd)
    where = f"federated pooled fit of {len(slots)} site(s), {request.mode} mode"
    fit = fit_normal_equations(eq, level=level, where=where)
    own = fit["term"].str.startswith(_SITE_TERM)
    scaling = request.scaling
    pooled = scaling.unscale(fit[~own].reset_index(drop=True))
    per_site = fit[own].reset_index(drop=True)
    site = per_site["term"].str.slice(len(_SITE_TERM))
    per_site = scaling.unscale(per_site.assign(term="intercept"))
    per_site["site"] = site.to_numpy()
    counts = {request.sites[s]: float(eq.a[i, i]) for i, s in enumerate(slots)}
    per_site["n"] = per_site["site"].map(counts)
    return _pooled_table(pooled, len(slots), request.mode), _site_table(per_site)


def _pooled_table(pooled: pd.DataFrame, k: int, mode: str) -> pd.DataFrame:
    rows = []
    for prow in pooled.itertuples(index=False):
        notes = [SITE_INTERCEPT_NOTE if prow.term == "intercept" else SITE_EFFECTS_NOTE]
        notes.append(f"secure sum of {k} sites ({mode})")
        if not prow.estimable:
            notes.append("term not identified by the pooled data")
        row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS, math.nan)
        row.update(
            region=prow.region,
            term=prow.term,
            method=POOLED_REGRESSION,
            test="z" if math.isinf(prow.df) else "t",
            estimate=prow.estimate,
            se=prow.se,
            statistic=prow.t,
            df=prow.df,
            p=prow.p,
            ci_low=prow.ci_low,
            ci_high=prow.ci_high,
            k=k,
            n=prow.n,
            psd_projected=bool(prow.psd_projected),
            sigma2_floored=bool(prow.sigma2_floored),
            note="; ".join(notes),
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _site_table(per_site: pd.DataFrame) -> pd.DataFrame:
    out = per_site.assign(included=False, weight_fe=math.nan, weight_re=math.nan)
    return out[list(SITE_COLUMNS)].reset_index(drop=True)
