"""How the charges of a ledger compose: Gaussian mechanisms compose exactly.

Every release is one Gaussian vector mechanism, fully described by its noise multiplier
σ/Δ (noise scale over L2 sensitivity). Summing the (ε, δ) of k such releases (basic
composition) overstates what they cost: ten releases at (1, 1e-5) are really about
(3.13, 1e-4), not (10, 1e-4). Gaussian mechanisms compose exactly into one Gaussian
mechanism whose multiplier is (Σ 1/σᵢ²)^(-1/2) (Gaussian differential privacy: μ-GDP
mechanisms compose to √(Σ μᵢ²)-GDP); its ε at the policy's δ is dp-accounting's exact
``get_epsilon_gaussian``. This equals dp-accounting's privacy-loss-distribution composition
of the same mechanisms up to that accountant's (pessimistic) discretisation, at a fraction of
its cost: PLD grids grow without bound as the noise gets small. A charge without a noise
multiplier (any other mechanism) is added by basic composition on top: it uses its own (ε, δ).

The spent ε is the smaller of two valid bounds at the policy's δ: the Gaussian composition,
and basic composition (Σε at Σδ ≤ δ), so the ledger is never looser than basic composition.

References
----------
Dong, J., Roth, A. & Su, W. J. (2022). Gaussian differential privacy. JRSS B 84(1), 3–37.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dp_accounting import gaussian_mechanism

__all__ = ["Charge", "composed_epsilon"]


@dataclass(frozen=True)
class Charge:
    """One ledger charge as the accountant sees it.

    Attributes
    ----------
    epsilon, delta : float
        What the charge declared (its own mechanism's (ε, δ)).
    noise_multiplier : float or None
        σ/Δ of a Gaussian mechanism; None for any other mechanism.
    """

    epsilon: float
    delta: float
    noise_multiplier: float | None = None


def composed_epsilon(charges: Iterable[Charge], target_delta: float) -> float:
    """ε spent by ``charges`` together, at δ = ``target_delta``.

    Parameters
    ----------
    charges : iterable of Charge
        Every charge of a ledger (and, to test admission, the one requested).
    target_delta : float
        The policy's total δ.

    Returns
    -------
    float
        ε such that the composition is (ε, target_delta)-DP; ``math.inf`` if the charges'
        own δ already exhaust ``target_delta``.

    Examples
    --------
    >>> from fednipype.contract.calibration import analytic_gaussian_sigma
    >>> one = Charge(1.0, 1e-5, analytic_gaussian_sigma(1.0, 1e-5, 1.0))
    >>> round(composed_epsilon([one] * 10, 1e-4), 2)   # basic composition says 10
    3.13
    """
    charges = list(charges)
    if not charges:
        return 0.0
    basic_eps = math.fsum(c.epsilon for c in charges)
    basic_delta = math.fsum(c.delta for c in charges)
    basic = basic_eps if basic_delta <= target_delta * (1 + 1e-12) else math.inf
    precision = math.fsum(c.noise_multiplier**-2 for c in charges if c.noise_multiplier)
    others = [c for c in charges if c.noise_multiplier is None]
    other_eps = math.fsum(c.epsilon for c in others)
    gaussian_delta = target_delta - math.fsum(c.delta for c in others)
    if precision == 0 or gaussian_delta <= 0:
        return basic
    composed = gaussian_mechanism.get_epsilon_gaussian(precision**-0.5, gaussian_delta)
    return min(basic, other_eps + float(composed))
