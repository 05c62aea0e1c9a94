"""The sufficient statistics of a linear model: the one type site, release and hub share.

A site computes them (noisy) from its design matrix, the release document carries them
(``statistics/sufficient_statistics``) and the hub sums them into the pooled regression.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednipype.exceptions import MetaAnalysisError

__all__ = ["SufficientStatistics"]


@dataclass(frozen=True, eq=False)
class SufficientStatistics:
    """One site's sufficient statistics of the linear models Y[:, r] = Z β_r + ε (r = regions).

    Attributes
    ----------
    terms : tuple of str
        Names of the columns of Z; the first is ``"intercept"``.
    regions : tuple of str
        Names of the outcome columns of Y.
    ztz : ndarray, shape (p, p)
        ZᵀZ (symmetric).
    zty : ndarray, shape (p, R)
        ZᵀY.
    yty : ndarray, shape (R,)
        The diagonal of YᵀY: Σ y_r² per region.
    n : float
        Number of rows (subjects). May be a noisy value such as ``ztz[0, 0]``.
    ztz_noise_var : float
        Variance of the independent Gaussian noise added to each entry of the upper triangle of
        ZᵀZ (diagonal included), mirrored to the lower triangle. 0.0 for noise-free statistics.
    zty_noise_var, yty_noise_var : float
        Variance of the independent Gaussian noise added to each entry of ZᵀY and of yᵀy.
    n_noise_var : float
        Variance of the noise on ``n`` (0.0 when ``n`` is exact).
    n_terms : tuple of str
        Terms whose ZᵀZ diagonal entry is n itself (the intercept and ±1-coded dummies, whose
        squares are 1 for everyone): the release carries n once, these entries equal it and
        share its noise (not independent noise of ``ztz_noise_var``).

    Notes
    -----
    Arrays are copied to read-only float arrays; a malformed field raises
    :class:`~fednipype.exceptions.MetaAnalysisError` naming it.
    """

    terms: tuple[str, ...]
    regions: tuple[str, ...]
    ztz: np.ndarray
    zty: np.ndarray
    yty: np.ndarray
    n: float
    ztz_noise_var: float = 0.0
    zty_noise_var: float = 0.0
    yty_noise_var: float = 0.0
    n_noise_var: float = 0.0
    n_terms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        terms = _check_names(self.terms, "terms")
        if terms[0] != "intercept":
            raise MetaAnalysisError(
                f"SufficientStatistics.terms must start with 'intercept'; got {terms!r}"
            )
        regions = _check_names(self.regions, "regions")
        p, r = len(terms), len(regions)
        ztz = _frozen_array(self.ztz, "ztz", (p, p), f"{p}x{p}, one row and column per term")
        scale = float(np.abs(ztz).max())
        if not np.allclose(ztz, ztz.T, rtol=0.0, atol=1e-10 * max(scale, 1.0)):
            raise MetaAnalysisError("SufficientStatistics.ztz must be symmetric (ZᵀZ)")
        ztz = _read_only((ztz + ztz.T) / 2.0)
        zty = _frozen_array(
            self.zty, "zty", (p, r), f"{p}x{r}, one row per term, column per region"
        )
        yty = _frozen_array(self.yty, "yty", (r,), f"length {r}, one value per region")
        # A noisy n may be small or negative at small ε; the hub decides what it can solve.
        n = _finite_number(self.n, "n")
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "ztz", ztz)
        object.__setattr__(self, "zty", zty)
        object.__setattr__(self, "yty", yty)
        object.__setattr__(self, "n", n)
        n_terms = tuple(self.n_terms)
        unknown = [t for t in n_terms if t not in terms]
        if unknown:
            raise MetaAnalysisError(f"SufficientStatistics.n_terms {unknown!r} are not terms")
        # As released, their diagonal equals n (the contract checks it); the hub may raise a
        # noisy n afterwards (post-processing for degrees of freedom) and keep the diagonal.
        object.__setattr__(self, "n_terms", n_terms)
        for name in ("ztz_noise_var", "zty_noise_var", "yty_noise_var", "n_noise_var"):
            value = _finite_number(getattr(self, name), name)
            if value < 0:
                raise MetaAnalysisError(
                    f"SufficientStatistics.{name} must be a variance >= 0; got {value!r}"
                )
            object.__setattr__(self, name, value)

    @property
    def noisy(self) -> bool:
        """Whether any block carries DP noise."""
        return (self.ztz_noise_var + self.zty_noise_var + self.yty_noise_var) > 0.0

    def to_document(self) -> dict[str, Any]:
        """The statistics as the release document writes them (JSON-ready built-in types).

        Returns
        -------
        dict
            ``terms``, ``regions``, ``ztz``, ``zty``, ``yty``, ``n`` and ``noise_variances``
            (``n``, ``ztz``, ``zty``, ``yty``): the data part of
            ``statistics/sufficient_statistics``; the site adds the mechanism and the scaling.
        """
        return {
            "terms": list(self.terms),
            "regions": list(self.regions),
            "ztz": self.ztz.tolist(),
            "zty": self.zty.tolist(),
            "yty": self.yty.tolist(),
            "n": float(self.n),
            "n_terms": list(self.n_terms),
            "noise_variances": {
                "n": self.n_noise_var,
                "ztz": self.ztz_noise_var,
                "zty": self.zty_noise_var,
                "yty": self.yty_noise_var,
            },
        }

    @classmethod
    def from_document(cls, block: Mapping[str, Any]) -> SufficientStatistics:
        """Read ``statistics/sufficient_statistics`` of a validated release.

        Parameters
        ----------
        block : Mapping
            The block, as :meth:`to_document` writes it.

        Returns
        -------
        SufficientStatistics
        """
        noise = block["noise_variances"]
        return cls(
            terms=tuple(block["terms"]),
            regions=tuple(block["regions"]),
            ztz=block["ztz"],
            zty=block["zty"],
            yty=block["yty"],
            n=block["n"],
            ztz_noise_var=noise["ztz"],
            zty_noise_var=noise["zty"],
            yty_noise_var=noise["yty"],
            n_noise_var=noise["n"],
            n_terms=tuple(block.get("n_terms", ())),
        )

    def with_n(self, n: float) -> SufficientStatistics:
        """A copy with another ``n`` (post-processing of a released count)."""
        return dataclasses.replace(self, n=n)


def _check_names(names: Any, field: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise MetaAnalysisError(
            f"SufficientStatistics.{field} must be a sequence of names; got {names!r}"
        )
    out = tuple(names)
    if not out or not all(isinstance(x, str) and x for x in out):
        raise MetaAnalysisError(
            f"SufficientStatistics.{field} must be a non-empty sequence of non-empty strings; "
            f"got {out!r}"
        )
    if len(set(out)) != len(out):
        raise MetaAnalysisError(f"SufficientStatistics.{field} has duplicate names: {out!r}")
    return out


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _frozen_array(value: Any, field: str, shape: tuple[int, ...], expected: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise MetaAnalysisError(f"SufficientStatistics.{field} must be numeric") from err
    if arr.shape != shape:
        raise MetaAnalysisError(
            f"SufficientStatistics.{field} must have shape {expected}; got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise MetaAnalysisError(f"SufficientStatistics.{field} contains NaN or inf")
    return _read_only(arr)


def _finite_number(value: Any, field: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise MetaAnalysisError(
            f"SufficientStatistics.{field} must be a number; got {value!r}"
        ) from err
    if not math.isfinite(out):
        raise MetaAnalysisError(f"SufficientStatistics.{field} must be finite; got {value!r}")
    return out
