"""Integer vectors carried exactly through Flower's SecAgg+ (quantise, mask, sum mod m).

Flower 1.42's SecAgg+ (``secaggplus_mod`` on the client, ``SecAggPlusWorkflow`` on the
server) sums float vectors after a fixed-point quantisation. This module chooses the
workflow's parameters and the client's float representation so that an integer vector
goes through that pipeline unchanged, and undoes the workflow's averaging on the server.

What Flower does (read from ``flwr/client/mod/secure_aggregation/secaggplus_mod.py``,
``flwr/common/secure_aggregation/quantization.py`` and
``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``), for a client that
returns the float vector ``x`` with weight ``w = num_examples``; ``c`` is
``clipping_range``, ``Q`` is ``quantization_range``, ``m`` is ``modulus_range`` and ``M``
is ``max_weight``:

1. ``r = round(w / M * Q)`` (the client's quantised weight), ``x' = x * (r / Q)``;
2. ``q = stochastic_round((clip(x', -c, c) + c) * Q / (2 c))``, cast to ``int32``;
3. the vector ``[r, q]`` is masked and summed modulo ``m`` over the ``n`` surviving
   clients: the server unmasks ``S = Σ q mod m`` and ``R = Σ r mod m``;
4. the server hands ``(S * 2c / Q - n c) * Q / R`` to ``Strategy.aggregate_fit``.

The choices that make it exact for an integer ``d`` with ``|d| <= D`` (one "limb", below):

- ``Q = 2 c`` with ``c`` a power of two and ``c > D``: the quantiser ``Q / 2c`` is exactly
  1, so ``q = d + c``: an integer, which stochastic rounding leaves alone (it rounds down
  only with probability ``ceil(a) - a = 0``), and ``d + c <= 2c - 1 < 2**31`` fits the
  ``int32`` cast when ``c <= 2**30``;
- ``w = 1`` and ``M = Q``: ``r = round(Q / Q) = 1``, so ``r / Q = 2**-k`` is exact and the
  client sends ``x = d * Q`` (exact in float64). ``R = n`` never wraps modulo ``m``,
  whereas ``w = M`` (``r = Q``) would make ``R = n Q`` wrap for ``n Q >= m``. Every site
  sending ``w = 1`` also keeps the plain ``num_examples`` field free of data;
- the server's float is ``(S - n c) Q / n``; multiplied by ``n / Q`` it is the integer
  ``S - n c`` up to a relative rounding error below ``2**-50``, so rounding recovers it;
- ``S`` was reduced modulo ``m``, so ``S - n c ≡ Σ d (mod m)``; with ``|Σ d| <= K D`` and
  ``2 K D < m`` the centred residue is ``Σ d`` itself.

With Flower's documented bound ``m <= 2**32`` (``modulus_range`` "must be less than
4294967296"; its default ``2**32`` is used here) one coordinate carries ``D <= 2**30 - 1``
(the ``int32`` cast) and ``K D <= 2**31 - 1``. Larger integers are split into limbs: with
``s`` the largest bit width such that ``K (2**s - 1) <= 2**31 - 1``, a site's ``v`` is sent
as its ``L`` base-``2**s`` digits ``v = Σ_j d_j 2**(s j)`` (``0 <= d_j < 2**s`` for
``j < L - 1``, the top digit signed), each digit a coordinate of its own; the server
recombines the exactly summed digits, ``Σ v = Σ_j (Σ d_j) 2**(s j)``. One site's bound
``B`` and the sum's ``K B`` may then reach :data:`MAX_SUM_BOUND` ``= 2**53`` (the integers a
float64 holds exactly, which the hub's decoding ``Σ ints * step`` needs). The vector grows
``L``-fold (``L = 2`` up to ``K B`` about ``2**61 / K``). Flower logs a warning that
``num_shares > m / Q`` "will potentially cause overflow": the wrap it warns about is the one
undone here.

Why hand-written: Flower exposes only float aggregation (a weighted mean); no Flower
function carries integers exactly, so the parameter choice and the inverse map live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fednipype.exceptions import FederationError

__all__ = [
    "FIT_NUM_EXAMPLES",
    "MAX_COORDINATE_BOUND",
    "MAX_SUM_BOUND",
    "MODULUS_RANGE",
    "SecAggEncoding",
]

#: Flower's largest documented ``modulus_range`` (its default).
MODULUS_RANGE = 2**32
#: Largest ``|integer|`` in one coordinate: ``d + c`` must fit ``int32`` with ``c > |d|``.
MAX_COORDINATE_BOUND = 2**30 - 1
#: Largest ``K * D`` one coordinate's sum carries (its centred residue modulo ``2**32``).
_MAX_COORDINATE_SUM = MODULUS_RANGE // 2 - 1
#: Largest ``K * B`` carried exactly (limbs): the integers float64 holds exactly.
MAX_SUM_BOUND = 2**53
#: The ``num_examples`` every site reports with its vector (see the module docstring).
FIT_NUM_EXAMPLES = 1


@dataclass(frozen=True)
class SecAggEncoding:
    """SecAgg+ parameters that carry ``K`` sites' integers ``|v| <= site_bound`` exactly.

    Parameters
    ----------
    site_bound : int
        ``B``: the largest ``|integer|`` one site may send (public, from the request).
    n_sites : int
        ``K``: the most sites whose vectors are summed (the request's sites).
    limb_bits : int
        ``s``: bits of a lower digit (``0`` when one limb carries ``B`` whole).
    limbs : int
        ``L``: coordinates per integer.
    clipping_range : float
        ``c``: the smallest power of two above the largest ``|digit|``.
    quantization_range : int
        ``Q = 2 c``.

    Examples
    --------
    >>> enc = SecAggEncoding.for_bound(1000, n_sites=3)
    >>> enc.limbs, enc.clipping_range, enc.quantization_range
    (1, 1024.0, 2048)
    >>> enc.decode(np.array([6.0 * 2048 / 3]), n_contributors=3).tolist()
    [6]
    >>> SecAggEncoding.for_bound(2**40, n_sites=3).limbs
    2
    """

    site_bound: int
    n_sites: int
    limb_bits: int
    limbs: int
    clipping_range: float
    quantization_range: int

    @classmethod
    def for_bound(cls, site_bound: int, *, n_sites: int) -> SecAggEncoding:
        """The encoding for the per-site bound ``B`` and ``K`` sites.

        Raises
        ------
        FederationError
            When ``B`` or ``K`` is not a positive integer or ``K * B > MAX_SUM_BOUND``.
        """
        bound = _positive_int(site_bound, "site-bound")
        k = _positive_int(n_sites, "sites")
        if k * bound > MAX_SUM_BOUND:
            raise FederationError(
                f"site-bound: {k} sites x {bound} exceed what SecAgg+ carries exactly here "
                f"(K * B <= 2**53 = {MAX_SUM_BOUND})"
            )
        digit_max = min(MAX_COORDINATE_BOUND, _MAX_COORDINATE_SUM // k)
        if bound <= digit_max:  # one limb: the integer itself
            limb_bits, limbs, largest = 0, 1, bound
        else:
            limb_bits = (digit_max + 1).bit_length() - 1  # 2**s - 1 <= digit_max
            limbs = 2
            while -(-bound // 2 ** (limb_bits * (limbs - 1))) > 2**limb_bits - 1:
                limbs += 1
            largest = 2**limb_bits - 1  # lower digits in [0, 2**s), the top one within ±it
        clip = 1 << largest.bit_length()  # smallest power of two > largest
        return cls(bound, k, limb_bits, limbs, float(clip), 2 * clip)

    @property
    def modulus_range(self) -> int:
        """``m``: the modulus the masked vectors are summed in."""
        return MODULUS_RANGE

    @property
    def max_weight(self) -> float:
        """``M = Q``, so that a site's weight ``num_examples = 1`` quantises to ``r = 1``."""
        return float(self.quantization_range)

    def workflow_parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``SecAggPlusWorkflow`` (besides shares, threshold, timeout)."""
        return {
            "max_weight": self.max_weight,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
        }

    def _split(self, vector: np.ndarray) -> np.ndarray:
        """``(L, d)`` digits of ``vector``: lower ones in ``[0, 2**s)``, the top one signed."""
        if self.limbs == 1:
            return vector[np.newaxis, :]
        digits = []
        rest = vector.copy()
        for _ in range(self.limbs - 1):
            digits.append(np.mod(rest, 2**self.limb_bits))
            rest = np.floor_divide(rest, 2**self.limb_bits)
        digits.append(rest)
        return np.stack(digits)

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The float vector a site's ``fit`` returns for its integer vector ``v``.

        The ``L`` digit vectors of ``v`` one after the other, each times ``Q``.

        Raises
        ------
        FederationError
            When ``vector`` is not a 1-D integer vector with ``|v| <= site_bound``.
        """
        arr = np.asarray(vector)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise FederationError(
                f"site vector: expected a 1-D integer vector, got {arr.dtype} of shape {arr.shape}"
            )
        arr = arr.astype(np.int64)
        if arr.size and int(np.max(np.abs(arr))) > self.site_bound:
            raise FederationError(
                f"site vector: an entry exceeds site-bound {self.site_bound} (the request's "
                "grid bound); SecAgg+ would clip it"
            )
        return self._split(arr).reshape(-1).astype(np.float64) * float(self.quantization_range)

    def decode(self, aggregated: np.ndarray, n_contributors: int) -> np.ndarray:
        """The exact integer sum from what ``SecAggPlusWorkflow`` hands to ``aggregate_fit``.

        Parameters
        ----------
        aggregated : numpy.ndarray
            The float vector ``(S - n c) Q / n`` the workflow computed (``L d`` entries).
        n_contributors : int
            ``n``: the number of sites whose masked vectors were summed (the number of
            results ``aggregate_fit`` receives), at most ``n_sites``.

        Returns
        -------
        numpy.ndarray
            ``Σ v`` as int64 (``d`` entries).

        Raises
        ------
        FederationError
            When the values are not on the integer grid (the workflow's parameters were not
            these), the length is not a multiple of ``L``, or the sum exceeds ``n B``.
        """
        if not 1 <= n_contributors <= self.n_sites:
            raise FederationError(
                f"secure sum: {n_contributors} contributors; expected 1 to {self.n_sites}"
            )
        arr = np.asarray(aggregated, dtype=np.float64).reshape(-1)
        if arr.size % self.limbs:
            raise FederationError(
                f"secure sum: {arr.size} entries are not {self.limbs} limbs of one vector"
            )
        shifted = arr * (n_contributors / self.quantization_range)  # S - n c, up to rounding
        nearest = np.rint(shifted)
        if arr.size and float(np.max(np.abs(shifted - nearest))) > 1e-3:
            raise FederationError(
                "secure sum: the aggregate is not on the integer grid; the SecAgg+ workflow's "
                "quantisation parameters differ from the transport's"
            )
        modulus = self.modulus_range
        residue = np.mod(nearest.astype(np.int64), modulus)
        digit_sums = np.where(residue >= modulus // 2, residue - modulus, residue)
        total = np.zeros(arr.size // self.limbs, dtype=np.int64)
        for j, part in enumerate(digit_sums.reshape(self.limbs, -1)):
            total += part * np.int64(2 ** (self.limb_bits * j))  # |terms| < 2**62: no overflow
        if total.size and int(np.max(np.abs(total))) > n_contributors * self.site_bound:
            raise FederationError(
                f"secure sum: an entry exceeds {n_contributors} x site-bound {self.site_bound}"
            )
        return total

    def plain_sum(self, vectors: list[np.ndarray]) -> np.ndarray:
        """The exact sum of encoded vectors received in the clear (the non-SecAgg+ baseline)."""
        digits = [
            np.rint(np.asarray(v, dtype=np.float64) / self.quantization_range).astype(np.int64)
            for v in vectors
        ]
        summed = np.sum(np.stack(digits), axis=0).reshape(self.limbs, -1)
        weights = np.array([2 ** (self.limb_bits * j) for j in range(self.limbs)], np.int64)
        return (summed * weights[:, np.newaxis]).sum(axis=0)

    def config(self) -> dict[str, int]:
        """What the fit instructions tell a site about the encoding (it checks its bound)."""
        return {
            "site-bound": self.site_bound,
            "sites": self.n_sites,
            "quantization-range": self.quantization_range,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SecAggEncoding:
        """The encoding a site reads from its fit instructions (see :meth:`config`).

        Raises
        ------
        FederationError
            When a key is missing or ``quantization-range`` differs from the derived one.
        """
        for key in ("site-bound", "sites", "quantization-range"):
            if key not in config:
                raise FederationError(f"fit config: expected the key '{key}'")
        enc = cls.for_bound(config["site-bound"], n_sites=config["sites"])
        if config["quantization-range"] != enc.quantization_range:
            raise FederationError(
                f"fit config: quantization-range expected {enc.quantization_range} for "
                f"site-bound {enc.site_bound} and {enc.n_sites} sites, got "
                f"{config['quantization-range']}"
            )
        return enc


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise FederationError(f"{key}: expected a positive integer, got {value!r}")
    return int(value)
