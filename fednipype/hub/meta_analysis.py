"""Meta-analysis of one estimate per site: fixed and random effects, as R's metafor.

:func:`fixed_effect` and :func:`random_effects` combine one estimate and its sampling variance
per site, following ``metafor::rma()`` conventions to the digit: the same τ² estimators
(DerSimonian–Laird, REML, Paule–Mandel), standard errors, Wald or Knapp–Hartung tests,
Cochran's Q and metafor's I² and H².

Why the τ² estimators are written here rather than taken from a library
-------------------------------------------------------------------------
``statsmodels.stats.meta_analysis.combine_effects`` agrees with metafor on the fixed-effect
estimate, its standard error, Q and, when Q ≥ k − 1, the DerSimonian–Laird fit. It does not
follow metafor elsewhere: its DL τ² is not truncated at zero (so weights, estimate and standard
error differ whenever Q < k − 1), it has no REML, its Paule–Mandel Newton loop drops the
convergence flag and resets τ² to 0 if an iterate overshoots, and its I²/H² are the Q-based pair,
which metafor reports only for FE and DL. PyMARE 0.0.13 has no Paule–Mandel and profiles REML
to ``xtol=1e-6`` (its own metafor-alignment tests allow 1e-4 relative on τ²). The estimators
below are therefore the textbook formulas metafor uses, solved to machine precision, and
``tests/test_meta.py`` checks them against statsmodels where the two should agree and against
published metafor output everywhere.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from scipy.optimize import brentq

from fednipype.exceptions import MetaAnalysisError

LOGGER = logging.getLogger(__name__)

__all__ = ["RE_METHODS", "TESTS", "MetaResult", "check_level", "fixed_effect", "random_effects"]

RE_METHODS = ("DL", "REML", "PM")
TESTS = ("z", "knha")

#: metafor's tolerance for its "is the restricted likelihood higher at τ² = 0?" check.
REML_LL0_TOL = np.finfo(float).eps ** 0.25

# --------------------------------------------------------------------------------------------
# Meta-analysis of one estimate per site
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaResult:
    """The result of :func:`fixed_effect` or :func:`random_effects`, named as in metafor.

    Attributes
    ----------
    estimate, se : float
        Pooled estimate and its standard error (Knapp–Hartung-scaled when ``test="knha"``).
    statistic : float
        ``estimate / se``; a z statistic when ``dist == "z"``, a t statistic when ``"t"``.
    dist : {"z", "t"}
        Reference distribution of ``statistic``.
    df : float or None
        Degrees of freedom of the t distribution (k − 1), ``None`` for z.
    p : float
        Two-sided p-value.
    ci_low, ci_high : float
        Confidence interval at ``level``.
    level : float
        Confidence level as a fraction (0.95).
    tau2 : float
        Between-site variance τ² (0 for the fixed-effect model).
    q, q_df, q_p : float, int, float
        Cochran's Q (inverse-variance weights 1/v), its degrees of freedom k − 1 and p-value.
    i2 : float
        I² **in percent**, as metafor prints it: the Q-based (Q − df)/Q for the fixed-effect
        model, τ²/(τ² + ṽ) with metafor's "typical" within-site variance
        ṽ = (k − 1)/(Σw − Σw²/Σw), w = 1/v, for random-effects models.
    h2 : float
        H²: Q/(k − 1) for the fixed-effect model, 1 + τ²/ṽ for random-effects models.
    k : int
        Number of estimates pooled.
    method : {"FE", "DL", "REML", "PM"}
        Model / τ² estimator.
    test : {"z", "knha"}
        Inference: Wald z or Knapp–Hartung t.
    weights : tuple of float
        Inverse-variance weights 1/(v + τ²) used for the pooled estimate.
    note : str or None
        Anything the caller should know about this fit (e.g. k = 1).
    """

    estimate: float
    se: float
    statistic: float
    dist: str
    df: float | None
    p: float
    ci_low: float
    ci_high: float
    level: float
    tau2: float
    q: float
    q_df: int
    q_p: float
    i2: float
    h2: float
    k: int
    method: str
    test: str
    weights: tuple[float, ...]
    note: str | None = None

    @property
    def z(self) -> float | None:
        """The z statistic, or ``None`` when the test is Knapp–Hartung's t."""
        return self.statistic if self.dist == "z" else None

    @property
    def t(self) -> float | None:
        """The t statistic, or ``None`` when the test is a z test."""
        return self.statistic if self.dist == "t" else None

    @property
    def tau(self) -> float:
        """√τ²."""
        return math.sqrt(self.tau2)

    @property
    def weights_percent(self) -> tuple[float, ...]:
        """Weights as percentages of their sum, as metafor's ``weights()`` reports them."""
        total = math.fsum(self.weights)
        return tuple(100.0 * w / total for w in self.weights)


