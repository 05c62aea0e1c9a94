"""Pooled regression from per-site sufficient statistics, with the DP noise in every SE.

:func:`pooled_regression` solves the pooled least-squares problem exactly from per-site
sufficient statistics of a linear model (ZᵀZ, Zᵀy, yᵀy, n;
:class:`~fednipype.contract.statistics.SufficientStatistics`): by default with one intercept
per site and common slopes (site as a fixed effect, as mega-analyses do), or with one common
intercept on the summed statistics; :func:`site_estimates` solves each site's own model so its
coefficients can be fed to :func:`fednipype.hub.meta_analysis.random_effects`. Both carry the
variance the differential-privacy noise adds into every standard error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import MetaAnalysisError
from fednipype.hub.meta_analysis import check_level
from fednipype.hub.systems import _Block, _System, _units

LOGGER = logging.getLogger(__name__)

__all__ = [
    "REGRESSION_COLUMNS",
    "NormalEquations",
    "fit_normal_equations",
    "pooled_regression",
    "site_estimates",
]

#: Columns of the tables returned by :func:`pooled_regression` and :func:`site_estimates`.
REGRESSION_COLUMNS = (
    "region",
    "term",
    "estimate",
    "se",
    "t",
    "df",
    "p",
    "ci_low",
    "ci_high",
    "n",
    "resid_df",
    "sigma2",
    "estimable",
    "psd_projected",
    "sigma2_floored",
)


def _site_list(stats: Any) -> list[tuple[Any, SufficientStatistics]]:
    """``stats`` as (label, SufficientStatistics) pairs, all with the same terms and regions."""
    if isinstance(stats, SufficientStatistics):
        items: list[tuple[Any, Any]] = [(0, stats)]
    elif isinstance(stats, Mapping):
        items = list(stats.items())
    elif isinstance(stats, Iterable) and not isinstance(stats, (str, bytes)):
        items = list(enumerate(stats))
    else:
        raise MetaAnalysisError(
            f"stats must be SufficientStatistics or a sequence/mapping of them; got {stats!r}"
        )
    if not items:
        raise MetaAnalysisError("stats is empty: need at least one site's SufficientStatistics")
    first_label, first = items[0]
    for label, site in items:
        if not isinstance(site, SufficientStatistics):
            raise MetaAnalysisError(
                f"stats[{label!r}] must be SufficientStatistics; got {type(site).__name__}"
            )
        if site.n <= 0:
            raise MetaAnalysisError(
                f"stats[{label!r}]: SufficientStatistics.n must be positive; got {site.n!r}"
            )
        for field in ("terms", "regions", "n_terms"):
            if getattr(site, field) != getattr(first, field):
                raise MetaAnalysisError(
                    f"stats[{label!r}].{field} {getattr(site, field)!r} differ from "
                    f"stats[{first_label!r}].{field} {getattr(first, field)!r}"
                )
    return items


def pooled_regression(
    stats: Any, *, site_effects: bool = True, level: float = 0.95, units: Any = None
) -> pd.DataFrame:
    """Fit the pooled (mega-analysis) linear model from the sites' statistics.

    With ``site_effects=True`` (the default) every site gets its own intercept and the slopes
    are common, as in a mega-analysis with site as a fixed effect: site offsets that correlate
    with the covariates (sites recruiting different age ranges on different scanners) then do
    not bias the slopes. The fit is exact from the per-site statistics. For site k with
    n_k = ZₖᵀZₖ[0, 0], s_k = ZₖᵀZₖ[0, 1:], S_k = ZₖᵀZₖ[1:, 1:], t_k = ZₖᵀY[0] and
    U_k = ZₖᵀY[1:], the unknowns θ = (α_1, …, α_K, β) solve the normal equations

    .. math::

        \\begin{pmatrix} \\operatorname{diag}(n_k) & [s_k^T]_k \\\\ [s_k]_k & \\sum_k S_k
        \\end{pmatrix} θ = \\begin{pmatrix} [t_k]_k \\\\ \\sum_k U_k \\end{pmatrix},

    yᵀy is summed and the residual degrees of freedom are n − K − (p − 1). The ``intercept``
    row reports the participant-weighted mean of the site intercepts, Σ n_k α_k / Σ n_k with
    n_k the sites' ``n``: the expected response at the covariates' zero (their centers, in
    released units) averaged over the pooled participants' sites. Its standard error is that
    of this linear combination (the released counts are treated as fixed weights). Without
    noise, the slopes, their standard errors, t statistics, p-values and intervals are those
    of ordinary least squares on the pooled rows with site dummies (``y ~ 0 + C(site) + …``),
    and the intercept row is that model's estimate of Σ n_k α_k / n. With a single site the
    model is the site's own regression.

    With ``site_effects=False`` the sites' ZᵀZ, ZᵀY, yᵀy, n are summed and one model with a
    common intercept is solved: ordinary least squares on the pooled rows without site terms.

    Sites may have released in their own units (each its public range of a numeric covariate,
    e.g. its recruitment age range): ``units`` then gives, per site, the exact map of its
    design columns to common units, z ↦ d z + e (:meth:`Scaling.conversion_to
    <fednipype.contract.scaling.Scaling.conversion_to>`). With site intercepts the shift e
    is absorbed by the site's intercept, so site k enters with D_k = diag(d) as
    D_k ZₖᵀZₖ D_k and D_k ZₖᵀY, its noise variances scaled entry by entry (still independent),
    and the reported intercept is corrected by −Σ_k (n_k / n) e_kᵀβ. The fit equals the fit
    of the rows converted to common units. A common intercept (``site_effects=False``) needs
    every site in the same units.

    DP noise is included in every standard error. Each released entry of ZᵀZ (upper triangle,
    mirrored), ZᵀY and yᵀy carries independent Gaussian noise; in the normal equations Ãθ = b̃
    an entry that belongs to one site (its count, its s_k, its t_k) carries that site's noise
    variance and a summed entry the sum of the sites' variances. With per-entry variances
    V (symmetric, for Ã) and f (for b̃), writing Ã = A + E, b̃ = b + F, the estimate
    satisfies θ̂ − θ = Ã⁻¹ (Xᵀε + F − Eθ), so to first order (delta method)

    .. math::

        \\operatorname{Cov}(θ̂) ≈ Ã^{-1} [σ^2 Ã + \\operatorname{diag}(f) + W] Ã^{-1},\\quad
        W = \\operatorname{Var}(Eθ) = \\operatorname{diag}(V θ^{∘2}) + V ∘ θθ^T
        - \\operatorname{diag}(V_{aa} θ_a^2),

    the last form because the same noise draw appears at (a, b) and (b, a). Reported rows are
    linear combinations Lθ̂ with variance diag(L Cov(θ̂) Lᵀ). The unknown θθᵀ is estimated by
    the positive semi-definite part of θ̂θ̂ᵀ − Cov₀(θ̂), Cov₀ the part that does not depend on θ
    (the plug-in θ̂θ̂ᵀ would over-state it by Cov(θ̂), which DP noise can make larger than θθᵀ).
    The residual sum of squares c̃ − b̃ᵀÃ⁻¹b̃ is de-biased for the noise it contains
    (+ Σ_a f_a [Ã⁻¹]_aa + tr(Ã⁻¹W)) and floored at one standard deviation of its own DP noise,
    which keeps σ̂² positive and errs on the conservative side (``sigma2_floored`` marks it).
    The t reference distribution takes Satterthwaite degrees of freedom from the variance of
    σ̂² (sampling plus noise): the residual df without noise, growing towards a z test as the
    known DP noise dominates the standard error. With equal variances in every entry
    (``site_effects=False``, or one site) these formulas are the usual
    Ã⁻¹ [σ²Ã + σ_F² I + σ_E² (‖β‖² I + ββᵀ − diag(β²))] Ã⁻¹.

    If the noisy Ã is not positive definite beyond its noise level, its eigenvalues are
    floored there, ``psd_projected`` is set and a warning is logged. The level is measured in
    noise units (eigenvalues of GÃG, G = diag(V_aa^(-1/4)), below 1): with equal variances σ_E²
    in every entry, eigenvalues of Ã below σ_E are floored at σ_E.

    Parameters
    ----------
    stats : SufficientStatistics, or a sequence or mapping of them
        One per site; all must share ``terms`` and ``regions``.
    site_effects : bool
        Fit one intercept per site (default) or a common intercept.
    level : float
        Confidence level as a fraction, default 0.95.
    units : sequence or mapping of (d, e), optional
        Per site (in the order or with the keys of ``stats``), the map of its design columns
        to common units, two arrays with one entry per term. Default: all sites in the same
        units.

    Returns
    -------
    pandas.DataFrame
        One row per region and term with columns ``region, term, estimate, se, t, df, p,
        ci_low, ci_high, n, resid_df, sigma2, estimable, psd_projected, sigma2_floored``.
        ``t`` is referred to a t distribution with ``df`` degrees of freedom (``inf`` = z).
        Terms not identified by the data (exact collinearity without noise, e.g. a covariate
        constant within every site when site intercepts are fitted) get NaN and
        ``estimable = False``.

    Examples
    --------
    >>> z = np.column_stack([np.ones(4), [0.0, 1.0, 2.0, 3.0]])
    >>> y = np.array([[1.0], [2.9], [5.1], [7.0]])
    >>> site = SufficientStatistics(("intercept", "x"), ("roi",), z.T @ z, z.T @ y,
    ...                             (y * y).sum(0), n=4)
    >>> pooled_regression([site])[["term", "estimate", "se"]].round(4).to_numpy().tolist()
    [['intercept', 0.97, 0.0794], ['x', 2.02, 0.0424]]
    """
    items = _site_list(stats)
    level = check_level(level)
    if not isinstance(site_effects, (bool, np.bool_)):
        raise MetaAnalysisError(f"site_effects must be True or False; got {site_effects!r}")
    first = items[0][1]
    sites = _Block.stack([site for _, site in items], _units(items, units))
    if site_effects:
        system = _System.with_site_intercepts(sites)
        where = [f"pooled fit of {len(items)} site(s) with site intercepts"]
    else:
        if not sites.same_units:
            raise MetaAnalysisError(
                "the sites released in their own units (per-site covariate ranges): a common "
                "intercept needs common units; fit site intercepts (site_effects=True)"
            )
        system = _System.of(sites.total())
        where = [f"pooled fit of {len(items)} site(s)"]
    solution = _solve(system, first.terms, where)
    second = _theta_second_moment(system, solution)
    fit = _inference(system, solution, second, level, first, where)
    return pd.DataFrame(fit, columns=list(REGRESSION_COLUMNS))


def site_estimates(stats: Any, *, level: float = 0.95, units: Any = None) -> pd.DataFrame:
    """Fit each site's own linear model, with the same noise handling as :func:`pooled_regression`.

    The rows can be pooled across sites per region and term with :func:`random_effects`, using
    ``estimate`` as ``y`` and ``se ** 2`` as ``v`` (drop rows with ``estimable == False``).

    The one term of the standard error that depends on the true β (the ZᵀZ noise, Var(Eβ)) is
    evaluated at the pooled fit's β (common intercept) rather than at the site's own β̂: the
    site's estimate is too noisy for it and, worse, correlated with its own error, which would
    make large errors look precise and small ones uncertain.

    Parameters
    ----------
    stats : SufficientStatistics, or a sequence or mapping of them
        One per site; a mapping's keys become the ``site`` labels, otherwise positions are used.
    level : float
        Confidence level as a fraction, default 0.95.
    units : sequence or mapping of (d, e), optional
        As :func:`pooled_regression`: each site's estimates are reported in common units
        (slopes of d z, the intercept at the common centers). The β of the noise term is then
        the pooled fit's with site intercepts.

    Returns
    -------
    pandas.DataFrame
        The columns of :func:`pooled_regression` preceded by ``site``, one row per site, region
        and term.
    """
    items = _site_list(stats)
    level = check_level(level)
    first = items[0][1]
    sites = _Block.stack([site for _, site in items], _units(items, units))
    if sites.same_units:
        total = _System.of(sites.total())
        second = _theta_second_moment(total, _solve(total, first.terms, None))
    else:
        # θ of site k in its own (rescaled) units is (α_k, β) of the fit with site intercepts
        pooled = _System.with_site_intercepts(sites)
        both = _theta_second_moment(pooled, _solve(pooled, first.terms, None))[0]
        n_sites, p = len(items), len(first.terms)
        index = np.array([[k, *range(n_sites, n_sites + p - 1)] for k in range(n_sites)])
        second = both[:, index[:, :, None], index[:, None, :]].transpose(1, 0, 2, 3)
    where = [f"site {label!r}" for label, _ in items]
    system = _System.of(sites)
    fit = _inference(system, _solve(system, first.terms, where), second, level, first, where)
    per_site = len(first.terms) * len(first.regions)
    fit = {"site": [label for label, _ in items for _ in range(per_site)], **fit}
    return pd.DataFrame(fit, columns=["site", *REGRESSION_COLUMNS])


@dataclass(frozen=True)
class NormalEquations:
    """One pooled system A θ = B (R right-hand sides) given explicitly, with its noise.

    For sums whose noise is not one variance per site (a secure sum): ``a`` (m, m), ``b``
    (m, R), ``c`` (R,) = yᵀy, ``n`` the participants; ``a_var`` (m, m) the variance of the
    independent noise of each entry of A's upper triangle (mirrored; 0 where tied),
    ``b_var`` (m,) of each row of B, ``c_var`` of each yᵀy; ``tied`` (K, m) marks the
    diagonal entries carrying the k-th noisy count, of variance ``tied_var`` (K,);
    ``contrasts`` (p, m) the reported rows Lθ, named ``terms``.
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    n: float
    a_var: np.ndarray
    b_var: np.ndarray
    c_var: float
    tied: np.ndarray
    tied_var: np.ndarray
    contrasts: np.ndarray
    terms: tuple[str, ...]
    regions: tuple[str, ...]


