"""Differentially private statistics of regional brain features, with noise from OpenDP.

Privacy model (DESIGN §4): the unit is one participant; neighbouring datasets differ by adding
or removing one participant (one row). Bounds are public and declared before the data are
touched; every value is clamped to them before any statistic, and sensitivities follow from
them. Noise is drawn by OpenDP's samplers only (``make_gaussian`` / ``make_laplace``, which are
safe against floating-point attacks); this module never draws random numbers itself.

How the statistics are released:

* Every statistic is one vector mechanism over all the numbers it releases, so a statistic
  costs exactly the (epsilon, delta) it is given. ``delta == 0`` gives the Laplace mechanism
  (L1 sensitivity, pure epsilon); ``delta > 0`` gives the Gaussian mechanism with the analytic
  calibration of Balle & Wang (2018) on the L2 sensitivity.
* **n is never released exactly**: means, variances, group means and sufficient statistics
  release a noisy count within the same vector mechanism (its sensitivity is part of the
  vector's), or, for :func:`dp_mean`, use a count released earlier (``released_n``, e.g. by
  :func:`dp_count`), which is public by then, so dividing by it is post-processing.
* Values are centred on the midpoint of their bounds before summing, which halves the
  sensitivity of a bounded sum under add/remove neighbouring.
* Disclosure controls: no statistic over fewer than ``min_cohort`` participants (overall and,
  for group statistics, in every group); with ``delta > 0``, delta must be below 1/n. Both
  checks use the actual number of rows, before any noise, and raise
  :class:`~fednipype.exceptions.DisclosureError`.
* Missing values: by default (``missing="raise"``) a NaN anywhere is an error naming the input;
  with ``missing="drop"`` rows with any NaN are dropped before counting and clamping (complete
  cases). Values are never imputed, since imputation would need values derived from the data.
  Infinite values are always an error.

Spending budget: statistics are pure functions and know nothing of the ledger. Validate first,
charge, then draw noise. :func:`prepare` does all validation and the exact computation and
returns a :class:`PreparedStatistic` that holds no noise yet; bad input fails there, before
any charge. Its :meth:`PreparedStatistic.release` draws the noise, once::

    prepared = prepare("mean", X, bounds, epsilon, delta, min_cohort=policy.min_cohort)
    with ledger.reserve(prepared.epsilon, prepared.delta, "mean", prepared.audit_parameters()):
        result = prepared.release()
        ...

The ``dp_*`` functions are ``prepare(...).release()`` in one call.

References
----------
Balle, B. & Wang, Y.-X. (2018). Improving the Gaussian mechanism for differential privacy:
analytical calibration and optimal denoising. ICML. arXiv:1805.06530.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import log_ndtr

from fednipype.exceptions import DataError, DisclosureError, FednipypeError, PolicyError
from fednipype.site.policy import DEFAULT_MIN_COHORT, check_delta, check_epsilon

LOGGER = logging.getLogger(__name__)

#: The privacy unit of every statistic here.
PRIVACY_UNIT = "participant"
#: The neighbouring relation the sensitivities are derived for.
NEIGHBOURING = "add/remove one participant"
#: Names accepted by :func:`prepare`.
STATISTICS = ("count", "histogram", "mean", "variance", "group_means", "sufficient_statistics")
#: Relative slack allowed when checking a budget split adds up to its total.
SPLIT_TOLERANCE = 1e-12

_MISSING = ("raise", "drop")


# -- calibration ------------------------------------------------------------------------------


def _log_delta_gaussian(sigma: float, epsilon: float, sensitivity: float) -> float:
    """log of the exact delta of the Gaussian mechanism (Balle & Wang 2018, Theorem 8).

    delta(sigma) = Phi(D/(2 s) - e s/D) - exp(e) Phi(-D/(2 s) - e s/D), computed in log space
    (log_ndtr) so that neither exp(epsilon) overflows nor the difference cancels.
    """
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = float(log_ndtr(a - b))
    second = epsilon + float(log_ndtr(-a - b))
    if second >= first:
        return -math.inf
    return first + math.log(-math.expm1(second - first))


def analytic_gaussian_sigma(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """Smallest Gaussian noise scale giving (epsilon, delta)-DP: the analytic Gaussian mechanism.

    Solves Balle & Wang's (2018) exact condition
    ``Phi(D/(2 sigma) - epsilon sigma/D) - e^epsilon Phi(-D/(2 sigma) - epsilon sigma/D) = delta``
    for sigma by root finding. Written here (rather than taken from OpenDP) because OpenDP's
    ``make_gaussian`` is calibrated for zero-concentrated DP; OpenDP still draws the noise.
    Unlike the classic ``sqrt(2 ln(1.25/delta)) / epsilon`` it is valid for any epsilon > 0 and
    never larger than needed.

    Parameters
    ----------
    epsilon : float
        Finite, > 0.
    delta : float
        0 < delta < 1.
    l2_sensitivity : float
        L2 sensitivity of the released vector, finite and > 0.

    Returns
    -------
    float
        sigma, rounded up so that the exact delta at sigma is at most ``delta``.

    Raises
    ------
    PolicyError
        If an argument is invalid.

    Examples
    --------
    >>> round(analytic_gaussian_sigma(1.0, 1e-5, 1.0), 4)
    3.7306
    """
    epsilon = check_epsilon(epsilon, "analytic_gaussian_sigma: epsilon")
    delta = check_delta(delta, "analytic_gaussian_sigma: delta")
    if delta == 0:
        raise PolicyError("analytic_gaussian_sigma: delta must be > 0 for a Gaussian mechanism")
    sens = _check_positive(l2_sensitivity, "analytic_gaussian_sigma: l2_sensitivity")
    target = math.log(delta)

    def excess(log_sigma: float) -> float:
        return _log_delta_gaussian(math.exp(log_sigma), epsilon, sens) - target

    # Bracket the root: delta(sigma) decreases from 1 (sigma -> 0) to 0 (sigma -> inf).
    hi = sens * max(1.0, math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon)
    for _ in range(2100):
        if excess(math.log(hi)) <= 0:
            break
        hi *= 2.0
    lo = hi / 2.0
    for _ in range(2100):
        if excess(math.log(lo)) > 0:
            break
        lo /= 2.0
    if not (excess(math.log(lo)) > 0 >= excess(math.log(hi))):
        raise PolicyError(
            f"analytic_gaussian_sigma: cannot calibrate for epsilon={epsilon!r}, "
            f"delta={delta!r}, sensitivity={sens!r}"
        )
    sigma = math.exp(brentq(excess, math.log(lo), math.log(hi), xtol=1e-15, rtol=1e-15))
    # Round up so the guarantee holds for the sigma actually used.
    while excess(math.log(sigma)) > 0:
        sigma = math.nextafter(sigma, math.inf) * (1.0 + 1e-15)
    return sigma


def _laplace_scale(epsilon: float, l1_sensitivity: float) -> float:
    """Laplace scale b = sensitivity / epsilon, nudged up until OpenDP's own map agrees."""
    dp = _opendp()
    scale = l1_sensitivity / epsilon
    # OpenDP computes its privacy map with outward rounding; agree with it exactly.
    for _ in range(64):
        meas = dp.m.make_laplace(_float_vectors(dp), dp.l1_distance(T=float), scale=scale)
        if meas.map(l1_sensitivity) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1.0 + 1e-15)
    raise PolicyError(f"Laplace calibration failed for epsilon={epsilon!r}")  # pragma: no cover