def fixed_effect(y: Any, v: Any, *, test: str = "z", level: float = 0.95) -> MetaResult:
    """Fixed-effect (inverse-variance) meta-analysis, as ``metafor::rma(yi, vi, method="FE")``.

    Parameters
    ----------
    y : array_like of float
        One estimate per site (finite).
    v : array_like of float
        Their sampling variances (finite, > 0).
    test : {"z", "knha"}
        Wald z test (default) or Knapp–Hartung t test with k − 1 df. metafor allows the latter
        for FE models with a warning that the method is meant for random-effects models.
    level : float
        Confidence level as a fraction, default 0.95.

    Returns
    -------
    MetaResult

    Examples
    --------
    >>> res = fixed_effect([0.1, 0.3, 0.2], [0.01, 0.02, 0.04])
    >>> round(res.estimate, 4), round(res.se, 4), round(res.q, 4)
    (0.1714, 0.0756, 1.3571)
    """
    y_arr, v_arr = _check_effects(y, v)
    test = _check_choice(test, TESTS, "test")
    level = check_level(level)
    return _fit_meta(y_arr, v_arr, tau2=0.0, method="FE", test=test, level=level)


def random_effects(
    y: Any, v: Any, method: str = "REML", test: str = "z", level: float = 0.95
) -> MetaResult:
    """Random-effects meta-analysis, as ``metafor::rma(yi, vi, method=..., test=...)``.

    Parameters
    ----------
    y : array_like of float
        One estimate per site (finite).
    v : array_like of float
        Their sampling variances (finite, > 0).
    method : {"REML", "DL", "PM"}
        τ² estimator: restricted maximum likelihood (root of the REML score equation), DerSimonian–
        Laird, or Paule–Mandel (root of the generalised Q = k − 1). Roots are solved to machine
        precision; all estimates are truncated at τ² = 0, as in metafor.
    test : {"z", "knha"}
        Wald z test or Knapp–Hartung: the variance is scaled by Σw(y − μ̂)²/(k − 1) with no
        truncation of the factor (metafor's ``test="knha"``, not ``"adhoc"``) and the test and
        interval use a t distribution with k − 1 df.
    level : float
        Confidence level as a fraction, default 0.95.

    Returns
    -------
    MetaResult

    Notes
    -----
    With k = 1, metafor fits the model with τ² set to 0, Q = 0, p(Q) = 1, I² = 0 and H² = 1;
    this function does the same and records it in ``MetaResult.note``. Knapp–Hartung with
    k = 1 would be a t test with 0 df (metafor returns NA for its p-value and interval); this
    function raises :class:`~fednipype.exceptions.MetaAnalysisError` instead.

    Examples
    --------
    >>> res = random_effects([0.1, 0.5, -0.2, 0.3], [0.01, 0.02, 0.04, 0.02], method="DL")
    >>> round(res.tau2, 4), round(res.estimate, 4), round(res.i2, 2)
    (0.045, 0.1939, 70.0)
    """
    y_arr, v_arr = _check_effects(y, v)
    method = _check_choice(method, RE_METHODS, "method", upper=True)
    test = _check_choice(test, TESTS, "test")
    level = check_level(level)
    if y_arr.size == 1:
        tau2 = 0.0
    elif method == "DL":
        tau2 = _tau2_dl(y_arr, v_arr)
    elif method == "PM":
        tau2 = _tau2_pm(y_arr, v_arr)
    else:
        tau2 = _tau2_reml(y_arr, v_arr)
    return _fit_meta(y_arr, v_arr, tau2=tau2, method=method, test=test, level=level)


