"""A site's weighted model as one integer vector, summed exactly through SecAgg+ (FedAvg).

Round ``r`` of federated averaging needs ``Σ m_k w_k`` and ``Σ m_k`` over the sites ``k``
(``w_k`` the site's local parameters, ``m_k`` its weight: its training-row count, or its
noisy count under DP). Through SecAgg+ the hub learns only sums, so each site sends the
fixed-point integers

``v_k = round(2**f * [m_k * clip(w_k, -P, P) ..., clip(m_k, 0, M)])``

and the hub divides the summed vector's parameter part by its weight part. ``P`` (the
parameter bound) and ``M`` (the request's ``max_participants``) are public, so the largest
``|integer|`` one site sends is ``B = ceil(2**f * M * P)``, and ``f`` (the fraction bits) is
the largest number (at most :data:`MAX_FRACTION_BITS`) for which the sum of ``K`` sites,
``K B``, stays within what :class:`~fednipype.federated.transport.SecAggEncoding` carries
exactly (``2**53``). Every site derives the same ``f`` and ``B`` from the fit instructions.

The only error is the rounding: each entry of ``Σ v_k`` is off by at most ``K / 2`` units
of ``2**-f``, so the averaged parameters are off by at most :meth:`FixedPointCodec.tolerance`.

Why hand-written: Flower's SecAgg+ aggregates a weighted mean of floats after its own
quantisation, which loses the exact weights; fednipype carries exact integers
(:mod:`fednipype.federated.transport`) and this is FedAvg's fixed-point map onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednipype.exceptions import FederationError
from fednipype.federated.transport import MAX_SUM_BOUND, SecAggEncoding

__all__ = ["DEFAULT_PARAM_BOUND", "MAX_FRACTION_BITS", "MIN_FRACTION_BITS", "FixedPointCodec"]

#: Default public bound on every parameter (scaled units: features and label in [0, 1]).
DEFAULT_PARAM_BOUND = 1000.0
#: More fraction bits than this buy nothing in float64.
MAX_FRACTION_BITS = 40
#: Fewer than this would make the rounding visible in the model.
MIN_FRACTION_BITS = 12


@dataclass(frozen=True)
class FixedPointCodec:
    """The fixed-point map of ``(w_k, m_k)`` to integers and back.

    Parameters
    ----------
    n_params : int
        Length of ``w`` (``d + 1``: intercept and one coefficient per feature).
    weight_bound : float
        ``M``: the largest weight a site may have (the request's ``max_participants``).
    param_bound : float
        ``P``: every parameter is clipped to ``[-P, P]`` before it is sent.
    n_sites : int
        ``K``: the request's sites.
    fraction_bits : int
        ``f``.

    Examples
    --------
    >>> codec = FixedPointCodec.for_request(3, weight_bound=1000, param_bound=1000, n_sites=3)
    >>> codec.fraction_bits
    30
    >>> total = codec.encode(np.array([0.5, -1.0, 2.0]), 10) + codec.encode(np.zeros(3), 30)
    >>> codec.average(total).tolist(), codec.total_weight(total)
    ([0.125, -0.25, 0.5], 40.0)
    """

    n_params: int
    weight_bound: float
    param_bound: float
    n_sites: int
    fraction_bits: int

    @classmethod
    def for_request(
        cls, n_params: int, *, weight_bound: float, param_bound: float, n_sites: int
    ) -> FixedPointCodec:
        """The codec with the most fraction bits the sum of ``n_sites`` sites allows.

        Raises
        ------
        FederationError
            When the bounds leave fewer than :data:`MIN_FRACTION_BITS` fraction bits.
        """
        if n_params < 1 or n_sites < 1:
            raise FederationError(
                f"training codec: expected >= 1 parameter and site, got {n_params}, {n_sites}"
            )
        if not (weight_bound >= 1 and param_bound > 0) or not math.isfinite(
            weight_bound * param_bound
        ):
            raise FederationError(
                f"training codec: expected weight bound >= 1 and parameter bound > 0, got "
                f"{weight_bound!r} and {param_bound!r}"
            )
        room = MAX_SUM_BOUND / (n_sites * weight_bound * max(param_bound, 1.0))
        bits = min(MAX_FRACTION_BITS, math.floor(math.log2(room)) - 1)
        if bits < MIN_FRACTION_BITS:
            raise FederationError(
                f"training codec: {n_sites} sites x max_participants {weight_bound:g} x "
                f"param-bound {param_bound:g} leave {bits} fraction bits (need >= "
                f"{MIN_FRACTION_BITS}); lower param-bound"
            )
        return cls(int(n_params), float(weight_bound), float(param_bound), int(n_sites), bits)

    @property
    def scale(self) -> float:
        """``2**f``."""
        return float(2**self.fraction_bits)

    @property
    def site_bound(self) -> int:
        """``B``: the largest ``|integer|`` one site sends."""
        return math.ceil(self.scale * self.weight_bound * max(self.param_bound, 1.0))

    def encoding(self) -> SecAggEncoding:
        """The transport's encoding for ``B`` and ``K``."""
        return SecAggEncoding.for_bound(self.site_bound, n_sites=self.n_sites)

    def encode(self, w: np.ndarray, weight: float) -> np.ndarray:
        """The site's integer vector ``round(2**f [m clip(w) ..., m])`` (int64, ``d + 2``).

        Raises
        ------
        FederationError
            When ``w`` has the wrong length or a non-finite entry, or the weight is not a
            finite number > 0.
        """
        arr = np.asarray(w, dtype=np.float64).reshape(-1)
        if arr.size != self.n_params or not np.all(np.isfinite(arr)):
            raise FederationError(
                f"training codec: expected {self.n_params} finite parameters, got "
                f"{arr.size} ({int(np.sum(~np.isfinite(arr)))} not finite)"
            )
        m = float(weight)
        if not (math.isfinite(m) and m > 0):
            raise FederationError(f"training codec: expected a weight > 0, got {weight!r}")
        m = min(m, self.weight_bound)
        clipped = np.clip(arr, -self.param_bound, self.param_bound)
        vector = np.rint(np.append(m * clipped, m) * self.scale).astype(np.int64)
        return np.clip(vector, -self.site_bound, self.site_bound)

    def _checked(self, total: np.ndarray) -> np.ndarray:
        arr = np.asarray(total, dtype=np.int64).reshape(-1)
        if arr.size != self.n_params + 1:
            raise FederationError(
                f"training codec: expected a sum of {self.n_params + 1} integers, got {arr.size}"
            )
        if arr[-1] <= 0:
            raise FederationError("training codec: the summed weight is not positive")
        return arr

    def total_weight(self, total: np.ndarray) -> float:
        """``Σ m_k`` of a summed vector."""
        return float(self._checked(total)[-1]) / self.scale

    def weighted_sum(self, total: np.ndarray) -> np.ndarray:
        """``Σ m_k w_k`` of a summed vector."""
        return self._checked(total)[:-1].astype(np.float64) / self.scale

    def average(self, total: np.ndarray) -> np.ndarray:
        """``Σ m_k w_k / Σ m_k`` (the ratio of the integers: the scale cancels)."""
        arr = self._checked(total)
        return arr[:-1].astype(np.float64) / float(arr[-1])

    def tolerance(self, total_weight: float, largest: float) -> float:
        """The largest error of :meth:`average` from the rounding (``K`` sites).

        Each summed entry is within ``K / 2`` units of ``2**-f``; the ratio's error is
        ``(K / 2) 2**-f (1 + |w|) / Σ m`` to first order (doubled for safety).
        """
        return self.n_sites * (1.0 + abs(largest)) / (self.scale * max(total_weight, 1e-300))

    def config(self) -> dict[str, Any]:
        """What the fit instructions tell a site (it derives the same codec from it)."""
        return {
            "n-params": self.n_params,
            "weight-bound": self.weight_bound,
            "param-bound": self.param_bound,
            "fraction-bits": self.fraction_bits,
            **self.encoding().config(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FixedPointCodec:
        """The codec a site reads from its fit instructions (see :meth:`config`).

        Raises
        ------
        FederationError
            When a key is missing or the hub's values are not the derived ones.
        """
        keys = ("n-params", "weight-bound", "param-bound", "fraction-bits", "sites")
        for key in keys:
            if key not in config:
                raise FederationError(f"fit config: expected the key '{key}'")
        codec = cls.for_request(
            int(config["n-params"]),
            weight_bound=float(config["weight-bound"]),
            param_bound=float(config["param-bound"]),
            n_sites=int(config["sites"]),
        )
        if int(config["fraction-bits"]) != codec.fraction_bits:
            raise FederationError(
                f"fit config: fraction-bits expected {codec.fraction_bits}, got "
                f"{config['fraction-bits']}"
            )
        encoding = SecAggEncoding.from_config(config)
        if encoding != codec.encoding():
            raise FederationError("fit config: site-bound differs from the codec's")
        return codec
