"""The planner's model: a scenario of public inputs and the predicted standard errors.

See :mod:`fednipype.plan`.
"""

# Why hand-written: no library predicts the standard errors of a regression solved from
# Gaussian-noised sufficient statistics (statsmodels knows no DP noise; OpenDP and diffprivlib
# calibrate noise but say nothing of the error it leaves in a pooled fit with site intercepts).
# The algebra is the hub's delta method, at the expected design instead of a released one.

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pandas as pd

from fednipype.contract.calibration import (
    analytic_gaussian_sigma,
    check_delta,
    check_epsilon,
    sufficient_statistics_sensitivity,
)
from fednipype.contract.scaling import INTERCEPT, Scaling
from fednipype.exceptions import FednipypeError

__all__ = [
    "FIRST_ORDER_LIMIT",
    "Covariate",
    "Plan",
    "PlanError",
    "Response",
    "Scenario",
    "Site",
    "noise_sd",
    "predict",
    "uniform_moments",
]

#: Largest noise ratio ρ (see :attr:`Plan.noise_ratio`) at which the first-order prediction
#: is trusted. The terms it leaves out grow like ρ²: in simulations of releases (single sites
#: and consortia, 1–3 covariates, 5–40 regions) the empirical SD of the pooled estimates
#: exceeded the prediction by at most ~5 % at ρ = 0.15, ~10 % at 0.2 and ~18 % at 0.26.
FIRST_ORDER_LIMIT = 0.15

Bounds = tuple[float, float]


class PlanError(FednipypeError, ValueError):
    """The planner's inputs cannot be used (a bound, a size, a share, a target)."""


def _bounds(value: Sequence[float], where: str) -> Bounds:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where}: expected (lo, hi), got {value!r}") from err
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise PlanError(f"{where}: bounds must be finite with lo < hi, got ({lo}, {hi})")
    return lo, hi


def _positive(value: float, where: str, *, allow_zero: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where}: expected a number, got {value!r}") from err
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise PlanError(f"{where}: must be a finite number {need}, got {value!r}")
    return out


def uniform_moments(lo: float, hi: float) -> tuple[float, float]:
    """Mean and sd of the uniform distribution on ``[lo, hi]``.

    >>> [round(x, 3) for x in uniform_moments(20.0, 80.0)]
    [50.0, 17.321]
    """
    lo, hi = _bounds((lo, hi), "uniform")
    return (lo + hi) / 2.0, (hi - lo) / math.sqrt(12.0)


# -- public inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Covariate:
    """A model term: public bounds (they fix its scaling) and an assumed distribution.

    Parameters
    ----------
    name : str
        The term, as in the release's model (``age``, ``sex[M]``).
    bounds : tuple of float
        Public ``(lo, hi)``; a 0/1 dummy has ``(0, 1)``.
    mean, sd : float
        Assumed mean and sd over participants (original units); covariates are assumed
        uncorrelated.
    """

    name: str
    bounds: Bounds
    mean: float
    sd: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == INTERCEPT:
            raise PlanError(f"covariate name: expected a term name, got {self.name!r}")
        lo, hi = _bounds(self.bounds, f"{self.name}: bounds")
        object.__setattr__(self, "bounds", (lo, hi))
        _check_moments(self.name, (lo, hi), self.mean, self.sd)
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "sd", float(self.sd))

    @classmethod
    def numeric(
        cls,
        name: str,
        bounds: Sequence[float],
        *,
        mean: float | None = None,
        sd: float | None = None,
        within: Sequence[float] | None = None,
    ) -> Covariate:
        """A numeric covariate; ``mean`` and ``sd`` not given are those of the uniform
        distribution over ``within`` (an assumed range, e.g. the recruitment range), by default
        over the bounds."""
        lo, hi = _bounds(bounds, f"{name}: bounds")
        u_mean, u_sd = uniform_moments(*(within if within is not None else (lo, hi)))
        return cls(name, (lo, hi), u_mean if mean is None else mean, u_sd if sd is None else sd)

    @classmethod
    def dummy(cls, name: str, share: float) -> Covariate:
        """A 0/1 indicator with an assumed share of ones (released as −1/+1).

        >>> Covariate.dummy("sex[M]", 0.5).sd
        0.5
        """
        share = _positive(share, f"{name}: share", allow_zero=True)
        if not 0.0 <= share <= 1.0:
            raise PlanError(f"{name}: share must be in [0, 1], got {share!r}")
        return cls(name, (0.0, 1.0), share, math.sqrt(share * (1.0 - share)))