def fit_normal_equations(
    eq: NormalEquations, *, level: float = 0.95, where: str = "pooled fit"
) -> pd.DataFrame:
    """Solve ``eq`` with the noise handling of :func:`pooled_regression`; same table columns."""
    level = check_level(level)
    system = _System(
        *(np.asarray(x, dtype=float)[None] for x in (eq.a, eq.b, eq.c)),
        n=np.array([float(eq.n)]),
        a_var=np.asarray(eq.a_var, dtype=float)[None],
        b_var=np.asarray(eq.b_var, dtype=float)[None],
        c_var=np.array([float(eq.c_var)]),
        contrasts=np.asarray(eq.contrasts, dtype=float)[None],
        tied=np.asarray(eq.tied, dtype=float)[None],
        tied_var=np.asarray(eq.tied_var, dtype=float)[None],
    )
    solution = _solve(system, eq.terms, [where])
    fit = _inference(system, solution, _theta_second_moment(system, solution), level, eq, [where])
    return pd.DataFrame(fit, columns=list(REGRESSION_COLUMNS))


@dataclass(frozen=True)
class _Solution:
    """Least-squares solutions of a stack of normal equations, all regions at once."""

    inv: np.ndarray  # (S, m, m) (pseudo-)inverse of the (eigenvalue-floored) A
    theta: np.ndarray  # (S, m, R)
    rss: np.ndarray  # (S, R) c̃ − b̃ᵀÃ⁻¹b̃, not yet de-biased
    resid_df: np.ndarray  # (S,)
    estimable: np.ndarray  # (S, p) bool, per reported term
    psd_projected: np.ndarray  # (S,) bool


