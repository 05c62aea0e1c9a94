"""How a release's noise follows from its privacy parameters: the analytic Gaussian mechanism.

Part of the release contract because both sides need it: a site calibrates its noise with it,
and the hub recomputes from a release's declared (ε, δ) and public bounds what the noise must
be. Pure arithmetic: no data, no randomness (noise is drawn at the site, by OpenDP).

References
----------
Balle, B. & Wang, Y.-X. (2018). Improving the Gaussian mechanism for differential privacy:
analytical calibration and optimal denoising. ICML. arXiv:1805.06530.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import log_ndtr

from fednipype.exceptions import PolicyError

__all__ = [
    "analytic_gaussian_sigma",
    "check_delta",
    "check_epsilon",
    "check_positive",
    "is_number",
    "sufficient_statistics_sensitivity",
]


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (a bool is not a privacy parameter)."""
    # bool is a subclass of int in Python; `true` is never a valid privacy parameter.
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_epsilon(value: Any, where: str) -> float:
    """Return ``value`` as a float if it is a valid epsilon (finite, > 0).

    Parameters
    ----------
    value : Any
        The candidate epsilon.
    where : str
        Where the value comes from (file and key, or argument name), used in the error.

    Returns
    -------
    float
        The validated epsilon.

    Raises
    ------
    PolicyError
        If ``value`` is not a finite number greater than 0.
    """
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise PolicyError(f"{where}: epsilon must be a finite number > 0, got {value!r}")
    return float(value)


def check_delta(value: Any, where: str) -> float:
    """Return ``value`` as a float if it is a valid delta (0 <= delta < 1).

    Parameters
    ----------
    value : Any
        The candidate delta.
    where : str
        Where the value comes from, used in the error.

    Returns
    -------
    float
        The validated delta.

    Raises
    ------
    PolicyError
        If ``value`` is not a number in [0, 1).
    """
    if not is_number(value) or not math.isfinite(value) or not 0 <= value < 1:
        raise PolicyError(f"{where}: delta must be a number with 0 <= delta < 1, got {value!r}")
    return float(value)


def check_positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise PolicyError(f"{where}: must be a finite number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(f"{where}: must be a finite number > 0, got {value!r}")
    return value


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
    sens = check_positive(l2_sensitivity, "analytic_gaussian_sigma: l2_sensitivity")
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
    from scipy.optimize import brentq  # here: scipy.optimize costs ~0.4 s to import

    sigma = math.exp(brentq(excess, math.log(lo), math.log(hi), xtol=1e-15, rtol=1e-15))
    # Round up so the guarantee holds for the sigma actually used.
    while excess(math.log(sigma)) > 0:
        sigma = math.nextafter(sigma, math.inf) * (1.0 + 1e-15)
    return sigma


def sufficient_statistics_sensitivity(
    z_bounds: Any, y_bounds: Any, n_columns: Sequence[int] = ()
) -> float:
    """L2 sensitivity of the vector (n, upper triangle of Z^T Z, Z^T Y, diag Y^T Y).

    One participant (z, y) adds ``1``, ``z_i z_j`` (i <= j), ``z_i y_k`` and ``y_k^2``. Every
    squared entry is a product of squares of single coordinates, so the norm is largest where
    each |z_i| and |y_k| is largest over its bounds: with ``a_i = max(lo_i^2, hi_i^2)`` and
    ``b_k`` likewise, the squared sensitivity is
    ``1 + sum_{i<=j} a_i a_j + sum_{i,k} a_i b_k + sum_k b_k^2``. The diagonal entries of
    ``n_columns`` (columns whose square is 1 for everyone: the intercept, ±1-coded dummies)
    equal n and are not released, so their ``a_i^2`` terms drop out: n is released once.

    Parameters
    ----------
    z_bounds, y_bounds : tuple
        ``(lo, hi)`` per column of Z and Y.
    n_columns : sequence of int
        Columns of Z whose diagonal entry of Z^T Z is n itself (not released).

    Returns
    -------
    float
    """
    zlo, zhi = (np.atleast_1d(np.asarray(b, dtype=float)) for b in z_bounds)
    ylo, yhi = (np.atleast_1d(np.asarray(b, dtype=float)) for b in y_bounds)
    a = np.maximum(zlo**2, zhi**2)
    b = np.maximum(ylo**2, yhi**2)
    upper = np.triu(np.outer(a, a))
    upper[list(n_columns), list(n_columns)] = 0.0
    return math.sqrt(1.0 + float(upper.sum()) + float(np.outer(a, b).sum()) + float(np.sum(b**2)))