# -- noise (OpenDP only) ---------------------------------------------------------------------


@functools.cache
def _opendp():
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def _float_vectors(dp):
    return dp.vector_domain(dp.atom_domain(T=float, nan=False))


def _check_vector(values: Any, name: str) -> list[float]:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name}: values to privatise must be finite")
    return arr.tolist()


def add_gaussian_noise(values: Any, sigma: float) -> np.ndarray:
    """Add independent N(0, sigma^2) noise to every entry, drawn by OpenDP.

    The measurement is ``opendp.measurements.make_gaussian`` over a vector of floats with the
    L2 distance; OpenDP samples the Gaussian exactly (to float granularity) from the operating
    system's randomness, and cannot be seeded.

    Parameters
    ----------
    values : array_like
        Finite values (flattened).
    sigma : float
        Standard deviation of the noise, finite and > 0.

    Returns
    -------
    numpy.ndarray
        Noisy values, same shape as ``values``.
    """
    dp = _opendp()
    sigma = _check_positive(sigma, "add_gaussian_noise: sigma")
    shape = np.shape(values)
    data = _check_vector(values, "add_gaussian_noise")
    meas = dp.m.make_gaussian(_float_vectors(dp), dp.l2_distance(T=float), scale=sigma)
    return np.asarray(meas(data), dtype=float).reshape(shape)


def add_laplace_noise(values: Any, scale: float) -> np.ndarray:
    """Add independent Laplace(scale) noise to every entry, drawn by OpenDP.

    The measurement is ``opendp.measurements.make_laplace`` over a vector of floats with the
    L1 distance. The noise variance is ``2 * scale**2``.

    Parameters
    ----------
    values : array_like
        Finite values (flattened).
    scale : float
        Laplace scale b, finite and > 0.

    Returns
    -------
    numpy.ndarray
        Noisy values, same shape as ``values``.
    """
    dp = _opendp()
    scale = _check_positive(scale, "add_laplace_noise: scale")
    shape = np.shape(values)
    data = _check_vector(values, "add_laplace_noise")
    meas = dp.m.make_laplace(_float_vectors(dp), dp.l1_distance(T=float), scale=scale)
    return np.asarray(meas(data), dtype=float).reshape(shape)


# -- mechanism description -------------------------------------------------------------------


@functools.cache
def _opendp_version() -> str:
    try:
        return importlib.metadata.version("opendp")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