def _solve(system: _System, terms: tuple[str, ...], where: list[str] | None) -> _Solution:
    """Solve A θ = B for each block; floor the eigenvalues of a noisy A at its noise level.

    The noise level is measured in noise units: with G = diag(v_aa^(-1/4)), v_aa the noise
    variance of A's diagonal entry a, a noisy A is projected when the smallest eigenvalue of
    G A G is below 1, and those eigenvalues are then floored at 1. A quadratic form vᵀAv is
    thus kept only where it exceeds ‖G⁻¹v‖², a bound on the size of its noise vᵀEv. With the
    same noise variance σ_E² in every entry this is the plain rule: eigenvalues of A below σ_E
    are floored at σ_E. Without noise, a singular A is solved with its pseudo-inverse and the
    reported terms (rows of ``contrasts``) that load on its null space are marked not
    estimable. ``where`` names each block in warnings and errors (``None`` silences the
    warnings).
    """
    m = system.a.shape[1]
    a = system.a
    noise_var = system.diagonal_noise_var  # (S, m)
    noisy_design = noise_var.max(axis=1) > 0.0
    root = noise_var**0.25
    # A noise-free row in a noisy system (a site released without noise) gets the smallest
    # noise level of the others, which errs towards projecting.
    smallest = np.min(np.where(root > 0.0, root, np.inf), axis=1, keepdims=True)
    root = np.where(root > 0.0, root, np.where(np.isfinite(smallest), smallest, 1.0))
    gain = np.where(noisy_design[:, None], 1.0 / root, 1.0)
    evals, evecs = np.linalg.eigh(a * gain[:, :, None] * gain[:, None, :])
    lowest = evals[:, 0]  # in noise sd
    psd_projected = noisy_design & (lowest < 1.0)
    if psd_projected.any():
        projected = np.einsum("sik,sk,sjk->sij", evecs, np.maximum(evals, 1.0), evecs)
        projected = projected / (gain[:, :, None] * gain[:, None, :])
        a = np.where(psd_projected[:, None, None], projected, a)
    # Solve in equilibrated coordinates D A D, D = diag(A)^(-1/2): covariates on very
    # different scales (age in years next to 0/1 codes) then cost no accuracy.
    diag = np.diagonal(a, axis1=1, axis2=2)
    scale = np.where(diag > 0.0, 1.0 / np.sqrt(np.where(diag > 0.0, diag, 1.0)), 1.0)
    evals, evecs = np.linalg.eigh(a * scale[:, :, None] * scale[:, None, :])
    rank_tol = np.maximum(evals[:, -1], 0.0) * m * np.finfo(float).eps
    keep = noisy_design[:, None] | (evals > rank_tol[:, None])
    rank = keep.sum(axis=1)
    resid_df = system.n - rank
    # A reported term lᵀθ is estimable when D l (l in the equilibrated coordinates θ' = D⁻¹θ)
    # has no component in the null space of D A D.
    direction = system.contrasts * scale[:, None, :]
    direction = direction / np.linalg.norm(direction, axis=2, keepdims=True)
    loading = np.einsum("spi,sik->spk", direction, evecs)
    estimable = np.sqrt(np.einsum("spk,sk->sp", loading**2, ~keep)) < 1e-6
    names = where or ["pooled fit"] * len(rank)
    for i, name in enumerate(names):
        if rank[i] == 0:
            raise MetaAnalysisError(f"{name}: ZᵀZ is zero; no term can be estimated")
        if resid_df[i] <= 0:
            raise MetaAnalysisError(
                f"{name}: n = {system.n[i]:g} must exceed the number of estimable terms "
                f"({rank[i]}) to estimate the residual variance"
            )
        if where is None:
            continue
        if psd_projected[i]:
            LOGGER.warning(
                "%s: noisy ZᵀZ has smallest eigenvalue below the DP noise sd (%.3g noise sd); "
                "eigenvalues floored at the noise sd (psd_projected=True)",
                name,
                lowest[i],
            )
        if not estimable[i].all():
            LOGGER.warning(
                "%s: ZᵀZ is singular; terms %s are not identified and are reported as NaN",
                name,
                [t for t, ok in zip(terms, estimable[i], strict=True) if not ok],
            )
    with np.errstate(divide="ignore"):
        inv_evals = np.where(keep, 1.0 / np.where(keep, evals, 1.0), 0.0)
    inv = np.einsum("sik,sk,sjk->sij", evecs, inv_evals, evecs)
    inv = inv * scale[:, :, None] * scale[:, None, :]
    theta = inv @ system.b
    rss = system.c - np.einsum("sir,sir->sr", theta, system.b)
    return _Solution(inv, theta, rss, resid_df, estimable, psd_projected)


