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
from typing import TYPE_CHECKING, Any

import numpy as np

from fednipype.exceptions import FederationError
from fednipype.federated.transport import MAX_SUM_BOUND, SecAggEncoding

if TYPE_CHECKING:
    from fednipype.contract.training import TrainingRequest

__all__ = [
    "DEFAULT_PARAM_BOUND",
    "MAX_FRACTION_BITS",
    "MIN_FRACTION_BITS",
    "WEIGHT_FRACTION_BITS",
    "FixedPointCodec",
    "GradientCodec",
    "codec_for_request",
]

#: Default public bound on every parameter (scaled units: features and label in [0, 1]).
DEFAULT_PARAM_BOUND = 1000.0
#: More fraction bits than this buy nothing in float64.
MAX_FRACTION_BITS = 40
#: Fewer than this would make the rounding visible in the model.
MIN_FRACTION_BITS = 12


class _IntegerCodec:
    """What both codecs share: the transport's encoding and the check of a summed vector."""

    n_params: int
    n_sites: int

    @property
    def site_bound(self) -> int:  # pragma: no cover - each codec defines its own
        raise NotImplementedError

    def encoding(self) -> SecAggEncoding:
        """The transport's encoding for the site bound and ``K``."""
        return SecAggEncoding.for_bound(self.site_bound, n_sites=self.n_sites)

    def _checked(self, total: np.ndarray) -> np.ndarray:
        arr = np.asarray(total, dtype=np.int64).reshape(-1)
        if arr.size != self.n_params + 1:
            raise FederationError(
                f"training codec: expected a sum of {self.n_params + 1} integers, got {arr.size}"
            )
        if arr[-1] <= 0:
            raise FederationError("training codec: the summed weight is not positive")
        return arr


@dataclass(frozen=True)
class FixedPointCodec(_IntegerCodec):
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

    def total_weight(self, total: np.ndarray) -> float:
        """``Σ m_k`` of a summed vector."""
        return float(self._checked(total)[-1]) / self.scale

    def step(self, w: np.ndarray, total: np.ndarray) -> np.ndarray:
        """The hub's new parameters from a round's sum: the FedAvg :meth:`average`."""
        return self.average(total)

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
        if config.get("codec", "fedavg") != "fedavg":
            raise FederationError(f"fit config: codec expected 'fedavg', got {config['codec']!r}")
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


#: Fraction bits of a site's weight (its noisy count) in a ``distributed-dp`` round.
WEIGHT_FRACTION_BITS = 20
#: Standard deviations of a site's share kept before its integers are clipped (exp(-200)).
_TAIL_SDS = 20


