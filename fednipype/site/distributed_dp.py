"""The noise share of a ``distributed-dp`` answer, drawn by OpenDP's discrete Gaussian sampler.

The calibration and accounting are public arithmetic
(:mod:`fednipype.contract.distributed_dp`); the draw happens here, at the site, only against
the ledger charge that pays for it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fednipype.contract.distributed_dp import DistributedNoise
from fednipype.exceptions import PolicyError
from fednipype.site import opendp_parts as dp
from fednipype.site.spend import Spend

__all__ = ["draw_discrete_gaussian", "integer_gaussian"]

dp.enable_features("contrib")


def draw_discrete_gaussian(
    spend: Spend, rounded: np.ndarray, noise: DistributedNoise
) -> np.ndarray:
    """``rounded`` plus independent N_ℤ(0, σ_site²) per coordinate, drawn by OpenDP.

    ``make_gaussian`` over a vector of 64-bit integers (``atom_domain(T="i64")``: the grid's
    integers exceed 32 bits) with the L2 distance samples the discrete Gaussian exactly
    (Canonne, Kamath & Steinke 2020) from the operating system's randomness; it cannot be
    seeded. Drawn only against the open ledger charge that pays for it.

    Parameters
    ----------
    spend : Spend
        The open reservation (:meth:`PrivacyLedger.reserve
        <fednipype.site.ledger.PrivacyLedger.reserve>`); it must cover ``noise``'s (ε, δ).
    rounded : ndarray of int
        The site's vector on the grid.
    noise : DistributedNoise
        The calibrated noise.

    Returns
    -------
    ndarray of int64

    Raises
    ------
    PrivacyBudgetExceeded
        ``spend`` is closed or does not cover (ε, δ): nothing is drawn.
    """
    if not isinstance(spend, Spend):
        raise PolicyError("distributed-dp: the noise needs the ledger reservation that pays it")
    spend.consume(noise.epsilon, noise.delta, "distributed discrete Gaussian share")
    measurement = integer_gaussian(noise.sigma_site)
    return np.asarray(measurement([int(v) for v in np.asarray(rounded)]), dtype=np.int64)


@functools.lru_cache(maxsize=64)
def integer_gaussian(scale: float) -> Any:
    """OpenDP's discrete Gaussian on 64-bit integer vectors (L2 distance) with σ ``scale``."""
    domain = dp.vector_domain(dp.atom_domain(T="i64"))
    return dp.m.make_gaussian(domain, dp.l2_distance(T="i64"), scale=float(scale))