def _var_e_theta(var_a: np.ndarray, second: np.ndarray) -> np.ndarray:
    """W = Var(Eθ) = E[E θθᵀ E] for a symmetric noise E with independent upper-triangle entries.

    With per-entry variances V (``var_a``, shape (S, m, m)) and θθᵀ estimated by ``second``
    (S, R, m, m): W = diag(V θ²) + V ∘ θθᵀ − diag(V_aa θ_a²), shape (S, R, m, m).
    """
    theta_sq = np.diagonal(second, axis1=2, axis2=3)
    on_diagonal = np.einsum("sab,srb->sra", var_a, theta_sq) - (
        np.diagonal(var_a, axis1=1, axis2=2)[:, None, :] * theta_sq
    )
    return var_a[:, None] * second + on_diagonal[..., None] * np.eye(var_a.shape[1])


def _theta_second_moment(system: _System, solution: _Solution) -> np.ndarray:
    """Estimate θθᵀ per block and region, shape (S, R, m, m): PSD part of θ̂θ̂ᵀ − Cov₀(θ̂).

    Cov₀ is the sampling and B-noise covariance σ̂²Ã⁻¹ + Ã⁻¹ diag(f) Ã⁻¹ (the parts that do
    not depend on θ). Without noise nothing downstream uses the result.
    """
    theta, inv = solution.theta, solution.inv
    second = np.einsum("sir,sjr->srij", theta, theta)
    if not system.noisy.any():
        return second
    f = system.b_var
    noise_trace = np.einsum("si,sii->s", f, inv)[:, None]  # E[FᵀÃ⁻¹F] = Σ f_a [Ã⁻¹]_aa
    sigma2 = np.maximum(solution.rss + noise_trace, 0.0) / solution.resid_df[:, None]
    cov_f = np.einsum("sij,sj,skj->sik", inv, f, inv)
    second = second - sigma2[:, :, None, None] * inv[:, None] - cov_f[:, None]
    evals, evecs = np.linalg.eigh(second)
    return np.einsum("srij,srj,srkj->srik", evecs, np.maximum(evals, 0.0), evecs)