def _check_moments(name: str, bounds: Bounds, mean: float, sd: float) -> None:
    lo, hi = bounds
    mean = float(mean)
    if not (math.isfinite(mean) and lo <= mean <= hi):
        raise PlanError(f"{name}: assumed mean {mean!r} is not within the bounds [{lo}, {hi}]")
    sd = _positive(sd, f"{name}: assumed sd", allow_zero=True)
    # A variable in [lo, hi] with this mean has at most this sd (Bhatia–Davis).
    if sd > math.sqrt((hi - mean) * (mean - lo)) * (1.0 + 1e-9):
        raise PlanError(
            f"{name}: assumed sd {sd:g} is impossible for a variable in [{lo}, {hi}] with mean "
            f"{mean:g} (at most {math.sqrt((hi - mean) * (mean - lo)):g})"
        )


@dataclass(frozen=True)
class Response:
    """The response (a regional feature): public bounds and assumptions about it.

    Parameters
    ----------
    bounds : tuple of float
        Public ``(lo, hi)``; they fix its scaling.
    residual_sd : float
        Assumed residual sd given the covariates and the site.
    mean : float, optional
        Assumed mean (default: the middle of the bounds).
    effects : mapping, optional
        Assumed slopes by term, original units (default 0). Mean and effects matter because
        the noise on ZᵀZ is multiplied by the coefficients.
    """

    bounds: Bounds
    residual_sd: float
    mean: float | None = None
    effects: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = _bounds(self.bounds, "response bounds")
        object.__setattr__(self, "bounds", (lo, hi))
        sd = _positive(self.residual_sd, "response residual sd", allow_zero=True)
        object.__setattr__(self, "residual_sd", sd)
        mean = (lo + hi) / 2.0 if self.mean is None else float(self.mean)
        if not (math.isfinite(mean) and lo <= mean <= hi):
            raise PlanError(f"response mean {mean!r} is not within the bounds [{lo}, {hi}]")
        object.__setattr__(self, "mean", mean)
        effects = {str(term): float(value) for term, value in dict(self.effects).items()}
        if not all(math.isfinite(v) for v in effects.values()):
            raise PlanError(f"response effects: must be finite, got {effects}")
        object.__setattr__(self, "effects", MappingProxyType(effects))

    @classmethod
    def from_r2(
        cls,
        bounds: Sequence[float],
        *,
        sd: float,
        r2: float,
        mean: float | None = None,
        effects: Mapping[str, float] | None = None,
    ) -> Response:
        """A response of total sd ``sd``, a share ``r2`` of its variance explained.

        >>> Response.from_r2((0.0, 100.0), sd=10.0, r2=0.75).residual_sd
        5.0
        """
        sd = _positive(sd, "response sd")
        r2 = float(r2)
        if not 0.0 <= r2 < 1.0:
            raise PlanError(f"response R²: must be in [0, 1), got {r2!r}")
        return cls(tuple(bounds), sd * math.sqrt(1.0 - r2), mean, dict(effects or {}))


