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

The choices that make it exact for an integer vector ``v`` with ``|v| <= B``:

- ``Q = 2 c`` with ``c`` a power of two and ``c > B``: the quantiser ``Q / 2c`` is exactly
  1, so ``q = v + c``: an integer, which stochastic rounding leaves alone (it rounds down
  only with probability ``ceil(a) - a = 0``), and ``v + c <= 2c - 1 < 2**31`` fits the
  ``int32`` cast when ``c <= 2**30``;
- ``w = 1`` and ``M = Q``: ``r = round(Q / Q) = 1``, so ``r / Q = 2**-k`` is exact and the
  client sends ``x = v * Q`` (exact in float64: ``|v| Q < 2**61``). ``R = n`` never wraps
  modulo ``m``, whereas ``w = M`` (``r = Q``) would make ``R = n Q`` wrap for ``n Q >= m``.
  Every site sending ``w = 1`` also keeps the plain ``num_examples`` field free of data;
- the server's float is ``(S - n c) Q / n``; multiplied by ``n / Q`` it is the integer
  ``S - n c`` up to a relative rounding error below ``2**-50`` (checked, see
  :func:`SecAggEncoding.decode`), so rounding recovers it exactly;
- ``S`` was reduced modulo ``m``, so ``S - n c ≡ Σ v (mod m)``; with ``|Σ v| <= K B`` and
  ``2 K B < m`` the centred residue is ``Σ v`` itself.

Limits, with Flower's documented bound ``m <= 2**32`` (``modulus_range`` "must be less than
4294967296"; its default is ``2**32``, used here): one site's ``|v| <= 2**30 - 1``
(:data:`MAX_SITE_BOUND`, the ``int32`` cast) and the sum's ``K B <= 2**31 - 1``
(:data:`MAX_SUM_BOUND`). Flower logs a warning that ``num_shares > m / Q`` "will
potentially cause overflow": the wrap it warns about is the one undone here.

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
    "MAX_SITE_BOUND",
    "MAX_SUM_BOUND",
    "MODULUS_RANGE",
    "SecAggEncoding",
]

#: Flower's largest documented ``modulus_range`` (its default).
MODULUS_RANGE = 2**32
#: Largest ``|integer|`` one site may send: ``v + c`` must fit ``int32`` with ``c > |v|``.
MAX_SITE_BOUND = 2**30 - 1
#: Largest ``K * B`` carried exactly: the centred residue modulo ``2**32``.
MAX_SUM_BOUND = MODULUS_RANGE // 2 - 1
#: The ``num_examples`` every site reports with its vector (see the module docstring).
FIT_NUM_EXAMPLES = 1
#: The float64 mantissa guard of :meth:`SecAggEncoding.decode` (``(n c + m) < 2**50``).
_FLOAT_GUARD = 2**50