def _fit_meta(
    y: np.ndarray, v: np.ndarray, *, tau2: float, method: str, test: str, level: float
) -> MetaResult:
    """Pool ``y`` with weights 1/(v + τ²) and add the heterogeneity statistics."""
    k = y.size
    note = None
    if k == 1:
        if test == "knha":
            raise MetaAnalysisError(
                "test='knha' needs at least 2 estimates (its t test has k - 1 degrees of "
                "freedom); y has 1. Use test='z' for a single site."
            )
        note = "k = 1: tau2 set to 0, Q = 0 (p = 1), I2 = 0 and H2 = 1, as metafor does"
        LOGGER.info("meta-analysis of a single estimate: %s", note)

    w = 1.0 / (v + tau2)
    w_sum = w.sum()
    estimate = float(w @ y / w_sum)
    variance = 1.0 / w_sum
    alpha = 1.0 - level
    if test == "knha":
        rss = float(w @ (y - estimate) ** 2)
        # metafor sets the scale to 0 when all estimates coincide (RSS at rounding level).
        s2w = rss / (k - 1) if rss > np.finfo(float).eps else 0.0
        variance *= s2w
        df: float | None = float(k - 1)
        crit = float(special.stdtrit(df, 1.0 - alpha / 2.0))
    else:
        df = None
        crit = float(special.ndtri(1.0 - alpha / 2.0))
    se = math.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = float(np.float64(estimate) / np.float64(se))
    if df is None:
        p = float(2.0 * special.ndtr(-abs(statistic)))
    else:
        p = float(2.0 * special.stdtr(df, -abs(statistic)))

    q, q_p, i2, h2 = _heterogeneity(y, v, tau2, fixed=method == "FE")
    return MetaResult(
        estimate=estimate,
        se=se,
        statistic=statistic,
        dist="t" if test == "knha" else "z",
        df=df,
        p=p,
        ci_low=estimate - crit * se,
        ci_high=estimate + crit * se,
        level=level,
        tau2=float(tau2),
        q=q,
        q_df=k - 1,
        q_p=q_p,
        i2=i2,
        h2=h2,
        k=k,
        method=method,
        test=test,
        weights=tuple(float(x) for x in w),
        note=note,
    )