@dataclass(frozen=True)
class Site:
    """One site: its size (may be fractional while searching), its release's ε (``inf``: no
    noise) and δ, and term → ``(mean, sd)`` where its covariates differ from the assumed ones
    (a site recruiting ages 20–45: ``assumed={"age": uniform_moments(20, 45)}``); ``bounds``:
    term → the site's own public range where it releases in its own units (its recruitment
    range, ``{"age": (20, 45)}``; the hub converts it to common units)."""

    n: float
    epsilon: float
    delta: float
    assumed: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    bounds: Mapping[str, Bounds] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive(self.n, "site n"))
        if self.epsilon != math.inf:
            object.__setattr__(self, "epsilon", check_epsilon(self.epsilon, "site epsilon"))
        delta = check_delta(self.delta, "site delta")
        if delta == 0:
            raise PlanError("site delta: must be > 0 (releases use the Gaussian mechanism)")
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "assumed", MappingProxyType(dict(self.assumed)))
        bounds = {name: _bounds(b, f"site bounds of {name}") for name, b in self.bounds.items()}
        object.__setattr__(self, "bounds", MappingProxyType(bounds))


@dataclass(frozen=True)
class Scenario:
    """All public inputs of a plan: the ``covariates`` (terms after the intercept, in the
    release's order), the (typical) ``response``, one or more ``sites``, and the number of
    ``regions`` per release, which sets its sensitivity, hence its noise. Build it with
    :meth:`of`."""

    covariates: tuple[Covariate, ...]
    response: Response
    sites: tuple[Site, ...]
    regions: int

    def __post_init__(self) -> None:
        covariates, sites = tuple(self.covariates), tuple(self.sites)
        names = [c.name for c in covariates]
        if len(set(names)) != len(names) or not sites:
            raise PlanError(f"covariates: need distinct terms ({names}) and a site")
        for k, site in enumerate(sites):
            for name in site.bounds:
                if name not in names or "[" in name:
                    raise PlanError(f"site {k}: own bounds for {name!r}, not a numeric term")
            for name, (mean, sd) in site.assumed.items():
                if name not in names:
                    raise PlanError(f"site {k}: assumed distribution for unknown term {name!r}")
                bounds = site.bounds.get(name, covariates[names.index(name)].bounds)
                _check_moments(f"site {k}: {name}", bounds, mean, sd)
        unknown = sorted(set(self.response.effects) - set(names))
        if unknown:
            raise PlanError(f"response effects: unknown term(s) {unknown}")
        regions = self.regions
        if isinstance(regions, bool) or not isinstance(regions, int | np.integer) or regions < 1:
            raise PlanError(f"regions: expected a number of regions >= 1, got {regions!r}")
        total = math.fsum(s.n for s in sites)
        if total - len(sites) - len(covariates) < 1:
            raise PlanError(
                f"n: {total:g} participants in {len(sites)} site(s) leave no residual degrees "
                f"of freedom for {len(covariates)} slope(s) and {len(sites)} site intercept(s)"
            )
        object.__setattr__(self, "covariates", covariates)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "regions", int(self.regions))

    @classmethod
    def of(
        cls,
        covariates: Sequence[Covariate],
        response: Response,
        *,
        n: float | Sequence[float],
        epsilon: float | Sequence[float],
        delta: float | Sequence[float],
        regions: int,
        assumed: Sequence[Mapping[str, tuple[float, float]]] | None = None,
        bounds: Sequence[Mapping[str, Bounds]] | None = None,
    ) -> Scenario:
        """A scenario from per-site lists or scalars (one value for every site): ``n`` (its
        length is the number of sites), ``epsilon``, ``delta``, and ``assumed`` and
        ``bounds`` (one mapping per site, see :class:`Site`)."""
        sizes = _per_site(n, None, "n")
        k = len(sizes)
        eps = _per_site(epsilon, k, "epsilon")
        dlt = _per_site(delta, k, "delta")
        per_site = list(assumed) if assumed is not None else [{}] * k
        own = list(bounds) if bounds is not None else [{}] * k
        if len(per_site) != k or len(own) != k:
            raise PlanError(f"assumed, bounds: {len(per_site)}, {len(own)} entries, {k} site(s)")
        sites = tuple(
            Site(sizes[i], eps[i], dlt[i], per_site[i] or {}, own[i] or {}) for i in range(k)
        )
        return cls(tuple(covariates), response, sites, regions)

    @property
    def terms(self) -> tuple[str, ...]:
        """The design's terms, the intercept first."""
        return (INTERCEPT, *(c.name for c in self.covariates))

    @property
    def scaling(self) -> Scaling:
        """The common maps onto [-1, 1] (the response is ``"response"``): the envelope of
        the sites' maps, as the hub reports them (:meth:`Scaling.envelope`)."""
        names = [c.name for c in self.covariates]
        return Scaling.envelope([self.site_scaling(s) for s in self.sites], names)

    def site_scaling(self, site: Site) -> Scaling:
        """The maps ``site`` releases in: its own bounds where it has them."""
        return Scaling.from_bounds(
            numeric={c.name: site.bounds.get(c.name, c.bounds) for c in self.covariates},
            dummies=[],
            regions={"response": self.response.bounds},
        )

    def with_epsilon(self, epsilon: float) -> Scenario:
        """The same scenario with one ε at every site."""
        sites = tuple(dataclasses.replace(s, epsilon=epsilon) for s in self.sites)
        return dataclasses.replace(self, sites=sites)

    def with_n(self, n: float) -> Scenario:
        """The same scenario with ``n`` participants at every site."""
        sites = tuple(dataclasses.replace(s, n=n) for s in self.sites)
        return dataclasses.replace(self, sites=sites)