@dataclass(frozen=True)
class SecAggEncoding:
    """SecAgg+ parameters that carry integers ``|v| <= site_bound`` exactly.

    Parameters
    ----------
    site_bound : int
        ``B``: the largest ``|integer|`` one site may send (public, from the request).
    clipping_range : float
        ``c``: the smallest power of two above ``site_bound``.
    quantization_range : int
        ``Q = 2 c``.

    Examples
    --------
    >>> enc = SecAggEncoding.for_bound(1000)
    >>> enc.clipping_range, enc.quantization_range
    (1024.0, 2048)
    >>> enc.check_sites(3)
    >>> enc.decode(np.array([6.0 * 2048 / 3]), n_contributors=3).tolist()
    [6]
    """

    site_bound: int
    clipping_range: float
    quantization_range: int

    @classmethod
    def for_bound(cls, site_bound: int) -> SecAggEncoding:
        """The encoding for the per-site bound ``B`` (``1 <= B <= MAX_SITE_BOUND``).

        Raises
        ------
        FederationError
            When ``B`` is not an integer in ``[1, MAX_SITE_BOUND]``.
        """
        if isinstance(site_bound, bool) or not isinstance(site_bound, int | np.integer):
            raise FederationError(
                f"site-bound: expected an integer, got {type(site_bound).__name__}"
            )
        bound = int(site_bound)
        if not 1 <= bound <= MAX_SITE_BOUND:
            raise FederationError(
                f"site-bound: expected 1 <= B <= {MAX_SITE_BOUND} (2**30 - 1, what one site "
                f"can send exactly through SecAgg+), got {bound}"
            )
        clip = 1 << bound.bit_length()  # smallest power of two > bound
        return cls(site_bound=bound, clipping_range=float(clip), quantization_range=2 * clip)

    @property
    def modulus_range(self) -> int:
        """``m``: the modulus the masked vectors are summed in."""
        return MODULUS_RANGE

    @property
    def max_weight(self) -> float:
        """``M = Q``, so that a site's weight ``num_examples = 1`` quantises to ``r = 1``."""
        return float(self.quantization_range)

    def max_sites(self) -> int:
        """The largest number of sites ``K`` with ``K * B`` carried exactly."""
        return MAX_SUM_BOUND // self.site_bound

    def check_sites(self, n_sites: int) -> None:
        """Refuse a consortium whose sum could exceed what is carried exactly.

        Raises
        ------
        FederationError
            When ``n_sites * site_bound > MAX_SUM_BOUND`` or ``n_sites < 1``.
        """
        if n_sites < 1 or n_sites > self.max_sites():
            raise FederationError(
                f"sites: {n_sites} sites at site-bound {self.site_bound} exceed what SecAgg+ "
                f"carries exactly (K * B <= {MAX_SUM_BOUND}; at most {self.max_sites()} sites)"
            )
        if n_sites * self.clipping_range + self.modulus_range >= _FLOAT_GUARD:
            raise FederationError(f"sites: {n_sites} sites exceed the float64 guard of decode")

    def workflow_parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``SecAggPlusWorkflow`` (besides shares, threshold, timeout)."""
        return {
            "max_weight": self.max_weight,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
        }

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The float vector a site's ``fit`` returns for its integer vector ``v``: ``v * Q``.

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
        if arr.size and int(np.max(np.abs(arr.astype(np.int64)))) > self.site_bound:
            raise FederationError(
                f"site vector: an entry exceeds site-bound {self.site_bound} (the request's "
                "grid bound); SecAgg+ would clip it"
            )
        return arr.astype(np.float64) * float(self.quantization_range)

    def decode(self, aggregated: np.ndarray, n_contributors: int) -> np.ndarray:
        """The exact integer sum from what ``SecAggPlusWorkflow`` hands to ``aggregate_fit``.

        Parameters
        ----------
        aggregated : numpy.ndarray
            The float vector ``(S - n c) Q / n`` the workflow computed.
        n_contributors : int
            ``n``: the number of sites whose masked vectors were summed (the number of
            results ``aggregate_fit`` receives).

        Returns
        -------
        numpy.ndarray
            ``Σ v`` as int64.

        Raises
        ------
        FederationError
            When the values are not on the integer grid (the workflow's parameters were not
            these) or the decoded sum exceeds ``n * site_bound``.
        """
        self.check_sites(n_contributors)
        arr = np.asarray(aggregated, dtype=np.float64)
        shifted = arr * (n_contributors / self.quantization_range)  # S - n c, up to rounding
        nearest = np.rint(shifted)
        if arr.size and float(np.max(np.abs(shifted - nearest))) > 1e-3:
            raise FederationError(
                "secure sum: the aggregate is not on the integer grid; the SecAgg+ workflow's "
                "quantisation parameters differ from the transport's"
            )
        modulus = self.modulus_range
        residue = np.mod(nearest.astype(np.int64), modulus)
        total = np.where(residue >= modulus // 2, residue - modulus, residue)
        if total.size and int(np.max(np.abs(total))) > n_contributors * self.site_bound:
            raise FederationError(
                f"secure sum: an entry exceeds {n_contributors} x site-bound {self.site_bound}"
            )
        return total.astype(np.int64)

    def plain_sum(self, vectors: list[np.ndarray]) -> np.ndarray:
        """The exact sum of encoded vectors received in the clear (the non-SecAgg+ baseline)."""
        total = np.zeros_like(np.asarray(vectors[0], dtype=np.float64))
        for vec in vectors:
            total = total + np.asarray(vec, dtype=np.float64) / self.quantization_range
        return np.rint(total).astype(np.int64)

    def config(self) -> dict[str, int]:
        """What the fit instructions tell a site about the encoding (it checks its bound)."""
        return {"site-bound": self.site_bound, "quantization-range": self.quantization_range}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SecAggEncoding:
        """The encoding a site reads from its fit instructions (see :meth:`config`).

        Raises
        ------
        FederationError
            When the fit config lacks ``site-bound`` or its ``quantization-range`` differs.
        """
        if "site-bound" not in config:
            raise FederationError("fit config: expected the key 'site-bound'")
        enc = cls.for_bound(int(config["site-bound"]))
        if int(config.get("quantization-range", -1)) != enc.quantization_range:
            raise FederationError(
                f"fit config: quantization-range expected {enc.quantization_range} for "
                f"site-bound {enc.site_bound}, got {config.get('quantization-range')}"
            )
        return enc