@dataclass(frozen=True)
class GradientCodec(_IntegerCodec):
    """A ``distributed-dp`` round's integers: each site's noisy gradient sum and its weight.

    A site sends ``[share ..., round(2**20 · clip(m_k, 0, M))]``: ``share`` is its clipped
    gradient sum on the request's grid plus its discrete Gaussian
    (:func:`fednipype.site.dpsgd.discrete_gaussian_share`), clipped to ``±B_g`` with
    ``B_g = M · 2**16 + 1 + 20 σ_site`` (``M`` participants of gradient norm ``clip`` move a
    coordinate by at most ``M · 2**16`` grid units; clipping the noise 20 sd out is
    post-processing that happens with probability below e⁻²⁰⁰). SecAgg+ sums the vectors
    exactly; the hub reads ``Σ g_k`` and ``Σ m_k`` and takes the FedSGD step
    (:func:`fednipype.learn.fedavg.fedsgd_step`). All of it derives from the request.

    Parameters
    ----------
    n_params : int
        Gradient coordinates.
    weight_bound : float
        ``M``: the request's ``max_participants``.
    n_sites : int
        ``K``.
    grid_step : float
        Gradient units per integer.
    share_bound : int
        ``B_g``.
    learning_rate, l2 : float
        The request's, for the hub's step.
    """

    n_params: int
    weight_bound: float
    n_sites: int
    grid_step: float
    share_bound: int
    learning_rate: float
    l2: float

    @classmethod
    def for_request(cls, request: TrainingRequest) -> GradientCodec:
        """The codec of a ``distributed-dp`` request.

        Raises
        ------
        FederationError
            Not a ``distributed-dp`` request, or ``K`` sites' integers do not fit the transport.
        """
        noise = request.distributed_noise()
        if noise is None:
            raise FederationError(
                f"training codec: the gradient codec is for distributed-dp, not {request.mode}"
            )
        per_participant = round(request.clip / noise.grid_step)  # 2**16: a power of two
        tail = math.ceil(_TAIL_SDS * noise.sigma_site)
        bound = request.max_participants * per_participant + 1 + tail
        codec = cls(
            len(request.regions) + 1,
            float(request.max_participants),
            request.k,
            noise.grid_step,
            int(bound),
            request.learning_rate,
            request.l2,
        )
        if request.k * codec.site_bound > MAX_SUM_BOUND:
            raise FederationError(
                f"training codec: {request.k} sites x {codec.site_bound} exceed the transport's "
                f"{MAX_SUM_BOUND}; fewer sites or a smaller max_participants"
            )
        return codec

    @property
    def weight_scale(self) -> float:
        """``2**WEIGHT_FRACTION_BITS``."""
        return float(2**WEIGHT_FRACTION_BITS)

    @property
    def site_bound(self) -> int:
        """The largest ``|integer|`` one site sends."""
        return max(self.share_bound, math.ceil(self.weight_scale * self.weight_bound))

    def encode(self, share: np.ndarray, weight: float) -> np.ndarray:
        """``[clip(share, ±B_g) ..., round(2**20 clip(m, 0, M))]`` (int64, ``d + 2``).

        Raises
        ------
        FederationError
            A share of the wrong length or not integer, or a weight that is not > 0.
        """
        arr = np.asarray(share).reshape(-1)
        if arr.size != self.n_params or arr.dtype.kind not in "iu":
            raise FederationError(
                f"training codec: expected {self.n_params} integers, got {arr.size} of {arr.dtype}"
            )
        m = float(weight)
        if not (math.isfinite(m) and m > 0):
            raise FederationError(f"training codec: expected a weight > 0, got {weight!r}")
        clipped = np.clip(arr.astype(np.int64), -self.share_bound, self.share_bound)
        scaled = round(min(m, self.weight_bound) * self.weight_scale)
        return np.append(clipped, np.int64(scaled)).astype(np.int64)

    def gradient_sum(self, total: np.ndarray) -> np.ndarray:
        """``Σ g_k`` (noisy; gradient units) of a summed vector."""
        return self._checked(total)[:-1].astype(np.float64) * self.grid_step

    def total_weight(self, total: np.ndarray) -> float:
        """``Σ m_k`` of a summed vector."""
        return float(self._checked(total)[-1]) / self.weight_scale

    def step(self, w: np.ndarray, total: np.ndarray) -> np.ndarray:
        """The hub's FedSGD step from ``w`` with a round's sum."""
        # Imported here: the codec is also the site's, whose client app avoids the import.
        from fednipype.learn.fedavg import fedsgd_step

        return fedsgd_step(
            w,
            self.gradient_sum(total),
            self.total_weight(total),
            learning_rate=self.learning_rate,
            l2=self.l2,
        )

    def config(self) -> dict[str, Any]:
        """What the fit instructions tell a site (it derives the same codec from the request)."""
        return {
            "codec": "gradient",
            "n-params": self.n_params,
            "weight-bound": self.weight_bound,
            "grid-step": self.grid_step,
            "share-bound": self.share_bound,
            **self.encoding().config(),
        }

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse fit instructions whose codec is not this one (derived from the request).

        Raises
        ------
        FederationError
            A key missing or a value other than the derived one.
        """
        mine = self.config()
        for key, value in mine.items():
            if key not in config:
                raise FederationError(f"fit config: expected the key '{key}'")
            if config[key] != value:
                raise FederationError(f"fit config: {key} expected {value!r}, got {config[key]!r}")


def codec_for_request(
    request: TrainingRequest, *, param_bound: float = DEFAULT_PARAM_BOUND
) -> FixedPointCodec | GradientCodec:
    """The codec of a request's rounds: FedSGD sums in ``distributed-dp``, FedAvg otherwise."""
    if request.distributed:
        return GradientCodec.for_request(request)
    return FixedPointCodec.for_request(
        len(request.regions) + 1,
        weight_bound=float(request.max_participants),
        param_bound=param_bound,
        n_sites=request.k,
    )