def _inference(
    system: _System,
    solution: _Solution,
    second: np.ndarray,
    level: float,
    names: SufficientStatistics | NormalEquations,
    where: list[str],
) -> dict[str, Any]:
    """Standard errors, t statistics, p-values and intervals with the DP noise included.

    ``second`` estimates θθᵀ per region, shape (S or 1, R, m, m), for the terms the noise in A
    adds. ``names`` supplies the terms and regions, ``where`` names each block in warnings.
    Returns the table's columns, rows ordered by block, region, term.
    """
    inv, theta = solution.inv, solution.theta
    n_blocks, m, n_regions = theta.shape
    p = system.contrasts.shape[1]
    second = np.broadcast_to(second, (n_blocks, n_regions, m, m))
    resid_df = solution.resid_df[:, None]  # (S, 1)
    var_a, f, var_c = system.a_var, system.b_var, system.c_var[:, None]
    noisy = system.noisy[:, None]
    # W = Var(Eθ), (S, R, m, m): independent entries, plus each tied n noise e_k, which adds
    # e_k P_k θ with P_k = diag(tied[k]): v_k P_k θθᵀ P_k.
    var_e_theta = _var_e_theta(var_a, second) + np.einsum(
        "sk,ska,skb,srab->srab", system.tied_var, system.tied, system.tied, second
    )
    theta_sq = np.diagonal(second, axis1=2, axis2=3)  # θ_a², (S, R, m)

    # De-bias the residual sum of squares for the noise in B and A:
    # E[b̃ᵀÃ⁻¹b̃] ≈ bᵀA⁻¹b + Σ f_a [A⁻¹]_aa + tr(A⁻¹ W).
    rss = (
        solution.rss
        + np.einsum("sa,saa->s", f, inv)[:, None]
        + np.einsum("sab,srba->sr", inv, var_e_theta)
    )
    # Variance the noise adds to it: Var(g) + Var(2θᵀF + FᵀÃ⁻¹F) + Var(θᵀEθ).
    rss_noise_var = (
        var_c
        + 4.0 * np.einsum("sa,sra->sr", f, theta_sq)
        + 2.0 * np.einsum("sab,sa,sb->s", inv**2, f, f)[:, None]
        + 2.0 * np.einsum("sra,sab,srb->sr", theta_sq, var_a, theta_sq)
        - np.einsum("saa,sra->sr", var_a, theta_sq**2)
        # θᵀEθ gains e_k Σ_a tied[k, a] θ_a² from each tied noise
        + np.einsum(
            "sk,srk->sr", system.tied_var, np.einsum("ska,sra->srk", system.tied, theta_sq) ** 2
        )
    )
    sigma2 = rss / resid_df
    sigma2_floor = np.sqrt(rss_noise_var) / resid_df
    sigma2_floored = (sigma2 < sigma2_floor) & noisy
    for i in np.flatnonzero(sigma2_floored.any(axis=1)):
        LOGGER.warning(
            "%s: residual variance of %s fell below the DP noise level; floored at one noise "
            "standard deviation (sigma2_floored=True)",
            where[i],
            [r for r, fl in zip(names.regions, sigma2_floored[i], strict=True) if fl],
        )
    sigma2 = np.maximum(sigma2, sigma2_floor)
    sigma2_var = (2.0 * sigma2**2 * resid_df + rss_noise_var) / resid_df**2

    # Reported terms Lθ̂: Var = σ² [L Ã⁻¹ Lᵀ]_jj + [L Ã⁻¹ diag(f) Ã⁻¹ Lᵀ]_jj
    # + [L Ã⁻¹ W Ã⁻¹ Lᵀ]_jj, all of shape (S, R, p).
    contrasts = system.contrasts
    l_inv = contrasts @ inv  # (S, p, m)
    h = np.einsum("spa,spa->sp", l_inv, contrasts)  # diag(L Ã⁻¹ Lᵀ)
    var_beta = (
        sigma2[:, :, None] * h[:, None, :]
        + np.einsum("spa,sa->sp", l_inv**2, f)[:, None, :]
        + np.einsum("spa,srab,spb->srp", l_inv, var_e_theta, l_inv)
    )
    estimate = np.einsum("spa,sar->srp", contrasts, theta)  # (S, R, p)
    se = np.sqrt(var_beta)
    # Satterthwaite: only the σ̂² part of the variance is estimated with error; without noise
    # this is exactly the residual df.
    denom = h[:, None, :] ** 2 * sigma2_var[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0.0, 2.0 * var_beta**2 / denom, np.inf)
        t = estimate / se
    df = np.where(noisy[:, :, None], df, resid_df[:, :, None])
    crit = special.stdtrit(df, 1.0 - (1.0 - level) / 2.0)
    per_coefficient = {
        "estimate": estimate,
        "se": se,
        "t": t,
        "df": df,
        "p": 2.0 * special.stdtr(df, -np.abs(t)),
        "ci_low": estimate - crit * se,
        "ci_high": estimate + crit * se,
    }
    missing = ~solution.estimable[:, None, :]
    shape = (n_blocks, n_regions, p)
    out: dict[str, Any] = {
        "region": [r for _ in range(n_blocks) for r in names.regions for _ in names.terms],
        "term": [t_ for _ in range(n_blocks * n_regions) for t_ in names.terms],
    }
    for name, values in per_coefficient.items():
        out[name] = np.where(missing, np.nan, values).ravel()
    out["n"] = np.broadcast_to(system.n[:, None, None], shape).ravel()
    out["resid_df"] = np.broadcast_to(resid_df[:, :, None], shape).ravel()
    out["sigma2"] = np.broadcast_to(sigma2[:, :, None], shape).ravel()
    out["estimable"] = np.broadcast_to(solution.estimable[:, None, :], shape).ravel()
    out["psd_projected"] = np.broadcast_to(solution.psd_projected[:, None, None], shape).ravel()
    out["sigma2_floored"] = np.broadcast_to(sigma2_floored[:, :, None], shape).ravel()
    return out
