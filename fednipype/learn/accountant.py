"""The privacy accounting of one DP-SGD training run at a site (dp-accounting's RDP accountant).

A site's whole participation in a run is two mechanisms on its participants:

1. ``steps = rounds × local_steps`` DP-SGD steps, each a Poisson subsample of the rows with
   probability ``q`` (the sampling rate), per-example gradients clipped to L2 norm ``C`` and
   summed, plus Gaussian noise of SD ``σ·C`` — a subsampled Gaussian mechanism with noise
   multiplier ``σ``;
2. one noisy participant count (sensitivity 1, Gaussian noise of SD ``σ_count``), released once
   and reused as the site's FedAvg weight and as the expected batch size's denominator.

:func:`training_event` describes exactly that as a dp-accounting ``DpEvent`` and
:func:`training_epsilon` composes it with dp-accounting's Rényi-DP accountant (add/remove one
participant, the privacy unit of every fednipype release). The hub's FedAvg average, the
metrics and the model file are post-processing of what the sites sent.

How the count's share is fixed (:func:`calibrate_noise_multiplier`): ``σ_count`` is the
multiplier whose count **alone** costs ``count_share × ε`` at the request's δ (default
``count_share = 0.05``, to within 0.2 %, never more); then ``σ`` is the multiplier for which the
**composed** run costs between 0.998 ε and ε. Both are root searches on the request's public
numbers only, so the hub and every site derive the same (σ, σ_count) from the
request, and the ε charged is the composed one (≤ the request's ε, and within 1 % of it).

Examples
--------
>>> sigma, sigma_count = calibrate_noise_multiplier(4.0, 1e-5, 0.1, 100)
>>> spent = training_epsilon(0.1, sigma, 100, sigma_count, 1e-5)
>>> 0.99 * 4.0 <= spent <= 4.0
True
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass

import dp_accounting
from dp_accounting import rdp
from scipy import optimize

from fednipype.exceptions import DataError

__all__ = [
    "ORDERS",
    "DPConfig",
    "accountant_name",
    "calibrate_noise_multiplier",
    "count_epsilon",
    "count_noise_multiplier",
    "smallest_noise_multiplier",
    "training_epsilon",
    "training_event",
]

#: Rényi orders of the accountant: every integer from 2 to 64, then a sparser grid to 1024.
#: Integer orders, because dp-accounting's subsampled-Gaussian bound is exact for them (its
#: fractional orders fail to converge for small σ and are dropped with a warning); the optimum
#: for the ε of any policy (ε ≤ 20, δ ≥ 1e-10) lies below 64, where the grid is dense.
ORDERS: tuple[float, ...] = tuple(
    float(a) for a in [*range(2, 65), 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024]
)

#: Default share of the site's ε spent on its noisy participant count.
COUNT_SHARE = 0.05


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD settings of one site for one run (all public).

    Attributes
    ----------
    clip : float
        L2 norm each participant's gradient is clipped to (C).
    noise_multiplier : float
        σ: the noise SD on each step's gradient sum is σ·C.
    sampling_rate : float
        q: each row joins each step's batch with probability q (Poisson sampling).
    expected_n : float
        The site's released noisy participant count: the batch sum is divided by q·ñ, and ñ
        is the site's FedAvg weight.
    """

    clip: float
    noise_multiplier: float
    sampling_rate: float
    expected_n: float

    def __post_init__(self) -> None:
        for name in ("clip", "noise_multiplier", "expected_n"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise DataError(f"dp/{name}: expected a finite number > 0, got {value!r}")
        if not 0 < float(self.sampling_rate) <= 1:
            raise DataError(f"dp/sampling_rate: expected 0 < q <= 1, got {self.sampling_rate!r}")


def _check(sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> None:
    if not 0 < float(sampling_rate) <= 1:
        raise DataError(f"sampling_rate: expected 0 < q <= 1, got {sampling_rate!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DataError(
            f"noise_multiplier: expected a finite number > 0, got {noise_multiplier!r}"
        )
    if int(steps) != steps or steps < 1:
        raise DataError(f"steps: expected a whole number >= 1, got {steps!r}")
    if not 0 < float(delta) < 1:
        raise DataError(f"delta: expected 0 < delta < 1, got {delta!r}")


def training_event(
    sampling_rate: float, noise_multiplier: float, steps: int, count_noise_multiplier: float
) -> dp_accounting.DpEvent:
    """The dp-accounting event of one site's whole run.

    Parameters
    ----------
    sampling_rate : float
        q, the Poisson sampling probability of each step.
    noise_multiplier : float
        σ of each step's Gaussian noise (relative to the clip norm).
    steps : int
        Number of DP-SGD steps in the whole run (rounds × local steps).
    count_noise_multiplier : float
        σ_count of the noisy participant count (sensitivity 1).

    Returns
    -------
    dp_accounting.ComposedDpEvent
        ``Composed([SelfComposed(PoissonSampled(q, Gaussian(σ)), steps), Gaussian(σ_count)])``.
    """
    step = dp_accounting.PoissonSampledDpEvent(
        float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
    )
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(step, int(steps)),
            dp_accounting.GaussianDpEvent(float(count_noise_multiplier)),
        ]
    )


