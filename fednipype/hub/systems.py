"""Normal equations of the pooled regression, with the DP noise variance of every entry.

:class:`_Block` stacks the sites' sufficient statistics (and, when sites released in their
own units, their exact maps to common units); :class:`_System` holds the normal equations
A θ = B of a fit — each site's own, the summed one, or one with site intercepts and common
slopes — with the noise variance of each entry, which
:func:`fednipype.hub.regression.pooled_regression` carries into the standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import MetaAnalysisError

__all__: list[str] = []


def _units(items: list[tuple[Any, SufficientStatistics]], units: Any) -> Any:
    """``units`` as two (S, p) arrays in the order of ``items`` (None when not given)."""
    if units is None:
        return None
    p = len(items[0][1].terms)
    try:
        pairs = [units[label] for label, _ in items] if isinstance(units, Mapping) else units
        d = np.array([np.asarray(pair[0], dtype=float) for pair in pairs])
        e = np.array([np.asarray(pair[1], dtype=float) for pair in pairs])
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise MetaAnalysisError(f"units: expected (d, e) per site; {err}") from err
    if d.shape != (len(items), p) or e.shape != d.shape:
        raise MetaAnalysisError(f"units: expected (d, e) of {p} entries for each site")
    if not (np.all(np.isfinite(d)) and np.all(d > 0) and np.all(np.isfinite(e))):
        raise MetaAnalysisError("units: d must be finite and > 0, e finite")
    return d, e


@dataclass(frozen=True)
class _Block:
    """A stack of S sites' statistics (or S = 1 sum of sites) with their noise variances."""

    ztz: np.ndarray  # (S, p, p)
    zty: np.ndarray  # (S, p, R)
    yty: np.ndarray  # (S, R)
    n: np.ndarray  # (S,)
    ztz_var: np.ndarray  # (S,)
    zty_var: np.ndarray  # (S,)
    yty_var: np.ndarray  # (S,)
    tied: np.ndarray  # (p,) 1.0 where ZᵀZ's diagonal is n itself (shares n's noise)
    n_var: np.ndarray  # (S,) noise variance of n
    d: np.ndarray | None = None  # (S, p) column scale to common units (None: all 1)
    e: np.ndarray | None = None  # (S, p) column shift to common units (None: all 0)

    @property
    def same_units(self) -> bool:
        """Whether every site is in the common units already."""
        return self.d is None or bool(np.all(self.d == 1.0) and np.all(self.e == 0.0))

    @property
    def scale(self) -> np.ndarray:
        """(S, p) the columns' scale to common units."""
        return np.ones(self.ztz.shape[:2]) if self.d is None else self.d

    @property
    def shift(self) -> np.ndarray:
        """(S, p) the columns' shift to common units."""
        return np.zeros(self.ztz.shape[:2]) if self.e is None else self.e

    @classmethod
    def stack(
        cls, sites: list[SufficientStatistics], units: tuple[np.ndarray, np.ndarray] | None = None
    ) -> _Block:
        terms = sites[0].terms
        d, e = (None, None) if units is None else units
        if d is not None:
            tied = np.array([t in sites[0].n_terms for t in terms])
            if np.any(d[:, tied] != 1.0) or np.any(d[:, 0] != 1.0) or np.any(e[:, 0] != 0.0):
                raise MetaAnalysisError(
                    "units: the intercept and the terms whose ZᵀZ diagonal is n (±1 dummies) "
                    "cannot be rescaled"
                )
        return cls(
            ztz=np.stack([s.ztz for s in sites]),
            zty=np.stack([s.zty for s in sites]),
            yty=np.stack([s.yty for s in sites]),
            n=np.array([s.n for s in sites]),
            ztz_var=np.array([s.ztz_noise_var for s in sites]),
            zty_var=np.array([s.zty_noise_var for s in sites]),
            yty_var=np.array([s.yty_noise_var for s in sites]),
            tied=np.array([float(t in sites[0].n_terms) for t in terms]),
            n_var=np.array([s.n_noise_var for s in sites]),
            d=d,
            e=e,
        )

    def total(self) -> _Block:
        """The sum over sites (independent noise: the variances add up)."""
        return _Block(
            *(np.sum(x, axis=0, keepdims=True) for x in (self.ztz, self.zty, self.yty)),
            *(
                np.array([math.fsum(x)])
                for x in (self.n, self.ztz_var, self.zty_var, self.yty_var)
            ),
            tied=self.tied,
            n_var=np.array([math.fsum(self.n_var)]),
        )