@dataclass(frozen=True)
class Mechanism:
    """What a release must record about how its noise was calibrated.

    Attributes
    ----------
    statistic : str
        Which statistic (one of :data:`STATISTICS`).
    name : str
        ``"gaussian"`` or ``"laplace"``.
    epsilon, delta : float
        The privacy loss of this statistic.
    sensitivity : float
        Sensitivity of the released vector under add/remove-one-participant.
    sensitivity_norm : str
        ``"l2"`` (Gaussian) or ``"l1"`` (Laplace).
    noise_scale : float
        sigma (Gaussian) or b (Laplace).
    noise_variance : float
        Variance of the noise on each released entry (sigma^2 or 2 b^2).
    calibration : str
        How the scale was derived from (epsilon, delta, sensitivity).
    clamp_bounds : dict
        The public bounds values were clamped to, by input name: ``{"lo": [...], "hi": [...]}``.
    released : list of str
        Layout of the noisy vector.
    privacy_unit : str
        ``"participant"``.
    neighbouring : str
        The neighbouring relation.
    sampler : str
        The OpenDP constructor and version that drew the noise.
    """

    statistic: str
    name: str
    epsilon: float
    delta: float
    sensitivity: float
    sensitivity_norm: str
    noise_scale: float
    noise_variance: float
    calibration: str
    clamp_bounds: dict[str, Any]
    released: list[str]
    privacy_unit: str = PRIVACY_UNIT
    neighbouring: str = NEIGHBOURING
    sampler: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The description as JSON-ready built-in types."""
        return {
            "statistic": self.statistic,
            "mechanism": self.name,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sensitivity": self.sensitivity,
            "sensitivity_norm": self.sensitivity_norm,
            "noise_scale": self.noise_scale,
            "noise_variance": self.noise_variance,
            "calibration": self.calibration,
            "clamp_bounds": self.clamp_bounds,
            "released": list(self.released),
            "privacy_unit": self.privacy_unit,
            "neighbouring": self.neighbouring,
            "sampler": self.sampler,
        }


def _make_mechanism(
    statistic: str,
    epsilon: float,
    delta: float,
    l1: float,
    l2: float,
    clamp_bounds: dict[str, Any],
    released: list[str],
) -> Mechanism:
    """Gaussian (analytic) when delta > 0, Laplace when delta == 0."""
    if delta > 0:
        sigma = analytic_gaussian_sigma(epsilon, delta, l2)
        return Mechanism(
            statistic=statistic,
            name="gaussian",
            epsilon=epsilon,
            delta=delta,
            sensitivity=l2,
            sensitivity_norm="l2",
            noise_scale=sigma,
            noise_variance=sigma**2,
            calibration="analytic Gaussian mechanism (Balle & Wang 2018)",
            clamp_bounds=clamp_bounds,
            released=released,
            sampler=f"opendp.measurements.make_gaussian (OpenDP {_opendp_version()})",
        )
    scale = _laplace_scale(epsilon, l1)
    return Mechanism(
        statistic=statistic,
        name="laplace",
        epsilon=epsilon,
        delta=0.0,
        sensitivity=l1,
        sensitivity_norm="l1",
        noise_scale=scale,
        noise_variance=2.0 * scale**2,
        calibration="Laplace mechanism, scale = l1 sensitivity / epsilon",
        clamp_bounds=clamp_bounds,
        released=released,
        sampler=f"opendp.measurements.make_laplace (OpenDP {_opendp_version()})",
    )


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPResult:
    """A released statistic: noisy values, their noise variances and the mechanism.

    Attributes
    ----------
    statistic : str
        Which statistic.
    value : numpy.ndarray
        The noisy statistic (post-processed: e.g. a mean is a ratio of noisy sums).
    noise_var : numpy.ndarray
        Variance the noise adds to each entry of ``value``. Exact for counts and histograms;
        for ratios (means, variances) a first-order (delta-method) approximation computed
        from released values only.
    n : numpy.ndarray or float or None
        The noisy count(s) of participants (or the public ``released_n`` used).
    labels : list of str
        Names of the columns of ``value`` (regions), or bins for a histogram.
    components : dict
        The raw noisy quantities released by the mechanism (each with exact noise variance
        ``mechanism.noise_variance``), from which ``value`` was computed.
    mechanism : Mechanism
        Calibration and privacy parameters.
    """

    statistic: str
    value: np.ndarray
    noise_var: np.ndarray
    n: Any
    labels: list[str]
    components: dict[str, Any]
    mechanism: Mechanism


@dataclass(frozen=True)
class DPSufficientStatistics:
    """Noisy sufficient statistics of per-region linear models ``y_r = Z beta_r + e``.

    Field names match ``fednipype.hub.regression.SufficientStatistics`` (see :meth:`meta_fields`).

    Attributes
    ----------
    terms : list of str
        Names of the columns of Z.
    regions : list of str
        Names of the columns of Y.
    ztz : numpy.ndarray
        (p, p) noisy Z^T Z, symmetric (noise drawn on the upper triangle and mirrored, so the
        two copies of an off-diagonal entry carry the same noise).
    zty : numpy.ndarray
        (p, r) noisy Z^T Y.
    yty : numpy.ndarray
        (r,) noisy diagonal of Y^T Y (sum of squares per region).
    n : float
        Noisy number of participants.
    ztz_noise_var, zty_noise_var, yty_noise_var : float
        Variance of the noise on each entry of the upper triangle of Z^T Z, of Z^T Y and of
        y^T y (all sigma^2: one vector mechanism, independent noise per released entry).
    n_noise_var : float
        Noise variance of ``n``.
    mechanism : Mechanism
        Calibration and privacy parameters.
    """

    terms: list[str]
    regions: list[str]
    ztz: np.ndarray
    zty: np.ndarray
    yty: np.ndarray
    n: float
    ztz_noise_var: float
    zty_noise_var: float
    yty_noise_var: float
    n_noise_var: float
    mechanism: Mechanism

    def meta_fields(self) -> dict[str, Any]:
        """The fields ``fednipype.hub.regression.SufficientStatistics`` is built from.

        That class wants the first term named ``"intercept"``: pass ``terms`` accordingly.
        """
        names = ("ztz", "zty", "yty", "n", "ztz_noise_var", "zty_noise_var", "yty_noise_var")
        fields = {name: getattr(self, name) for name in names}
        return {"terms": tuple(self.terms), "regions": tuple(self.regions), **fields}


class PreparedStatistic:
    """A validated statistic whose noise has not been drawn yet.

    It holds the exact (private) values; its representation shows only the mechanism.
    :meth:`release` draws the noise once; a second call raises, because every release needs
    its own charge.
    """

    def __init__(
        self,
        mechanism: Mechanism,
        exact: np.ndarray,
        finish: Callable[[np.ndarray], Any],
    ) -> None:
        self.mechanism = mechanism
        self._exact = np.asarray(exact, dtype=float).ravel()
        self._finish = finish
        self._released = False

    @property
    def statistic(self) -> str:
        """Which statistic."""
        return self.mechanism.statistic

    @property
    def epsilon(self) -> float:
        """Epsilon this statistic costs."""
        return self.mechanism.epsilon

    @property
    def delta(self) -> float:
        """Delta this statistic costs."""
        return self.mechanism.delta

    def audit_parameters(self) -> dict[str, Any]:
        """The mechanism description, for the ledger's audit row (holds no data)."""
        return self.mechanism.as_dict()

    def release(self) -> Any:
        """Draw the noise (OpenDP) and return the released statistic.

        Returns
        -------
        DPResult or DPSufficientStatistics
        """
        if self._released:
            raise FednipypeError(
                f"{self.statistic}: this prepared statistic was already released; releasing "
                "again would spend budget again, prepare and charge a new one"
            )
        self._released = True
        mech = self.mechanism
        if mech.name == "gaussian":
            noisy = add_gaussian_noise(self._exact, mech.noise_scale)
        else:
            noisy = add_laplace_noise(self._exact, mech.noise_scale)
        # Drop the private values as soon as they are no longer needed.
        self._exact = np.empty(0)
        return self._finish(noisy)

    def __repr__(self) -> str:
        m = self.mechanism
        return (
            f"PreparedStatistic({m.statistic!r}, {m.name}, epsilon={m.epsilon}, "
            f"delta={m.delta}, sensitivity={m.sensitivity:g})"
        )


# -- validation helpers ----------------------------------------------------------------------


def _check_positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise PolicyError(f"{where}: must be a finite number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(f"{where}: must be a finite number > 0, got {value!r}")
    return value


def _check_min_cohort(min_cohort: Any) -> int:
    if isinstance(min_cohort, bool) or not isinstance(min_cohort, int | np.integer):
        raise PolicyError(f"min_cohort: must be an integer >= 1, got {min_cohort!r}")
    if min_cohort < 1:
        raise PolicyError(f"min_cohort: must be an integer >= 1, got {min_cohort!r}")
    return int(min_cohort)


def _check_missing(missing: Any) -> str:
    if missing not in _MISSING:
        raise FednipypeError(f"missing: expected one of {_MISSING}, got {missing!r}")
    return missing


def _matrix(data: Any, name: str) -> tuple[np.ndarray, list[str] | None]:
    """A 2-D float array (rows = participants) and column names if ``data`` had any."""
    columns = [str(c) for c in data.columns] if isinstance(data, pd.DataFrame) else None
    if data is None:
        raise DataError(f"{name}: no data given")
    try:
        arr = np.array(data, dtype=float)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name}: expected numeric values ({err})") from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(
            f"{name}: expected a 2-D array (participants x columns), got {arr.ndim} dimensions"
        )
    if arr.shape[1] == 0:
        raise DataError(f"{name}: has no columns")
    if np.isinf(arr).any():
        rows = np.flatnonzero(np.isinf(arr).any(axis=1))
        raise DataError(
            f"{name}: {rows.size} row(s) hold infinite values (first at row {rows[0]}); "
            "fix the input, infinities are never clamped silently"
        )
    return arr, columns