def _epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(event)
    return float(accountant.get_epsilon(float(delta)))


@functools.lru_cache(maxsize=4096)
def training_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    count_noise_multiplier: float,
    delta: float,
) -> float:
    """ε of the composed run (:func:`training_event`) at ``delta``, by the RDP accountant."""
    _check(sampling_rate, noise_multiplier, steps, delta)
    _check(1.0, count_noise_multiplier, 1, delta)
    event = training_event(sampling_rate, noise_multiplier, steps, count_noise_multiplier)
    return _epsilon(event, delta)


@functools.lru_cache(maxsize=4096)
def count_epsilon(count_noise_multiplier: float, delta: float) -> float:
    """ε of the noisy count alone at ``delta``, by the same accountant."""
    _check(1.0, count_noise_multiplier, 1, delta)
    return _epsilon(dp_accounting.GaussianDpEvent(float(count_noise_multiplier)), delta)


def smallest_noise_multiplier(cost: Callable[[float], float], target: float) -> float:
    """A σ with ``target · (1 − 0.002) <= cost(σ) <= target`` (cost decreasing in σ).

    Brent's root finder on log σ aims at 0.998 × target (to relative 1e-9 in σ); the result is
    then raised in steps of 1e-4 until its cost is not above the target, so the guarantee never
    rests on the root finder's tolerance. Deterministic: the same arguments give the same σ.
    """
    aim = target * (1 - 0.002)
    # Bracket the aim itself (not the target): cost(lo) >= aim >= cost(hi), so the root
    # finder's two ends have different signs even when cost(hi) falls between aim and target.
    lo, hi = 0.05, 1.0
    while cost(hi) > aim:
        lo, hi = hi, hi * 4.0
        if hi > 1e6:
            raise DataError(f"epsilon: no noise multiplier below 1e6 reaches epsilon {target!r}")
    while cost(lo) < aim:
        lo, hi = lo / 4.0, lo
        if lo < 1e-6:
            return hi
    log_sigma = optimize.brentq(
        lambda t: cost(math.exp(t)) - aim, math.log(lo), math.log(hi), xtol=1e-9
    )
    sigma = math.exp(log_sigma)
    while cost(sigma) > target:
        sigma *= 1 + 1e-4
    return sigma


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    count_share: float = COUNT_SHARE,
) -> tuple[float, float]:
    """The noise multipliers (σ, σ_count) a run needs to cost at most ``(epsilon, delta)``.

    Parameters
    ----------
    epsilon, delta : float
        The request's per-site privacy loss of the whole run.
    sampling_rate : float
        q of each DP-SGD step.
    steps : int
        rounds × local steps.
    count_share : float
        Share of ``epsilon`` the noisy count alone may cost (0 < share < 1).

    Returns
    -------
    sigma, sigma_count : float
        Deterministic functions of the arguments (see the module docstring for the rule).
    """
    epsilon, delta = float(epsilon), float(delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise DataError(f"epsilon: expected a finite number > 0, got {epsilon!r}")
    if not 0 < count_share < 1:
        raise DataError(f"count_share: expected 0 < share < 1, got {count_share!r}")
    _check(sampling_rate, 1.0, steps, delta)
    sigma_count = count_noise_multiplier(epsilon, delta, count_share)
    sigma = smallest_noise_multiplier(
        lambda s: training_epsilon(sampling_rate, s, steps, sigma_count, delta), epsilon
    )
    return sigma, sigma_count


@functools.lru_cache(maxsize=256)
def count_noise_multiplier(
    epsilon: float, delta: float, count_share: float = COUNT_SHARE
) -> float:
    """σ_count: the noisy count's multiplier, whose count alone costs ``count_share × ε``."""
    return smallest_noise_multiplier(lambda s: count_epsilon(s, delta), count_share * epsilon)


def accountant_name() -> str:
    """What the model file records as the accountant."""
    version = importlib.metadata.version("dp-accounting")
    return f"dp_accounting.rdp.RdpAccountant (dp-accounting {version}, orders 2-64, 80-1024)"