def _cochran_q(y: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Cochran's Q with weights w = 1/v, and tr P = Σw − Σw²/Σw (its expectation's slope in τ²)."""
    w = 1.0 / v
    w_sum = w.sum()
    q = float(w @ (y - w @ y / w_sum) ** 2)
    return max(0.0, q), float(w_sum - (w @ w) / w_sum)


def _heterogeneity(
    y: np.ndarray, v: np.ndarray, tau2: float, *, fixed: bool
) -> tuple[float, float, float, float]:
    """Cochran's Q, its p-value, I² (percent) and H², with metafor's definitions."""
    k = y.size
    if k == 1:
        return 0.0, 1.0, 0.0, 1.0
    q, trace_p = _cochran_q(y, v)
    q_p = float(special.chdtrc(k - 1, q))
    if fixed:
        i2 = max(0.0, 100.0 * (q - (k - 1)) / q) if q > 0 else 0.0
        h2 = q / (k - 1)
    else:
        typical_v = (k - 1) / trace_p  # metafor's "typical" within-site variance
        i2 = 100.0 * tau2 / (typical_v + tau2)
        h2 = tau2 / typical_v + 1.0
    return q, q_p, i2, h2


def _tau2_dl(y: np.ndarray, v: np.ndarray) -> float:
    """DerSimonian–Laird moment estimator (Q − (k − 1)) / tr P, truncated at 0."""
    q, trace_p = _cochran_q(y, v)
    return max(0.0, (q - (y.size - 1)) / trace_p)


def _generalised_q(tau2: float, y: np.ndarray, v: np.ndarray) -> float:
    w = 1.0 / (v + tau2)
    return float(w @ (y - w @ y / w.sum()) ** 2)


def _tau2_pm(y: np.ndarray, v: np.ndarray) -> float:
    """Paule–Mandel: the τ² ≥ 0 at which the generalised Q equals k − 1.

    The generalised Q decreases in τ² and tends to 0, so a root exists whenever Q(0) > k − 1;
    it is bracketed by doubling and solved with Brent's method to machine precision
    (metafor uses ``uniroot`` with tolerance ``.Machine$double.eps^0.25`` by default).
    """
    target = y.size - 1

    def excess(tau2: float) -> float:
        return _generalised_q(tau2, y, v) - target

    if excess(0.0) <= 0.0:
        return 0.0
    upper = max(float(np.var(y)), float(v.max()), np.finfo(float).tiny)
    while excess(upper) > 0.0:
        upper *= 2.0
        if not math.isfinite(upper):
            raise MetaAnalysisError("Paule-Mandel: could not bracket tau2 (y has extreme values)")
    return float(brentq(excess, 0.0, upper, xtol=1e-300, rtol=4 * np.finfo(float).eps))


def _reml_loglik(tau2: float, y: np.ndarray, v: np.ndarray) -> float:
    """Restricted log-likelihood of the intercept-only model, up to a constant."""
    w = 1.0 / (v + tau2)
    w_sum = w.sum()
    resid = y - w @ y / w_sum
    return float(-0.5 * (np.log(v + tau2).sum() + math.log(w_sum) + w @ resid**2))


def _reml_score(tau2: float, y: np.ndarray, v: np.ndarray) -> float:
    """Twice the derivative of the restricted log-likelihood in τ²: yᵀPPy − tr P.

    With P = W − wwᵀ/Σw (intercept-only), Py = w(y − μ̂), so yᵀPPy = Σw²(y − μ̂)² and
    tr P = Σw − Σw²/Σw.
    """
    w = 1.0 / (v + tau2)
    w_sum = w.sum()
    resid = y - w @ y / w_sum
    return float((w * w) @ resid**2 - (w_sum - (w @ w) / w_sum))


def _tau2_reml(y: np.ndarray, v: np.ndarray) -> float:
    """REML: the root of the restricted-likelihood score in τ² ≥ 0, to machine precision.

    metafor maximises the same likelihood by Fisher scoring from the Hedges estimate (to a
    change below 1e-5). Fisher scoring can oscillate and fail — metafor then stops with an
    error — so the score equation is solved here with Brent's method on a bracket instead:
    where Fisher scoring converges, both reach the same root. If the score is not positive at
    τ² = 0 the maximum is on the boundary and τ² = 0. As metafor's ``ll0check``, τ² = 0 is kept
    if the restricted likelihood is higher there.
    """
    if _reml_score(0.0, y, v) <= 0.0:
        return 0.0
    upper = max(float(np.var(y)), float(v.max()), np.finfo(float).tiny)
    while _reml_score(upper, y, v) > 0.0:
        upper *= 2.0
        if not math.isfinite(upper):
            raise MetaAnalysisError("REML: could not bracket tau2 (y has extreme values)")
    tau2 = float(
        brentq(_reml_score, 0.0, upper, args=(y, v), xtol=1e-300, rtol=4 * np.finfo(float).eps)
    )
    if _reml_loglik(0.0, y, v) - _reml_loglik(tau2, y, v) > REML_LL0_TOL:
        LOGGER.warning("REML: the restricted likelihood is higher at tau2 = 0; using tau2 = 0")
        tau2 = 0.0
    return tau2


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_float_vector(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise MetaAnalysisError(f"{name} must be a sequence of numbers; got {values!r}") from err
    if arr.ndim != 1:
        raise MetaAnalysisError(
            f"{name} must be a one-dimensional sequence of numbers; got shape {arr.shape}"
        )
    return arr


def _check_effects(y: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate estimates ``y`` and sampling variances ``v``; return float copies."""
    y_arr = _as_float_vector(y, "y")
    v_arr = _as_float_vector(v, "v")
    if y_arr.size == 0:
        raise MetaAnalysisError("y is empty: need at least one estimate to pool")
    if y_arr.size != v_arr.size:
        raise MetaAnalysisError(
            f"y and v must have the same length (one sampling variance per estimate); "
            f"got len(y) = {y_arr.size}, len(v) = {v_arr.size}"
        )
    bad = np.flatnonzero(~np.isfinite(y_arr))
    if bad.size:
        raise MetaAnalysisError(
            f"y must be finite; y[{bad[0]}] = {y_arr[bad[0]]} ({bad.size} non-finite value(s))"
        )
    bad = np.flatnonzero(~np.isfinite(v_arr))
    if bad.size:
        raise MetaAnalysisError(
            f"v must be finite sampling variances; v[{bad[0]}] = {v_arr[bad[0]]} "
            f"({bad.size} non-finite value(s))"
        )
    bad = np.flatnonzero(v_arr <= 0.0)
    if bad.size:
        raise MetaAnalysisError(
            f"v must be positive sampling variances; v[{bad[0]}] = {v_arr[bad[0]]} "
            f"({bad.size} value(s) <= 0)"
        )
    return y_arr, v_arr


def _check_choice(value: Any, choices: tuple[str, ...], name: str, *, upper: bool = False) -> str:
    if isinstance(value, str):
        normalised = value.upper() if upper else value.lower()
        if normalised in choices:
            return normalised
    hint = " (for the fixed-effect model use fixed_effect())" if value in ("FE", "EE") else ""
    raise MetaAnalysisError(f"{name} must be one of {', '.join(choices)}; got {value!r}{hint}")


def check_level(level: Any) -> float:
    try:
        value = float(level)
    except (TypeError, ValueError) as err:
        raise MetaAnalysisError(f"level must be a number in (0, 1); got {level!r}") from err
    if not 0.0 < value < 1.0:
        raise MetaAnalysisError(
            f"level must be a confidence level in (0, 1), e.g. 0.95; got {level!r}"
        )
    return value