def _complete_rows(arrays: Mapping[str, np.ndarray], missing: str) -> np.ndarray:
    """Mask of rows with no missing value in any array; raises if missing == 'raise'."""
    n_rows = {name: len(a) for name, a in arrays.items()}
    if len(set(n_rows.values())) > 1:
        raise DataError(f"inputs have different numbers of rows: {n_rows}")
    keep = np.ones(next(iter(n_rows.values())), dtype=bool)
    for name, arr in arrays.items():
        nan_rows = pd.isna(arr).reshape(len(arr), -1).any(axis=1)
        if nan_rows.any() and missing == "raise":
            raise DataError(
                f"{name}: {int(nan_rows.sum())} row(s) hold missing values (NaN; first at row "
                f"{int(np.flatnonzero(nan_rows)[0])}); drop them before the release or pass "
                "missing='drop' (values are never imputed)"
            )
        keep &= ~nan_rows
    if not keep.all():
        LOGGER.info("dropping %d row(s) with missing values", int((~keep).sum()))
    return keep


def _bounds(bounds: Any, n_columns: int, name: str, allow_constant: bool = False):
    """``(lo, hi)`` arrays of length ``n_columns`` from scalars or per-column sequences."""
    where = f"{name} bounds"
    if bounds is None:
        raise PolicyError(
            f"{where}: missing; public bounds must be declared (never derived from the data)"
        )
    if isinstance(bounds, str | bytes) or not isinstance(bounds, Sequence | np.ndarray):
        raise PolicyError(f"{where}: expected (lo, hi), got {bounds!r}")
    if len(bounds) != 2:
        raise PolicyError(f"{where}: expected (lo, hi), got {len(bounds)} items")
    try:
        lo = np.broadcast_to(np.asarray(bounds[0], dtype=float), (n_columns,)).copy()
        hi = np.broadcast_to(np.asarray(bounds[1], dtype=float), (n_columns,)).copy()
    except (TypeError, ValueError) as err:
        raise PolicyError(
            f"{where}: expected numbers, scalar or one per column ({n_columns}) ({err})"
        ) from err
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise PolicyError(f"{where}: must be finite, got lo={lo.tolist()}, hi={hi.tolist()}")
    bad = (lo > hi) if allow_constant else (lo >= hi)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        need = "lo <= hi" if allow_constant else "lo < hi"
        raise PolicyError(
            f"{where}: column {j} has lo={lo[j]}, hi={hi[j]}; bounds must satisfy {need}"
        )
    return lo, hi


def _budget(epsilon: Any, delta: Any, statistic: str) -> tuple[float, float]:
    return (
        check_epsilon(epsilon, f"{statistic}: epsilon"),
        check_delta(delta, f"{statistic}: delta"),
    )


def _disclosure(n: int, min_cohort: int, delta: float, statistic: str, cell: str = "") -> None:
    where = f"{statistic}{cell}"
    if n < min_cohort:
        raise DisclosureError(
            f"{where}: {n} participant(s), fewer than the minimum cohort of {min_cohort}"
        )
    if delta > 0 and delta >= 1.0 / n:
        raise DisclosureError(
            f"{statistic}: delta={delta:g} is not below 1/n = {1.0 / n:g}; a delta this large "
            "allows a mechanism to publish one participant's data outright"
        )


def _names(given: Sequence[str] | None, found: list[str] | None, k: int, prefix: str, name: str):
    names = list(given) if given is not None else found or [f"{prefix}{i}" for i in range(k)]
    names = [str(x) for x in names]
    if len(names) != k:
        raise DataError(f"{name}: {len(names)} names for {k} columns")
    return names