@dataclass(frozen=True)
class _System:
    """S sets of normal equations A θ = B (R right-hand sides) with per-entry noise variances.

    ``a_var[s, i, j]`` is the variance of the noise in A[s, i, j]; the entries of the upper
    triangle (diagonal included) carry independent noise, mirrored to the lower triangle.
    Diagonal entries that are a released n itself (the intercept's, ±1-coded dummies') carry
    that n's noise instead: ``tied[s, k]`` marks (with 1.0) the diagonal entries sharing the
    k-th such noise, of variance ``tied_var[s, k]``; ``a_var`` is 0 there. ``b_var[s, i]``
    is the variance of the independent noise in each B[s, i, r], ``c_var[s]`` that in each
    c[s, r]. The reported terms are the rows of ``contrasts`` applied to θ.
    """

    a: np.ndarray  # (S, m, m)
    b: np.ndarray  # (S, m, R)
    c: np.ndarray  # (S, R)
    n: np.ndarray  # (S,)
    a_var: np.ndarray  # (S, m, m)
    b_var: np.ndarray  # (S, m)
    c_var: np.ndarray  # (S,)
    contrasts: np.ndarray  # (S, p, m)
    tied: np.ndarray  # (S, K, m)
    tied_var: np.ndarray  # (S, K)

    @classmethod
    def of(cls, block: _Block) -> _System:
        """Each block's own normal equations: equal noise variance in every entry, L = I.

        A block in its own units is rescaled to common units column by column (D ZᵀZ D,
        D ZᵀY, the noise variances by d_i² d_j²); its intercept is reported at the common
        centers (α − eᵀβ).
        """
        n_blocks, p, _ = block.ztz.shape
        d = block.scale
        outer = d[:, :, None] * d[:, None, :]
        a_var = block.ztz_var[:, None, None] * outer**2
        a_var[:, block.tied > 0, block.tied > 0] = 0.0
        contrasts = np.broadcast_to(np.eye(p), (n_blocks, p, p)).copy()
        contrasts[:, 0, 1:] = -block.shift[:, 1:]
        return cls(
            a=block.ztz * outer,
            b=block.zty * d[:, :, None],
            c=block.yty,
            n=block.n,
            a_var=a_var,
            b_var=block.zty_var[:, None] * d**2,
            c_var=block.yty_var,
            contrasts=contrasts,
            tied=np.broadcast_to(block.tied, (n_blocks, 1, p)),
            tied_var=block.n_var[:, None],
        )

    @classmethod
    def with_site_intercepts(cls, sites: _Block) -> _System:
        """One system θ = (α_1, …, α_K, β): site intercepts and common slopes.

        The reported intercept is Σ n_k α_k / Σ n_k; the slopes are reported as they are.
        """
        n_sites, p, _ = sites.ztz.shape
        m = n_sites + p - 1
        k = np.arange(n_sites)
        slopes = slice(n_sites, m)
        d = sites.scale  # (S, p): each site's columns in common units (1 when they are)
        outer = d[:, :, None] * d[:, None, :]
        ztz, zty = sites.ztz * outer, sites.zty * d[:, :, None]
        ztz_var = sites.ztz_var[:, None, None] * outer**2  # (S, p, p) per entry
        zty_var = sites.zty_var[:, None] * d**2  # (S, p)
        a = np.zeros((m, m))
        a[k, k] = ztz[:, 0, 0]
        a[k, slopes] = ztz[:, 0, 1:]
        a[slopes, k] = ztz[:, 0, 1:].T
        a[slopes, slopes] = ztz[:, 1:, 1:].sum(axis=0)
        b = np.concatenate([zty[:, 0, :], zty[:, 1:, :].sum(axis=0)])
        a_var = np.zeros((m, m))  # site k's intercept meets no other site's: no entry, no noise
        a_var[k, k] = ztz_var[:, 0, 0]
        a_var[k, slopes] = ztz_var[:, 0, 1:]
        a_var[slopes, k] = ztz_var[:, 0, 1:].T
        a_var[slopes, slopes] = ztz_var[:, 1:, 1:].sum(axis=0)
        b_var = np.concatenate([zty_var[:, 0], zty_var[:, 1:].sum(axis=0)])
        # Site k's n is its intercept's diagonal and, summed over sites, the tied slopes'.
        tied = np.zeros((n_sites, m))
        tied[k, k] = sites.tied[0]
        tied[:, slopes] = sites.tied[1:]
        diagonal = np.flatnonzero(tied.max(axis=0) > 0)
        a_var[diagonal, diagonal] = 0.0
        contrasts = np.zeros((p, m))
        weights = sites.n / math.fsum(sites.n)
        contrasts[0, k] = weights
        # the intercept at the common centers: Σ_k w_k (α_k − e_kᵀβ)
        contrasts[0, slopes] = -(weights @ sites.shift[:, 1:])
        contrasts[np.arange(1, p), slopes] = np.eye(p - 1)
        return cls(
            a=a[None],
            b=b[None],
            c=sites.yty.sum(axis=0, keepdims=True),
            n=np.array([math.fsum(sites.n)]),
            a_var=a_var[None],
            b_var=b_var[None],
            c_var=np.array([math.fsum(sites.yty_var)]),
            contrasts=contrasts[None],
            tied=tied[None],
            tied_var=sites.n_var[None],
        )

    @property
    def noisy(self) -> np.ndarray:
        a_noisy = (self.a_var.max(axis=(1, 2)) > 0.0) | (self.tied_var.max(axis=1) > 0.0)
        return a_noisy | (self.b_var.max(axis=1) > 0.0) | (self.c_var > 0.0)

    @property
    def diagonal_noise_var(self) -> np.ndarray:
        """Noise variance of each diagonal entry of A, independent or tied: (S, m)."""
        tied = np.einsum("sk,skm->sm", self.tied_var, self.tied**2)
        return np.diagonal(self.a_var, axis1=1, axis2=2) + tied