def _per_site(value: float | Sequence[float], k: int | None, name: str) -> list[float]:
    if isinstance(value, str | bytes):
        raise PlanError(f"{name}: expected a number or one number per site, got {value!r}")
    if not isinstance(value, Sequence | np.ndarray):
        return [value] * (k or 1)  # type: ignore[list-item]
    values = list(value)
    if not values or (k is not None and len(values) != k):
        expected = "one or more sites" if k is None else f"{k} site(s)"
        raise PlanError(f"{name}: {len(values)} value(s) for {expected}")
    return values


# -- the prediction --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a release design would show.

    Attributes
    ----------
    scenario : Scenario
        The inputs.
    table : pandas.DataFrame
        Per term (original units): ``term``, ``se`` (predicted standard error),
        ``se_sampling`` (without DP noise) and ``se_noise`` (what the noise adds, in
        quadrature).
    noise_sd : tuple of float
        σ per released entry, per site, in released [-1, 1] units.
    sensitivity : float
        The release's L2 sensitivity, released units.
    noise_ratio : float
        ρ = ‖A^(-1/2) E[E A⁻¹ E] A^(-1/2)‖^(1/2), A the expected normal-equations matrix, E
        its DP noise: the size of the left-out second-order terms relative to the first (in
        one dimension, noise sd over ZᵀZ).
    first_order : bool
        Whether the prediction holds (``noise_ratio <= FIRST_ORDER_LIMIT``); ``reason`` says
        why not.
    """

    scenario: Scenario
    table: pd.DataFrame
    noise_sd: tuple[float, ...]
    sensitivity: float
    noise_ratio: float
    first_order: bool
    reason: str

    def se(self, term: str) -> float:
        """The predicted standard error of ``term`` (original units)."""
        rows = self.table.loc[self.table["term"] == term, "se"]
        if rows.empty:
            raise PlanError(f"term {term!r} not in the model ({', '.join(self.table['term'])})")
        return float(rows.iloc[0])


def noise_sd(
    n_covariates: int, regions: int, epsilon: float, delta: float, *, dummies: Sequence[int] = ()
) -> tuple[float, float]:
    """``(sigma, sensitivity)`` of a release with ``n_covariates`` terms after the intercept and
    ``regions`` regions at (``epsilon``, ``delta``; ``epsilon = inf``: no noise), released units.

    As :func:`fednipype.site.mechanisms.prepare_sufficient_statistics` after the scaling onto
    [-1, 1] of :func:`fednipype.site.release.make_release`: one Gaussian vector over n, ZᵀZ's
    upper triangle, ZᵀY and yᵀy, analytic Gaussian mechanism for its L2 sensitivity. With
    ``dummies`` (indices among the covariates of the ±1-coded ones) the release carries n once:
    the intercept's and the dummies' ZᵀZ diagonal are n itself and are not released again.

    Examples
    --------
    >>> sigma, sensitivity = noise_sd(3, 100, 1.0, 1e-5)
    >>> round(sigma, 1), round(sensitivity ** 2)
    (84.3, 511)
    """
    terms = [INTERCEPT] + [f"x{i}" for i in range(n_covariates)]
    names = [f"r{i}" for i in range(regions)]
    n_columns = [0, *(1 + int(j) for j in dummies)] if dummies else []
    sensitivity = sufficient_statistics_sensitivity(
        Scaling.design_bounds(terms), Scaling.response_bounds(names), n_columns
    )
    if epsilon == math.inf:
        return 0.0, sensitivity
    return analytic_gaussian_sigma(epsilon, delta, sensitivity), sensitivity


def _expectation_e_b_e(var: np.ndarray, b: np.ndarray) -> np.ndarray:
    """E[E B E] for a symmetric noise E with independent upper-triangle entries of variance
    ``var``: diag(V diag(B)) + V ∘ Bᵀ − diag(V_aa B_aa) (as the hub's Var(Eθ))."""
    return np.diag(var @ np.diag(b)) + var * b.T - np.diag(np.diag(var) * np.diag(b))


def predict(scenario: Scenario) -> Plan:
    """Predict each coefficient's standard error in the pooled regression with site intercepts.

    The pooled model's unknowns θ = (α_1, …, α_K, β) solve A θ = b, A built from the sites'
    ZᵀZ (:func:`fednipype.hub.regression.pooled_regression`). A is taken at its expectation
    under the assumed distributions (site k: ``n_k E[z zᵀ]``, its released units rescaled to
    the common scale as the hub does, D_k ZₖᵀZₖ D_k, its noise variances with them), θ at the
    assumed mean and effects, σ² from the assumed residual sd, and V (on A) and f (on b) are
    the per-entry noise variances of the sites' releases. To first order in the noise

    .. math::

        \\operatorname{Cov}(θ̂) ≈ A^{-1} [σ^2 A + \\operatorname{diag}(f) + W] A^{-1},
        \\quad W = \\operatorname{Var}(Eθ),

    and the reported intercept is the participant-weighted mean of the site intercepts.
    Standard errors are converted to original units with the public scaling.

    Parameters
    ----------
    scenario : Scenario
        The public inputs.

    Returns
    -------
    Plan
        With ``first_order`` false and a reason where the noise on ZᵀZ is too large
        (``noise_ratio > FIRST_ORDER_LIMIT``): the standard errors are then an order of
        magnitude only.
    """
    sites, covariates = scenario.sites, scenario.covariates
    k, c = len(sites), len(covariates)
    m = k + c
    scaling = scenario.scaling
    response = scenario.response
    y_center, y_scale = scaling.center("response"), scaling.scale("response")
    y_mean = (response.mean - y_center) / y_scale
    sigma2 = (response.residual_sd / y_scale) ** 2
    a = np.zeros((m, m))
    theta = np.zeros(m)
    var_a = np.zeros((m, m))
    f = np.zeros(m)
    sigmas, sensitivity = [], 0.0
    within = np.zeros(c)  # Σ_k n_k Var_k(z): what identifies the slopes next to site intercepts
    slopes = slice(k, m)
    # As make_release: the 0/1 dummies (``name[level]``) are released as ±1, n once.
    dummies = [j for j, x in enumerate(covariates) if "[" in x.name]
    center = np.array([scaling.center(x.name) for x in covariates])
    scale = np.array([scaling.scale(x.name) for x in covariates])
    beta = np.array([response.effects.get(x.name, 0.0) for x in covariates]) * scale / y_scale
    shift = np.zeros((k, c))  # each site's centers in common units (e_k of the hub)
    for i, site in enumerate(sites):
        own = scenario.site_scaling(site)
        site_center = np.array([own.center(x.name) for x in covariates])
        d = np.array([own.scale(x.name) for x in covariates]) / scale
        shift[i] = (site_center - center) / scale
        moments = np.array([site.assumed.get(x.name, (x.mean, x.sd)) for x in covariates])
        # the hub's columns d z_k: centered at the site's center, on the common scale
        mean, variance = (moments[:, 0] - site_center) / scale, (moments[:, 1] / scale) ** 2
        sigma, sensitivity = noise_sd(
            c, scenario.regions, site.epsilon, site.delta, dummies=dummies
        )
        sigmas.append(sigma)
        a[i, i] = site.n
        a[i, slopes] = a[slopes, i] = site.n * mean
        a[slopes, slopes] += site.n * (np.outer(mean, mean) + np.diag(variance))
        within += site.n * variance
        theta[i] = y_mean - float(beta @ mean)
        v = sigma**2
        var_a[i, i] = f[i] = v
        var_a[i, slopes] = var_a[slopes, i] = v * d**2
        var_a[slopes, slopes] += v * np.outer(d, d) ** 2
        f[slopes] += v * d**2
    theta[slopes] = beta

    evals = np.linalg.eigvalsh(a)
    if evals[0] <= 1e-12 * evals[-1]:
        zero = [x.name for x, v in zip(covariates, within, strict=True) if v <= 0]
        raise PlanError(
            "the expected design is singular: "
            + (f"{zero} vary within no site" if zero else "some terms are collinear")
        )
    inv = np.linalg.inv(a)
    w = _expectation_e_b_e(var_a, np.outer(theta, theta))
    n = np.array([s.n for s in sites])
    contrasts = np.zeros((c + 1, m))
    contrasts[0, :k] = n / n.sum()
    contrasts[0, slopes] = -(n / n.sum()) @ shift  # the intercept at the common centers
    contrasts[1:, slopes] = np.eye(c)
    l_inv = contrasts @ inv
    var_sampling = sigma2 * np.einsum("pa,pa->p", l_inv, contrasts)
    var_noise = np.einsum("pa,a,pa->p", l_inv, f, l_inv) + np.einsum(
        "pa,ab,pb->p", l_inv, w, l_inv
    )
    factor = np.concatenate([[y_scale], y_scale / scale])
    table = pd.DataFrame(
        {
            "term": scenario.terms,
            "se": np.sqrt(var_sampling + var_noise) * factor,
            "se_sampling": np.sqrt(var_sampling) * factor,
            "se_noise": np.sqrt(var_noise) * factor,
        }
    )

    # ρ²: the largest eigenvalue of A^(-1/2) E[E A⁻¹ E] A^(-1/2).
    root_inv = np.linalg.cholesky(inv)  # L Lᵀ = A⁻¹, so Lᵀ K L has A^(-1/2) K A^(-1/2)'s spectrum
    second = root_inv.T @ _expectation_e_b_e(var_a, inv) @ root_inv
    ratio = math.sqrt(max(float(np.linalg.eigvalsh((second + second.T) / 2.0)[-1]), 0.0))
    first_order, reason = ratio <= FIRST_ORDER_LIMIT, ""
    if not first_order:
        reason = (
            f"the DP noise on ZᵀZ (sd {max(sigmas):.3g} per entry in released units) is "
            f"comparable to ZᵀZ itself (noise ratio {ratio:.2g} > {FIRST_ORDER_LIMIT:g}): "
            "the pooled fit is dominated by the noise and the hub floors ZᵀZ's eigenvalues, "
            "so these standard errors are only an order of magnitude; spend more ε, release "
            "fewer regions, or pool more participants"
        )
    return Plan(scenario, table, tuple(sigmas), sensitivity, ratio, first_order, reason)