def _clamp_bounds(**named: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    return {k: {"lo": lo.tolist(), "hi": hi.tolist()} for k, (lo, hi) in named.items()}


# -- statistics ------------------------------------------------------------------------------


def _prepare_count(
    data: Any,
    epsilon: float,
    *,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    epsilon, _ = _budget(epsilon, 0.0, "count")
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    arr, _ = _matrix(data, "count: data")
    n = int(_complete_rows({"count: data": arr}, missing).sum())
    _disclosure(n, min_cohort, 0.0, "count")
    mech = _make_mechanism("count", epsilon, 0.0, 1.0, 1.0, {}, ["count"])

    def finish(noisy: np.ndarray) -> DPResult:
        return DPResult(
            statistic="count",
            value=noisy.copy(),
            noise_var=np.array([mech.noise_variance]),
            n=float(noisy[0]),
            labels=["count"],
            components={"count": float(noisy[0])},
            mechanism=mech,
        )

    return PreparedStatistic(mech, np.array([float(n)]), finish)


def _prepare_histogram(
    values: Any,
    edges: Sequence[float],
    epsilon: float,
    *,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    epsilon, _ = _budget(epsilon, 0.0, "histogram")
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    if edges is None:
        raise PolicyError("histogram edges: missing; bin edges must be public and declared")
    try:
        edges_arr = np.asarray(edges, dtype=float)
    except (TypeError, ValueError) as err:
        raise PolicyError(f"histogram edges: expected numbers ({err})") from err
    if edges_arr.ndim != 1 or edges_arr.size < 2 or not np.all(np.isfinite(edges_arr)):
        raise PolicyError("histogram edges: expected at least two finite numbers")
    if not np.all(np.diff(edges_arr) > 0):
        raise PolicyError("histogram edges: must be strictly increasing")
    arr, _ = _matrix(values, "histogram: values")
    if arr.shape[1] != 1:
        raise DataError(
            f"histogram: values must be one variable, got {arr.shape[1]} columns; release one "
            "histogram per variable"
        )
    keep = _complete_rows({"histogram: values": arr}, missing)
    x = np.clip(arr[keep, 0], edges_arr[0], edges_arr[-1])
    _disclosure(x.size, min_cohort, 0.0, "histogram")
    counts, _ = np.histogram(x, bins=edges_arr)
    labels = [f"[{edges_arr[i]:g}, {edges_arr[i + 1]:g})" for i in range(edges_arr.size - 1)]
    labels[-1] = labels[-1][:-1] + "]"
    bounds = (edges_arr[:1], edges_arr[-1:])
    # Adding or removing one participant changes one bin by one: L1 sensitivity 1.
    mech = _make_mechanism(
        "histogram",
        epsilon,
        0.0,
        1.0,
        1.0,
        _clamp_bounds(values=bounds),
        [f"count{label}" for label in labels],
    )

    def finish(noisy: np.ndarray) -> DPResult:
        return DPResult(
            statistic="histogram",
            value=noisy.copy(),
            noise_var=np.full(noisy.shape, mech.noise_variance),
            n=None,
            labels=labels,
            components={"edges": edges_arr.tolist(), "counts": noisy.copy()},
            mechanism=mech,
        )

    return PreparedStatistic(mech, counts.astype(float), finish)


def _prepare_mean(
    data: Any,
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    released_n: float | None = None,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    epsilon, delta = _budget(epsilon, delta, "mean")
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    arr, found = _matrix(data, "mean: data")
    labels = _names(regions, found, arr.shape[1], "y", "mean: regions")
    lo, hi = _bounds(bounds, arr.shape[1], "mean: data")
    if released_n is not None:
        released_n = _check_positive(released_n, "mean: released_n")
    keep = _complete_rows({"mean: data": arr}, missing)
    x = np.clip(arr[keep], lo, hi)
    n = x.shape[0]
    _disclosure(n, min_cohort, delta, "mean")
    center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    sums = (x - center).sum(axis=0)
    with_count = released_n is None
    # One participant changes each centred sum by at most half the bound width, and the
    # count by one.
    l1 = float(half.sum()) + (1.0 if with_count else 0.0)
    l2 = math.sqrt(float(np.sum(half**2)) + (1.0 if with_count else 0.0))
    layout = [f"sum_centered:{r}" for r in labels] + (["count"] if with_count else [])
    mech = _make_mechanism("mean", epsilon, delta, l1, l2, _clamp_bounds(data=(lo, hi)), layout)
    exact = np.concatenate([sums, [float(n)]]) if with_count else sums
    v = mech.noise_variance

    def finish(noisy: np.ndarray) -> DPResult:
        noisy_sums = noisy[: len(labels)]
        count = float(noisy[-1]) if with_count else float(released_n)
        # Post-processing: guard the division, keep the mean inside the public bounds.
        n_hat = max(count, 1.0)
        offset = noisy_sums / n_hat
        value = np.clip(center + offset, lo, hi)
        if with_count:
            noise_var = v * (1.0 + offset**2) / n_hat**2
        else:
            noise_var = np.full(offset.shape, v / n_hat**2)
        return DPResult(
            statistic="mean",
            value=value,
            noise_var=noise_var,
            n=count,
            labels=labels,
            components={
                "center": center.tolist(),
                "sum_centered": noisy_sums.copy(),
                "count": count,
                "count_released_before": not with_count,
            },
            mechanism=mech,
        )

    return PreparedStatistic(mech, exact, finish)


def _prepare_variance(
    data: Any,
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    epsilon, delta = _budget(epsilon, delta, "variance")
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    arr, found = _matrix(data, "variance: data")
    labels = _names(regions, found, arr.shape[1], "y", "variance: regions")
    lo, hi = _bounds(bounds, arr.shape[1], "variance: data")
    keep = _complete_rows({"variance: data": arr}, missing)
    x = np.clip(arr[keep], lo, hi)
    n = x.shape[0]
    _disclosure(n, min_cohort, delta, "variance")
    center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    xc = x - center
    exact = np.concatenate([xc.sum(axis=0), (xc**2).sum(axis=0), [float(n)]])
    # One participant changes a centred sum by <= half, a centred sum of squares by <= half^2.
    l1 = float(np.sum(half + half**2)) + 1.0
    l2 = math.sqrt(float(np.sum(half**2 + half**4)) + 1.0)
    layout = [f"sum_centered:{r}" for r in labels]
    layout += [f"sumsq_centered:{r}" for r in labels] + ["count"]
    mech = _make_mechanism(
        "variance", epsilon, delta, l1, l2, _clamp_bounds(data=(lo, hi)), layout
    )
    k, v = len(labels), mech.noise_variance

    def finish(noisy: np.ndarray) -> DPResult:
        s, q, count = noisy[:k], noisy[k : 2 * k], float(noisy[-1])
        n_hat = max(count, 2.0)
        var = (q - s**2 / n_hat) / (n_hat - 1.0)
        # Post-processing: a variance of values in [lo, hi] lies in [0, half^2 n/(n-1)].
        value = np.clip(var, 0.0, half**2 * n_hat / (n_hat - 1.0))
        # First-order noise variance, from released values only.
        d_q = 1.0 / (n_hat - 1.0)
        d_s = -2.0 * s / (n_hat * (n_hat - 1.0))
        d_n = (s / n_hat) ** 2 / (n_hat - 1.0) - var / (n_hat - 1.0)
        return DPResult(
            statistic="variance",
            value=value,
            noise_var=v * (d_q**2 + d_s**2 + d_n**2),
            n=count,
            labels=labels,
            components={
                "center": center.tolist(),
                "sum_centered": s.copy(),
                "sumsq_centered": q.copy(),
                "count": count,
                "mean": np.clip(center + s / n_hat, lo, hi),
            },
            mechanism=mech,
        )

    return PreparedStatistic(mech, exact, finish)


def _prepare_group_means(
    data: Any,
    groups: Any,
    levels: Sequence[Any],
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    epsilon, delta = _budget(epsilon, delta, "group_means")
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    if levels is None or isinstance(levels, str) or len(levels) == 0:
        raise PolicyError("group_means levels: the group labels must be declared (public)")
    levels = list(levels)
    if len(set(levels)) != len(levels):
        raise PolicyError(f"group_means levels: duplicated labels in {levels!r}")
    arr, found = _matrix(data, "group_means: data")
    labels = _names(regions, found, arr.shape[1], "y", "group_means: regions")
    lo, hi = _bounds(bounds, arr.shape[1], "group_means: data")
    group_arr = np.asarray(groups, dtype=object).ravel()
    keep = _complete_rows({"group_means: data": arr, "group_means: groups": group_arr}, missing)
    g = group_arr[keep]
    unknown = sorted({str(x) for x in g if x not in levels})
    if unknown:
        raise DataError(
            f"group_means: groups holds label(s) {unknown} not among the declared levels "
            f"{levels!r}"
        )
    x = np.clip(arr[keep], lo, hi)
    _disclosure(x.shape[0], min_cohort, delta, "group_means")
    center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    blocks = []
    for level in levels:
        rows = np.array([item == level for item in g], dtype=bool)
        _disclosure(int(rows.sum()), min_cohort, delta, "group_means", f" (group {level!r})")
        blocks.append(np.concatenate([(x[rows] - center).sum(axis=0), [float(rows.sum())]]))
    # A participant belongs to one group: it changes one group's block only.
    l1 = float(half.sum()) + 1.0
    l2 = math.sqrt(float(np.sum(half**2)) + 1.0)
    layout = [
        f"{name}:{level}"
        for level in levels
        for name in [f"sum_centered:{r}" for r in labels] + ["count"]
    ]
    mech = _make_mechanism(
        "group_means", epsilon, delta, l1, l2, _clamp_bounds(data=(lo, hi)), layout
    )
    k, v = len(labels), mech.noise_variance

    def finish(noisy: np.ndarray) -> DPResult:
        block = noisy.reshape(len(levels), k + 1)
        sums, counts = block[:, :k], block[:, k]
        n_hat = np.maximum(counts, 1.0)[:, None]
        offset = sums / n_hat
        return DPResult(
            statistic="group_means",
            value=np.clip(center + offset, lo, hi),
            noise_var=v * (1.0 + offset**2) / n_hat**2,
            n=counts.copy(),
            labels=labels,
            components={
                "levels": [str(level) for level in levels],
                "center": center.tolist(),
                "sum_centered": sums.copy(),
                "count": counts.copy(),
            },
            mechanism=mech,
        )

    return PreparedStatistic(mech, np.concatenate(blocks), finish)


def sufficient_statistics_sensitivity(z_bounds: Any, y_bounds: Any) -> float:
    """L2 sensitivity of the vector (n, upper triangle of Z^T Z, Z^T Y, diag Y^T Y).

    One participant (z, y) adds ``1``, ``z_i z_j`` (i <= j), ``z_i y_k`` and ``y_k^2``. Every
    squared entry is a product of squares of single coordinates, so the norm is largest where
    each |z_i| and |y_k| is largest over its bounds: with ``a_i = max(lo_i^2, hi_i^2)`` and
    ``b_k`` likewise, the squared sensitivity is
    ``1 + sum_{i<=j} a_i a_j + sum_{i,k} a_i b_k + sum_k b_k^2``.

    Parameters
    ----------
    z_bounds, y_bounds : tuple
        ``(lo, hi)`` per column of Z and Y.

    Returns
    -------
    float
    """
    zlo, zhi = (np.atleast_1d(np.asarray(b, dtype=float)) for b in z_bounds)
    ylo, yhi = (np.atleast_1d(np.asarray(b, dtype=float)) for b in y_bounds)
    a = np.maximum(zlo**2, zhi**2)
    b = np.maximum(ylo**2, yhi**2)
    upper = np.triu(np.outer(a, a))
    return math.sqrt(1.0 + float(upper.sum()) + float(np.outer(a, b).sum()) + float(np.sum(b**2)))


def _prepare_sufficient_statistics(
    Z: Any,
    Y: Any,
    z_bounds: Any,
    y_bounds: Any,
    epsilon: float,
    delta: float,
    *,
    terms: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> PreparedStatistic:
    statistic = "sufficient_statistics"
    epsilon, delta = _budget(epsilon, delta, statistic)
    if delta == 0:
        raise PolicyError(
            f"{statistic}: delta must be > 0 (the statistics are released with the Gaussian "
            "mechanism)"
        )
    min_cohort, missing = _check_min_cohort(min_cohort), _check_missing(missing)
    z, z_names = _matrix(Z, f"{statistic}: Z")
    y, y_names = _matrix(Y, f"{statistic}: Y")
    terms = _names(terms, z_names, z.shape[1], "z", f"{statistic}: terms")
    regions = _names(regions, y_names, y.shape[1], "y", f"{statistic}: regions")
    # A constant column (lo == hi, e.g. the intercept) is allowed in Z.
    zlo, zhi = _bounds(z_bounds, z.shape[1], f"{statistic}: Z", allow_constant=True)
    ylo, yhi = _bounds(y_bounds, y.shape[1], f"{statistic}: Y")
    keep = _complete_rows({f"{statistic}: Z": z, f"{statistic}: Y": y}, missing)
    z, y = np.clip(z[keep], zlo, zhi), np.clip(y[keep], ylo, yhi)
    n = z.shape[0]
    _disclosure(n, min_cohort, delta, statistic)
    p, r = z.shape[1], y.shape[1]
    ztz, zty, yty = z.T @ z, z.T @ y, np.sum(y**2, axis=0)
    iu = np.triu_indices(p)
    exact = np.concatenate([[float(n)], ztz[iu], zty.ravel(), yty])
    l2 = sufficient_statistics_sensitivity((zlo, zhi), (ylo, yhi))
    layout = ["n"] + [f"ztz:{terms[i]}:{terms[j]}" for i, j in zip(*iu, strict=True)]
    layout += [f"zty:{t}:{reg}" for t in terms for reg in regions]
    layout += [f"yty:{reg}" for reg in regions]
    mech = _make_mechanism(
        statistic,
        epsilon,
        delta,
        math.nan,
        l2,
        _clamp_bounds(Z=(zlo, zhi), Y=(ylo, yhi)),
        layout,
    )
    v = mech.noise_variance
    n_upper = len(iu[0])

    def finish(noisy: np.ndarray) -> DPSufficientStatistics:
        noisy_ztz = np.zeros((p, p))
        noisy_ztz[iu] = noisy[1 : 1 + n_upper]
        noisy_ztz = noisy_ztz + np.triu(noisy_ztz, 1).T
        start = 1 + n_upper
        noisy_zty = noisy[start : start + p * r].reshape(p, r)
        noisy_yty = noisy[start + p * r :]
        return DPSufficientStatistics(
            terms=terms,
            regions=regions,
            ztz=noisy_ztz,
            zty=noisy_zty.copy(),
            yty=noisy_yty.copy(),
            n=float(noisy[0]),
            ztz_noise_var=v,
            zty_noise_var=v,
            yty_noise_var=v,
            n_noise_var=v,
            mechanism=mech,
        )

    return PreparedStatistic(mech, exact, finish)


_PREPARERS: dict[str, Callable[..., PreparedStatistic]] = {
    "count": _prepare_count,
    "histogram": _prepare_histogram,
    "mean": _prepare_mean,
    "variance": _prepare_variance,
    "group_means": _prepare_group_means,
    "sufficient_statistics": _prepare_sufficient_statistics,
}


def prepare(statistic: str, /, *args: Any, **kwargs: Any) -> PreparedStatistic:
    """Validate inputs and compute the exact statistic, without drawing noise.

    Call this before charging the ledger: any invalid input raises here and costs nothing.
    Arguments are those of the matching ``dp_<statistic>`` function.

    Parameters
    ----------
    statistic : str
        One of :data:`STATISTICS`.
    *args, **kwargs
        Arguments of ``dp_<statistic>``.

    Returns
    -------
    PreparedStatistic

    Raises
    ------
    PolicyError
        If the statistic is unknown, or epsilon, delta or bounds are invalid.
    DisclosureError
        If there are fewer than ``min_cohort`` participants (overall or in a group), or delta
        is not below 1/n.
    FednipypeError
        If the data are malformed (non-numeric, NaN with ``missing="raise"``, infinite).
    """
    if statistic not in _PREPARERS:
        raise PolicyError(
            f"unknown statistic {statistic!r}; known statistics: {', '.join(STATISTICS)}"
        )
    return _PREPARERS[statistic](*args, **kwargs)


def dp_count(
    data: Any,
    epsilon: float,
    *,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPResult:
    """Noisy number of participants (rows), Laplace mechanism, pure epsilon-DP.

    Parameters
    ----------
    data : array_like
        One row per participant (only the rows are counted, after missing-value handling).
    epsilon : float
        Privacy loss, finite and > 0.
    min_cohort : int
        Smallest number of rows allowed.
    missing : {"raise", "drop"}
        What to do with rows holding NaN.

    Returns
    -------
    DPResult
        ``value`` is the noisy count (float; round or clip it as post-processing if needed),
        noise variance ``2 b^2`` with ``b = 1/epsilon``.
    """
    return _prepare_count(data, epsilon, min_cohort=min_cohort, missing=missing).release()


def dp_histogram(
    values: Any,
    edges: Sequence[float],
    epsilon: float,
    *,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPResult:
    """Noisy histogram of one variable over public bin edges, Laplace mechanism.

    Values are clamped to ``[edges[0], edges[-1]]`` (so values outside fall into the first or
    last bin); bins are half-open ``[e_i, e_i+1)`` except the last, which is closed (numpy's
    convention). One participant changes one bin by one: L1 sensitivity 1.

    Parameters
    ----------
    values : array_like
        One value per participant.
    edges : sequence of float
        Public, strictly increasing bin edges.
    epsilon : float
        Privacy loss, finite and > 0.
    min_cohort : int
        Smallest number of participants allowed (overall).
    missing : {"raise", "drop"}
        What to do with missing values.

    Returns
    -------
    DPResult
        Noisy counts per bin.
    """
    return _prepare_histogram(
        values, edges, epsilon, min_cohort=min_cohort, missing=missing
    ).release()


def dp_mean(
    data: Any,
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    released_n: float | None = None,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPResult:
    """Noisy bounded mean of each column (region).

    Values are clamped to the public bounds and centred on their midpoint ``c``. The mechanism
    releases the centred sums ``S_j`` and, unless ``released_n`` is given, the count ``n`` in
    one vector (L2 sensitivity ``sqrt(sum_j h_j^2 + 1)``, L1 ``sum_j h_j + 1``, with ``h`` the
    half-widths of the bounds). The mean is ``c + S~ / max(n~, 1)`` clipped to the bounds.

    How n is handled: either released noisily here, or ``released_n`` is a count released
    before (e.g. by :func:`dp_count`, with its own charge); it is public, so dividing by it is
    post-processing. Never pass the exact n.

    Parameters
    ----------
    data : array_like
        (participants, regions) values; a DataFrame's columns name the regions.
    bounds : tuple
        Public ``(lo, hi)``, scalars or one per column.
    epsilon : float
        Privacy loss, finite and > 0.
    delta : float
        0 gives the Laplace mechanism; > 0 the analytic Gaussian (delta < 1/n).
    released_n : float, optional
        A previously released noisy count to divide by.
    regions : sequence of str, optional
        Column names.
    min_cohort : int
        Smallest number of participants allowed.
    missing : {"raise", "drop"}
        What to do with rows holding NaN.

    Returns
    -------
    DPResult
        ``value`` per region, ``noise_var`` a first-order approximation of the noise
        variance of each mean (exact ``sigma^2/n^2`` with ``released_n``), ``n`` the count.
    """
    return _prepare_mean(
        data,
        bounds,
        epsilon,
        delta,
        released_n=released_n,
        regions=regions,
        min_cohort=min_cohort,
        missing=missing,
    ).release()


def dp_variance(
    data: Any,
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPResult:
    """Noisy bounded sample variance (n - 1 denominator) of each column.

    Releases centred sums, centred sums of squares and the count in one vector mechanism
    (L2 sensitivity ``sqrt(sum_j (h_j^2 + h_j^4) + 1)``), then post-processes:
    ``(Q~ - S~^2 / n~) / (n~ - 1)`` clipped to ``[0, h^2 n~/(n~ - 1)]``.

    Parameters
    ----------
    data : array_like
        (participants, regions) values.
    bounds : tuple
        Public ``(lo, hi)``, scalars or one per column.
    epsilon, delta : float
        Privacy loss (delta 0: Laplace; > 0: analytic Gaussian).
    regions : sequence of str, optional
        Column names.
    min_cohort : int
        Smallest number of participants allowed.
    missing : {"raise", "drop"}
        What to do with rows holding NaN.

    Returns
    -------
    DPResult
        ``value`` the variances, ``noise_var`` their first-order noise variances,
        ``components["mean"]`` the means implied by the same release.
    """
    return _prepare_variance(
        data, bounds, epsilon, delta, regions=regions, min_cohort=min_cohort, missing=missing
    ).release()


def dp_group_means(
    data: Any,
    groups: Any,
    levels: Sequence[Any],
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPResult:
    """Noisy bounded means of each column within each group (e.g. diagnosis, sex).

    Each group releases its centred sums and its count; a participant is in one group only,
    so the whole vector has the sensitivity of one group's block. Every group must hold at
    least ``min_cohort`` participants.

    Parameters
    ----------
    data : array_like
        (participants, regions) values.
    groups : array_like
        One group label per participant.
    levels : sequence
        The public list of group labels (a label outside it is an error).
    bounds : tuple
        Public ``(lo, hi)``, scalars or one per column.
    epsilon, delta : float
        Privacy loss (delta 0: Laplace; > 0: analytic Gaussian).
    regions : sequence of str, optional
        Column names.
    min_cohort : int
        Smallest number of participants allowed in every group.
    missing : {"raise", "drop"}
        What to do with rows holding NaN (in the data or the group label).

    Returns
    -------
    DPResult
        ``value`` of shape (groups, regions), ``n`` the noisy count per group.
    """
    return _prepare_group_means(
        data,
        groups,
        levels,
        bounds,
        epsilon,
        delta,
        regions=regions,
        min_cohort=min_cohort,
        missing=missing,
    ).release()


def dp_sufficient_statistics(
    Z: Any,
    Y: Any,
    z_bounds: Any,
    y_bounds: Any,
    epsilon: float,
    delta: float,
    *,
    terms: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    missing: str = "raise",
) -> DPSufficientStatistics:
    """Noisy sufficient statistics of a linear model per region: Z^T Z, Z^T y, y^T y, n.

    Rows are clamped to the public bounds; the released vector (n, the upper triangle of
    Z^T Z, all of Z^T Y, the sums of squares of each column of Y) gets Gaussian noise with
    sigma from the analytic Gaussian mechanism for its L2 sensitivity
    (:func:`sufficient_statistics_sensitivity`); Z^T Z is mirrored from its noisy upper
    triangle. Summed over sites these give the pooled regression.

    Parameters
    ----------
    Z : array_like
        (participants, terms) design matrix, including the intercept column if wanted
        (declare its bounds as ``(1, 1)``: constant columns may have lo == hi).
    Y : array_like
        (participants, regions) outcomes.
    z_bounds, y_bounds : tuple
        Public ``(lo, hi)`` per column (or scalars).
    epsilon : float
        Finite, > 0.
    delta : float
        0 < delta < 1/n.
    terms, regions : sequence of str, optional
        Column names (taken from DataFrames if not given).
    min_cohort : int
        Smallest number of participants allowed.
    missing : {"raise", "drop"}
        What to do with rows holding NaN in Z or Y.

    Returns
    -------
    DPSufficientStatistics
    """
    return _prepare_sufficient_statistics(
        Z,
        Y,
        z_bounds,
        y_bounds,
        epsilon,
        delta,
        terms=terms,
        regions=regions,
        min_cohort=min_cohort,
        missing=missing,
    ).release()


# -- budget split ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSplit:
    """How one release's (epsilon, delta) is shared among its statistics.

    The parts must add up to the release's total (basic composition); the release charges the
    total to the ledger once and records :meth:`as_dict`.

    Parameters
    ----------
    epsilon, delta : float
        The release's total.
    parts : Mapping[str, tuple of float]
        ``label -> (epsilon, delta)`` per statistic of the release.

    Examples
    --------
    >>> split = BudgetSplit(1.0, 1e-6, {"count": (0.2, 0.0), "ss": (0.8, 1e-6)})
    >>> split["ss"]
    (0.8, 1e-06)
    """

    epsilon: float
    delta: float
    parts: Mapping[str, tuple[float, float]] = field(hash=False)

    def __post_init__(self) -> None:
        total_e = check_epsilon(self.epsilon, "budget split: epsilon")
        total_d = check_delta(self.delta, "budget split: delta")
        if not isinstance(self.parts, Mapping) or not self.parts:
            raise PolicyError("budget split: parts must map each statistic to (epsilon, delta)")
        parts = {}
        for label, part in self.parts.items():
            if not isinstance(part, Sequence) or len(part) != 2:
                raise PolicyError(f"budget split: part {label!r} must be (epsilon, delta)")
            parts[str(label)] = (
                check_epsilon(part[0], f"budget split: {label} epsilon"),
                check_delta(part[1], f"budget split: {label} delta"),
            )
        sum_e = math.fsum(p[0] for p in parts.values())
        sum_d = math.fsum(p[1] for p in parts.values())
        for name, got, want in (("epsilon", sum_e, total_e), ("delta", sum_d, total_d)):
            if abs(got - want) > SPLIT_TOLERANCE * want:
                raise PolicyError(
                    f"budget split: the parts' {name} add up to {got!r}, not the release's "
                    f"total {want!r}"
                )
        object.__setattr__(self, "epsilon", total_e)
        object.__setattr__(self, "delta", total_d)
        object.__setattr__(self, "parts", parts)

    @classmethod
    def proportional(
        cls,
        epsilon: float,
        delta: float,
        epsilon_weights: Mapping[str, float],
        delta_weights: Mapping[str, float] | None = None,
    ) -> BudgetSplit:
        """Split a total in proportion to weights.

        Parameters
        ----------
        epsilon, delta : float
            The release's total.
        epsilon_weights : Mapping[str, float]
            Positive weight per statistic.
        delta_weights : Mapping[str, float], optional
            Non-negative weight per statistic (default: the epsilon weights); give 0 to
            statistics released with the Laplace mechanism.

        Returns
        -------
        BudgetSplit
        """
        delta_weights = epsilon_weights if delta_weights is None else delta_weights
        if set(delta_weights) != set(epsilon_weights):
            raise PolicyError("budget split: epsilon and delta weights name different statistics")
        we = {k: float(w) for k, w in epsilon_weights.items()}
        wd = {k: float(w) for k, w in delta_weights.items()}
        if any(not math.isfinite(w) or w <= 0 for w in we.values()):
            raise PolicyError("budget split: epsilon weights must be finite and > 0")
        if any(not math.isfinite(w) or w < 0 for w in wd.values()):
            raise PolicyError("budget split: delta weights must be finite and >= 0")
        se, sd = math.fsum(we.values()), math.fsum(wd.values())
        if delta > 0 and sd == 0:
            raise PolicyError("budget split: delta > 0 but every delta weight is 0")
        parts = {k: (epsilon * we[k] / se, (delta * wd[k] / sd) if sd > 0 else 0.0) for k in we}
        return cls(epsilon, delta, parts)

    def __getitem__(self, label: str) -> tuple[float, float]:
        if label not in self.parts:
            raise PolicyError(
                f"budget split: no budget for statistic {label!r}; the split covers "
                f"{sorted(self.parts)}"
            )
        return self.parts[label]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record of the split."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "composition": "basic",
            "parts": {k: {"epsilon": e, "delta": d} for k, (e, d) in self.parts.items()},
        }
