"""The secure-sum vector of a federated request: its layout, sensitivity, noise and grid.

Every site answers a request (:class:`~fednipype.contract.request.AnalysisRequest`) with one
vector of the same length; secure aggregation adds the vectors up, so the hub only sees the
consortium's sum. Everything is in the request's scaled units (covariates and responses
mapped onto [-1, 1] by the public bounds, dummies coded ±1, as a release does).

Layout
------
With T the terms (intercept first), C = T without the intercept (c terms, of which the
±1-coded dummies U), R the regions (r) and K the sites, the vector is::

    [ slot 0 | slot 1 | … | slot K−1 | shared block ]

- slot k (``1 + c + r`` entries; only site k writes non-zero values there): n_k, then
  Σ z_c for c in C (the intercept row of Z_kᵀZ_k), then Σ y_r for r in R (the intercept
  row of Z_kᵀY_k). Keeping them per site lets the hub fit one intercept per site.
- shared block (every site adds its part; the sum is the consortium's): the upper triangle of
  ZᵀZ over C row by row (i <= j) without the diagonal of the dummies (a ±1 dummy squares to 1,
  so that entry is n, known from the slots), then ZᵀY over C × R (row-major), then yᵀy per
  region.

:meth:`SumLayout.site_vector` writes one site's noise-free statistics into that layout;
:meth:`SumLayout.split` cuts a (decoded) sum back into its pieces.

Sensitivity
-----------
Adding or removing one participant (z, y), |z_c| <= 1, |y_r| <= 1, changes site k's vector
by 1 (n_k), z_c, y_r (slot k), z_i z_j (i <= j, not a dummy's diagonal), z_c y_r and y_r²
(shared); nothing else. Each entry is a product of coordinates bounded by 1 in magnitude, so
the change's squared L2 norm is at most the number of entries a site writes, and equals it at
a corner (every |z_c| = |y_r| = 1)::

    Δ² = 1 + c + r + c(c+1)/2 − |U| + c·r + r.

It is :func:`~fednipype.contract.calibration.sufficient_statistics_sensitivity` of the
release's statistics: the site's entries are the release's vector in another order.

Noise of the sum (:meth:`SumLayout.noise_variance`)
---------------------------------------------------
With m contributing sites and per-site, per-coordinate noise sd σ (scaled units):

- ``exact``: no noise.
- ``dp``: each site adds N(0, σ²) to the entries it writes: σ² in its own slot, m σ² in the
  shared block (non-contributing slots are 0 and carry nothing).
- ``distributed-dp``: each site adds its share to every coordinate (all slots): m σ²
  everywhere (σ = the site's integer noise sd times the grid step).

Rounding to the grid is not counted as noise (its error is bounded, below).

Fixed-point grid (:class:`Grid`)
--------------------------------
A site sends ``round(x / step)`` as integers; the step is a power of two, so x / step is
exact in floating point and the decoded sum ``Σ ints · step`` is exact while |Σ ints| <
2⁵³. Every entry of one site is a sum over at most N = ``max_participants`` products of values
in [-1, 1], so |x| <= N; with noise of sd σ the site's integers are clipped at ``bound =
ceil((N + 20σ) / step)`` (a Gaussian beyond 20 σ has probability < 1e-88). The step is the
finest power of two with K · bound <= ``capacity`` (the largest magnitude the transport sums
exactly; 2⁵³ by default, the exact integers of a float64). Each summed entry then differs from
the plain sum by at most K · step / 2 (deterministic rounding, half a step per site), which is
required to be <= :data:`MAX_ABS_ERROR` = 1e-9 in scaled units: ≤ 1e-6 relative for any
summed statistic of magnitude ≥ 1e-3 (n itself is >= 1 and exact). Limits: with the default
capacity this holds for K · (N + 20σ) up to about 4.5e6 (e.g. K = 3 sites of up to 10⁶
participants without noise); larger requests are refused with a :class:`RequestError`.

Deterministic rounding of a vector of L2 sensitivity Δ moves each of the d coordinates a site
writes by less than one grid unit more, so on the grid the sensitivity is at most
Δ / step + √d (:meth:`Grid.sensitivity`); distributed-dp calibrates its discrete Gaussian on
that conservative bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednipype.contract.calibration import (
    analytic_gaussian_sigma,
    sufficient_statistics_sensitivity,
)
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import RequestError

__all__ = [
    "DEFAULT_CAPACITY",
    "MAX_ABS_ERROR",
    "Grid",
    "SumLayout",
    "SumParts",
    "dp_sigma",
]

#: Largest magnitude of a summed integer the transport carries exactly (float64 integers).
DEFAULT_CAPACITY = 2**53
#: Largest error of one summed entry (scaled units) the grid may introduce.
MAX_ABS_ERROR = 1e-9
#: Noise tail a site's integers leave room for, in noise standard deviations.
NOISE_TAIL = 20.0
#: Upper bound, as a multiple of the dp-mode σ, on one site's noise sd in distributed-dp
#: (its share σ_central/√(K−t) is below σ_central, which the zCDP conversion and the rounding
#: term keep within 1.5 σ_dp for the requests the checks admit; 4 leaves room).
DISTRIBUTED_NOISE_MARGIN = 4.0


@dataclass(frozen=True)
class SumParts:
    """A decoded sum cut into its pieces (scaled units).

    Attributes
    ----------
    n : ndarray, shape (K,)
        n_k per slot.
    z : ndarray, shape (K, c)
        Σ z_c per slot (intercept row of Z_kᵀZ_k without n).
    y : ndarray, shape (K, r)
        Σ y_r per slot (intercept row of Z_kᵀY_k).
    ztz : ndarray, shape (c, c)
        Summed ZᵀZ over the covariate terms, symmetric; the dummies' diagonal entries are 0
        here (they equal the summed n of the contributing sites, which the caller knows).
    zty : ndarray, shape (c, r)
        Summed ZᵀY over the covariate terms.
    yty : ndarray, shape (r,)
        Summed yᵀy per region.
    """

    n: np.ndarray
    z: np.ndarray
    y: np.ndarray
    ztz: np.ndarray
    zty: np.ndarray
    yty: np.ndarray


@dataclass(frozen=True)
class SumLayout:
    """Where each statistic sits in the secure-sum vector of a request (module docstring).

    Parameters
    ----------
    terms : tuple of str
        Design terms, the intercept first.
    regions : tuple of str
        Regions.
    sites : tuple of str
        Site labels in slot order.
    dummies : tuple of str
        The ±1-coded terms among ``terms[1:]`` (their ZᵀZ diagonal is n, not sent).
    """

    terms: tuple[str, ...]
    regions: tuple[str, ...]
    sites: tuple[str, ...]
    dummies: tuple[str, ...]

    @classmethod
    def from_request(cls, request: AnalysisRequest) -> SumLayout:
        """The layout of ``request``'s terms, regions and sites."""
        return cls(request.terms, request.regions, request.sites, request.dummies)

    # -- sizes -----------------------------------------------------------------------------

    @property
    def c(self) -> int:
        """Number of covariate terms (terms without the intercept)."""
        return len(self.terms) - 1

    @property
    def r(self) -> int:
        """Number of regions."""
        return len(self.regions)

    @property
    def k(self) -> int:
        """Number of slots (sites)."""
        return len(self.sites)

    @property
    def slot_size(self) -> int:
        """Entries of one site's slot: 1 + c + r."""
        return 1 + self.c + self.r

    @property
    def _upper(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (within C) of the shared upper-triangle entries, in order."""
        rows, cols = np.triu_indices(self.c)
        unit = np.isin(rows, [self.terms.index(d) - 1 for d in self.dummies])
        keep = ~((rows == cols) & unit)
        return rows[keep], cols[keep]

    @property
    def shared_size(self) -> int:
        """Entries of the shared block: c(c+1)/2 − |U| + c·r + r."""
        return len(self._upper[0]) + self.c * self.r + self.r

    @property
    def size(self) -> int:
        """Length of the vector: K slots and the shared block."""
        return self.k * self.slot_size + self.shared_size

    @property
    def site_dim(self) -> int:
        """Coordinates one site can make non-zero (its slot and the shared block)."""
        return self.slot_size + self.shared_size

    def slot_range(self, slot: int) -> slice:
        """The entries of ``slot``."""
        if not 0 <= slot < self.k:
            raise RequestError(f"slot {slot} is not one of the {self.k} slots")
        return slice(slot * self.slot_size, (slot + 1) * self.slot_size)

    @property
    def shared_range(self) -> slice:
        """The entries of the shared block."""
        return slice(self.k * self.slot_size, self.size)

    def labels(self) -> list[str]:
        """A name for every entry, e.g. ``slot:site-a:n``, ``ztz:age:age``, ``yty:L_P01``."""
        cov = self.terms[1:]
        out = []
        for site in self.sites:
            out += [f"slot:{site}:n"] + [f"slot:{site}:z:{t}" for t in cov]
            out += [f"slot:{site}:y:{reg}" for reg in self.regions]
        out += [f"ztz:{cov[i]}:{cov[j]}" for i, j in zip(*self._upper, strict=True)]
        out += [f"zty:{t}:{reg}" for t in cov for reg in self.regions]
        return out + [f"yty:{reg}" for reg in self.regions]

    # -- one site's vector and the sum -----------------------------------------------------

    def site_vector(self, stats: SufficientStatistics, slot: int) -> np.ndarray:
        """One site's float vector from its noise-free statistics (scaled units).

        Parameters
        ----------
        stats : SufficientStatistics
            The site's noise-free statistics over the layout's terms and regions, in the
            request's scaled units.
        slot : int
            The site's slot (:meth:`AnalysisRequest.slot`).

        Returns
        -------
        ndarray, shape (size,)
            Zero outside the site's slot and the shared block.
        """
        if tuple(stats.terms) != self.terms or tuple(stats.regions) != self.regions:
            raise RequestError(
                "site_vector: the statistics' terms/regions differ from the request's "
                f"({len(stats.terms)} terms, {len(stats.regions)} regions; expected "
                f"{len(self.terms)} and {len(self.regions)})"
            )
        if stats.noisy or stats.n_noise_var > 0:
            raise RequestError("site_vector: expects noise-free statistics (noise comes after)")
        out = np.zeros(self.size)
        out[self.slot_range(slot)] = np.concatenate([[stats.n], stats.ztz[0, 1:], stats.zty[0]])
        rows, cols = self._upper
        cov_ztz = stats.ztz[1:, 1:]
        out[self.shared_range] = np.concatenate(
            [cov_ztz[rows, cols], stats.zty[1:].ravel(), stats.yty]
        )
        return out

    def split(self, summed: Any) -> SumParts:
        """Cut a decoded sum (scaled units, length :attr:`size`) into its pieces."""
        vec = np.asarray(summed, dtype=float)
        if vec.shape != (self.size,):
            raise RequestError(
                f"split: expected a vector of {self.size} entries, got shape {vec.shape}"
            )
        if not np.isfinite(vec).all():
            raise RequestError("split: the summed vector holds NaN or infinite values")
        c, r = self.c, self.r
        slots = vec[: self.k * self.slot_size].reshape(self.k, self.slot_size)
        shared = vec[self.shared_range]
        rows, cols = self._upper
        ztz = np.zeros((c, c))
        ztz[rows, cols] = shared[: len(rows)]
        ztz[cols, rows] = shared[: len(rows)]
        start = len(rows)
        return SumParts(
            n=slots[:, 0].copy(),
            z=slots[:, 1 : 1 + c].copy(),
            y=slots[:, 1 + c :].copy(),
            ztz=ztz,
            zty=shared[start : start + c * r].reshape(c, r).copy(),
            yty=shared[start + c * r :].copy(),
        )

    # -- privacy ---------------------------------------------------------------------------

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one site's vector under add/remove of one participant."""
        p = len(self.terms)
        unit = [0, *(self.terms.index(d) for d in self.dummies)]
        z_bounds = ([1.0] + [-1.0] * (p - 1), [1.0] * p)
        y_bounds = ([-1.0] * self.r, [1.0] * self.r)
        return sufficient_statistics_sensitivity(z_bounds, y_bounds, unit)

    def noise_variance(
        self, mode: str, sigma_site: float, contributing: Sequence[int]
    ) -> np.ndarray:
        """Per-entry noise variance of the sum (scaled units).

        Parameters
        ----------
        mode : {"exact", "dp", "distributed-dp"}
        sigma_site : float
            One site's noise sd on one coordinate, in scaled units (0 in exact mode; in
            distributed-dp the integer sd times the grid step).
        contributing : sequence of int
            The slots whose sites are in the sum.

        Returns
        -------
        ndarray, shape (size,)
        """
        slots = sorted(set(int(s) for s in contributing))
        if any(not 0 <= s < self.k for s in slots):
            raise RequestError(
                f"noise_variance: contributing slots {slots} outside 0..{self.k - 1}"
            )
        m = len(slots)
        var = float(sigma_site) ** 2
        out = np.zeros(self.size)
        if mode == "exact":
            return out
        if mode == "distributed-dp":
            out[:] = m * var
            return out
        if mode != "dp":
            raise RequestError(f"noise_variance: unknown mode {mode!r}")
        for s in slots:
            out[self.slot_range(s)] = var
        out[self.shared_range] = m * var
        return out


def dp_sigma(request: AnalysisRequest) -> float:
    """σ (scaled units) of one site's Gaussian noise in ``dp`` mode: analytic Gaussian on Δ."""
    if request.epsilon is None or request.delta is None:
        raise RequestError(f"{request.source}: {request.mode} mode has no (epsilon, delta)")
    return analytic_gaussian_sigma(
        request.epsilon, request.delta, SumLayout.from_request(request).sensitivity
    )


@dataclass(frozen=True)
class Grid:
    """The fixed-point grid: values travel as integers ``round(x / step)``, |·| <= ``bound``.

    Parameters
    ----------
    step : float
        Grid spacing (scaled units), a power of two.
    bound : int
        Largest magnitude of an integer one site may send.
    """

    step: float
    bound: int

    def __post_init__(self) -> None:
        step = float(self.step)
        mantissa, _ = math.frexp(step) if step > 0 and math.isfinite(step) else (0.0, 0)
        if mantissa != 0.5:
            raise RequestError(f"Grid.step: expected a power of two > 0, got {self.step!r}")
        if isinstance(self.bound, bool) or not isinstance(self.bound, int | np.integer):
            raise RequestError(f"Grid.bound: expected an integer, got {self.bound!r}")
        if not 0 < int(self.bound) < 2**62:
            raise RequestError(f"Grid.bound: expected 0 < bound < 2**62, got {self.bound}")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "bound", int(self.bound))

    @classmethod
    def for_request(
        cls,
        request: AnalysisRequest,
        *,
        noise_sd: float | None = None,
        capacity: int = DEFAULT_CAPACITY,
    ) -> Grid:
        """The finest grid whose K-site sum fits ``capacity`` (module docstring).

        Parameters
        ----------
        request : AnalysisRequest
        noise_sd : float, optional
            Upper bound on one site's noise sd per coordinate (scaled units). By default it
            follows from the request alone, so hub and sites derive the same grid: 0 in exact
            mode, :func:`dp_sigma` in dp mode, :data:`DISTRIBUTED_NOISE_MARGIN` times it in
            distributed-dp.
        capacity : int
            Largest magnitude of a summed integer the transport carries exactly.

        Raises
        ------
        RequestError
            No grid is fine enough (K · step / 2 > :data:`MAX_ABS_ERROR`) within capacity.
        """
        if noise_sd is None:
            noise_sd = 0.0 if request.mode == "exact" else dp_sigma(request)
            if request.mode == "distributed-dp":
                noise_sd *= DISTRIBUTED_NOISE_MARGIN
        if not (math.isfinite(noise_sd) and noise_sd >= 0):
            raise RequestError(f"Grid.for_request: noise_sd must be >= 0, got {noise_sd!r}")
        k = request.k
        largest = float(request.max_participants) + NOISE_TAIL * noise_sd
        per_site = int(capacity) // k - 1
        exponent = math.ceil(math.log2(largest / per_site))
        while math.ceil(largest / 2.0**exponent) > per_site:
            exponent += 1
        step = 2.0**exponent
        if k * step / 2 > MAX_ABS_ERROR:
            raise RequestError(
                f"{request.source}: {k} sites x max_participants {request.max_participants} "
                f"(noise sd {noise_sd:.3g}) do not fit a grid of error <= {MAX_ABS_ERROR:g} "
                f"within the transport's {capacity:.3g}; lower max_participants"
            )
        return cls(step, math.ceil(largest / step))

    def encode(self, values: Any) -> np.ndarray:
        """``round(values / step)`` as int64, clipped to ±bound."""
        x = np.asarray(values, dtype=float)
        if not np.isfinite(x).all():
            raise RequestError("Grid.encode: values must be finite")
        return np.clip(np.rint(x / self.step), -self.bound, self.bound).astype(np.int64)

    def decode(self, integers: Any) -> np.ndarray:
        """Integers (one site's or a sum) back to scaled units."""
        ints = np.asarray(integers)
        if ints.dtype.kind not in "iu":
            raise RequestError(f"Grid.decode: expected integers, got {ints.dtype}")
        return ints.astype(np.float64) * self.step

    def max_error(self, k_sites: int) -> float:
        """Largest difference between a decoded sum of ``k_sites`` and the plain sum."""
        return k_sites * self.step / 2.0

    def sensitivity(self, l2: float, dim: int) -> float:
        """L2 sensitivity on the grid after deterministic rounding: Δ / step + √dim."""
        return float(l2) / self.step + math.sqrt(dim)
