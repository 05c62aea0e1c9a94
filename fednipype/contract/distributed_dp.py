"""Accounting of the distributed discrete Gaussian mechanism (Kairouz, Liu & Steinke 2021).

Public arithmetic, no data and no randomness: a site calibrates its noise share with it
(the noise itself is drawn at the site by OpenDP, :mod:`fednipype.site.answer`), and the hub
recomputes from the request alone what the noise of the sum is (:func:`request_noise`).

In ``distributed-dp`` mode every one of K sites adds independent discrete Gaussian noise
N_ℤ(0, σ²) to every integer coordinate of its answer, and secure aggregation reveals only
the sum. As long as at most t sites drop out or collude with the hub, the sum carries the
noise of at least n = K − t honest sites: a sum of n independent N_ℤ(0, σ²) per coordinate.
That sum is not exactly a discrete Gaussian; Kairouz, Liu & Steinke (2021, Proposition 14 of
arXiv:2102.06387, restated in their Theorem 1) bound its Rényi divergence, for a change of
the summed vector of L2 norm ≤ Δ₂ and L1 norm ≤ Δ₁ over d coordinates, at every order α > 1::

    D_α ≤ min( α/2 · a² + τ d,
               α/2 · (a² + 2 b τ + τ² d),
               α/2 · (a + √d τ)² ),     a = Δ₂ / (√n σ),  b = Δ₁ / (√n σ),
    τ = 10 · Σ_{k=1}^{n−1} exp(−2π² σ² · k / (k + 1))     (requires σ ≥ 1/2).

τ is the correction for the sum not being a discrete Gaussian; it vanishes as σ grows
(τ < 1e-300 once σ > 6, and a site's σ on the fine grid of
:class:`~fednipype.contract.secure_sum.Grid` is many orders larger). With τ = 0 the bound is
the Rényi curve of a Gaussian mechanism of noise multiplier √n σ / Δ₂: ρ-zCDP with
ρ = Δ₂² / (2 n σ²). For one honest site alone (n = 1) the sum is one discrete Gaussian and τ = 0
exactly (Canonne, Kamath & Steinke 2020): that is the *local floor*, the guarantee of one
site's answer on its own.

Conversion to (ε, δ): the Rényi bound at a dense set of orders is converted by
dp-accounting's :func:`dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon`, which uses
the conversion of Canonne, Kamath & Steinke (2020, Proposition 12) / Asoodeh et al. (2020):
ε = min_α D_α + log(1 − 1/α) − log(δ α)/(α − 1). Any order gives a valid bound, so a finite
set of orders is conservative. The per-site σ is calibrated as the smallest σ (bisection, then
rounded up) whose bound is within the request's (ε, δ).

Why hand-written: dp-accounting and OpenDP account single (discrete) Gaussian mechanisms, not
the sum of several parties' discrete Gaussians; the Proposition 14 bound above is a few lines,
the conversion is dp-accounting's.

References
----------
Kairouz, P., Liu, Z. & Steinke, T. (2021). The distributed discrete Gaussian mechanism for
federated learning with secure aggregation. ICML. arXiv:2102.06387.
Canonne, C., Kamath, G. & Steinke, T. (2020). The discrete Gaussian for differential privacy.
NeurIPS. arXiv:2004.00010.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fednipype.contract.calibration import check_delta, check_epsilon, check_positive
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import DEFAULT_CAPACITY, Grid, SumLayout
from fednipype.exceptions import PolicyError, RequestError
from fednipype.learn.accountant import count_noise_multiplier, smallest_noise_multiplier

__all__ = [
    "TRAINING_GRID_BITS",
    "DistributedNoise",
    "TrainingNoise",
    "calibrate",
    "calibrate_training",
    "epsilon",
    "rdp",
    "request_noise",
    "tau",
    "training_epsilon",
]

#: The Rényi orders the conversion to (ε, δ) minimises over (1.011 to 1e5, ~1 % apart).
ORDERS = 1.0 + np.geomspace(0.011, 1e5, 1500)
#: Smallest per-party σ the bound holds for (Kairouz, Liu & Steinke 2021).
MIN_SIGMA = 0.5


def tau(sigma: float, n_parties: int) -> float:
    """τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ² k/(k+1)): the correction for a sum of n discrete Gaussians.

    >>> tau(1.0, 1), tau(20.0, 5)
    (0.0, 0.0)
    >>> 0 < tau(0.6, 3) < 1
    True
    """
    k = np.arange(1, int(n_parties), dtype=float)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0))))


def rdp(
    orders: np.ndarray, sigma: float, n_parties: int, l2: float, l1: float, dim: int
) -> np.ndarray:
    """Rényi divergence bound of the sum of ``n_parties`` discrete Gaussians (module docstring).

    Parameters
    ----------
    orders : ndarray
        Orders α > 1.
    sigma : float
        Each party's discrete Gaussian σ (integer units), >= 1/2.
    n_parties : int
        Honest parties whose noise is in the sum.
    l2, l1 : float
        L2 and L1 sensitivity of the integer vector.
    dim : int
        Coordinates that can change.

    Returns
    -------
    ndarray
        The bound at each order.
    """
    if sigma < MIN_SIGMA:
        raise PolicyError(
            f"distributed discrete Gaussian: sigma={sigma:g} is below {MIN_SIGMA}, where the "
            "bound of Kairouz, Liu & Steinke (2021) holds"
        )
    t = tau(sigma, n_parties)
    a = l2 / (math.sqrt(n_parties) * sigma)
    b = l1 / (math.sqrt(n_parties) * sigma)
    alpha = np.asarray(orders, dtype=float)
    term_1 = alpha / 2.0 * a**2 + t * dim
    term_2 = alpha / 2.0 * (a**2 + 2.0 * b * t + t**2 * dim)
    term_3 = alpha / 2.0 * (a + math.sqrt(dim) * t) ** 2
    return np.minimum(np.minimum(term_1, term_2), term_3)


def epsilon(sigma: float, n_parties: int, l2: float, dim: int, delta: float) -> float:
    """ε at ``delta`` of the sum of ``n_parties`` discrete Gaussians of σ each.

    The L1 sensitivity is bounded from the L2 one: ``min(√dim · Δ₂, Δ₂²)`` (an integer
    vector's entries are 0 or at least 1 in magnitude, so |x| ≤ x²).

    With τ = 0 it is the Rényi accounting of a Gaussian of multiplier √n σ / Δ₂:

    >>> import dp_accounting
    >>> accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    >>> _ = accountant.compose(dp_accounting.GaussianDpEvent(math.sqrt(3) * 1e6 / 4e5))
    >>> bool(abs(epsilon(1e6, 3, 4e5, 20, 1e-5) - accountant.get_epsilon(1e-5)) < 1e-12)
    True
    """
    eps, _ = compute_epsilon(ORDERS, _sum_curve(sigma, n_parties, l2, dim), delta)
    return float(eps)


def _sum_curve(sigma: float, n_parties: int, l2: float, dim: int) -> np.ndarray:
    """:func:`rdp` at :data:`ORDERS`, the L1 sensitivity bounded from the L2 one:
    ``min(√dim · Δ₂, Δ₂²)`` (an integer vector's entries are 0 or at least 1 in magnitude)."""
    l1 = min(math.sqrt(dim) * l2, l2**2)
    return rdp(ORDERS, sigma, n_parties, l2, l1, dim)


@dataclass(frozen=True)
class DistributedNoise:
    """The calibrated noise of one site's answer and what it guarantees.

    Attributes
    ----------
    sigma_site : float
        σ of the site's discrete Gaussian per coordinate (integer units).
    sigma_central : float
        √(K − t) σ_site: the noise sd of the sum of the honest sites' shares.
    n_honest : int
        K − t.
    l2_sensitivity : float
        L2 sensitivity of one site's integer vector (rounding included).
    dim : int
        Coordinates one site's vector can change.
    epsilon, delta : float
        The guarantee of the sum (the request's), by the bound above.
    tau : float
        The correction term at σ_site and K − t parties.
    local_floor_epsilon : float
        ε at the same δ of the site's answer alone (one discrete Gaussian of σ_site): what
        the answer guarantees if every other site colludes with the hub.
    """

    sigma_site: float
    sigma_central: float
    n_honest: int
    l2_sensitivity: float
    dim: int
    epsilon: float
    delta: float
    tau: float
    local_floor_epsilon: float

    @property
    def noise_multiplier(self) -> float:
        """σ_central / Δ₂: the Gaussian multiplier whose Rényi curve the bound equals at τ = 0.

        Recorded for reference. The site's ledger does not compose the answer's charge as a
        Gaussian of this multiplier: the theorem bounds Rényi divergences of a sum of
        discrete Gaussians, so the charge is composed by its (ε, δ)
        (:mod:`fednipype.site.answer`).
        """
        return self.sigma_central / self.l2_sensitivity

    def as_dict(self) -> dict[str, float | int | str]:
        """The description recorded in the ledger's audit row (public numbers only)."""
        return {
            "mechanism": "distributed discrete Gaussian",
            "accounting": "Kairouz, Liu & Steinke 2021, Proposition 14 (Renyi), converted by "
            "Canonne, Kamath & Steinke 2020, Proposition 12 (dp-accounting compute_epsilon)",
            "sigma_site": self.sigma_site,
            "sigma_central": self.sigma_central,
            "n_honest": self.n_honest,
            "l2_sensitivity": self.l2_sensitivity,
            "dim": self.dim,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "tau": self.tau,
            "noise_multiplier": self.noise_multiplier,
            "local_floor_epsilon": self.local_floor_epsilon,
        }


def calibrate(
    epsilon_target: float, delta: float, l2: float, dim: int, n_honest: int
) -> DistributedNoise:
    """The smallest per-site σ whose sum over ``n_honest`` sites is (ε, δ)-DP.

    Parameters
    ----------
    epsilon_target, delta : float
        The request's per-site (ε, δ); 0 < δ.
    l2 : float
        L2 sensitivity of one site's integer vector (:meth:`Grid.sensitivity
        <fednipype.contract.secure_sum.Grid.sensitivity>`).
    dim : int
        Coordinates one site's vector can change.
    n_honest : int
        K − t: the sites whose shares the guarantee relies on.

    Returns
    -------
    DistributedNoise

    Examples
    --------
    >>> noise = calibrate(1.0, 1e-5, 1e4, 30, 2)
    >>> noise.epsilon <= 1.0 and noise.sigma_central > 3.73e4   # above the analytic Gaussian
    True
    >>> noise.local_floor_epsilon > noise.epsilon
    True
    """
    epsilon_target = check_epsilon(epsilon_target, "distributed-dp epsilon")
    delta = check_delta(delta, "distributed-dp delta")
    if delta <= 0:
        raise PolicyError("distributed-dp delta: must be > 0")
    l2 = check_positive(l2, "distributed-dp l2 sensitivity")
    if int(n_honest) < 1 or int(dim) < 1:
        raise PolicyError(f"distributed-dp: n_honest={n_honest}, dim={dim}; both must be >= 1")
    n_honest, dim = int(n_honest), int(dim)

    def fits(sigma: float) -> bool:
        return epsilon(sigma, n_honest, l2, dim, delta) <= epsilon_target

    hi = max(MIN_SIGMA, l2)
    while not fits(hi):
        hi *= 2.0
        if hi > 1e300:
            raise PolicyError(f"distributed-dp: cannot calibrate for epsilon={epsilon_target}")
    lo = hi / 2.0
    while lo > MIN_SIGMA and fits(lo):  # ``hi`` fits, ``lo`` does not (or is the floor)
        hi, lo = lo, lo / 2.0
    lo = max(lo, MIN_SIGMA)
    if fits(lo):
        hi = lo
    for _ in range(200):  # bisection in log σ; ``hi`` always fits
        if hi / lo - 1.0 < 1e-12:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    sigma = hi
    return DistributedNoise(
        sigma_site=sigma,
        sigma_central=math.sqrt(n_honest) * sigma,
        n_honest=n_honest,
        l2_sensitivity=l2,
        dim=dim,
        epsilon=epsilon(sigma, n_honest, l2, dim, delta),
        delta=delta,
        tau=tau(sigma, n_honest),
        local_floor_epsilon=epsilon(sigma, 1, l2, dim, delta),
    )


def request_noise(
    request: AnalysisRequest, *, capacity: int = DEFAULT_CAPACITY
) -> tuple[DistributedNoise, Grid]:
    """The calibrated noise of a ``distributed-dp`` request and its grid, from public facts.

    Each site rounds its vector to the request's grid (:meth:`Grid.for_request`), whose L2
    sensitivity is then at most Δ/step + √d (:meth:`Grid.sensitivity`, d the coordinates one
    site writes); the shares of K − t sites must carry (ε, δ).

    Parameters
    ----------
    request : AnalysisRequest
        A ``distributed-dp`` request.
    capacity : int
        As for :meth:`Grid.for_request`.

    Returns
    -------
    tuple of (DistributedNoise, Grid)
        One site's noise sd per coordinate in scaled units is ``noise.sigma_site * grid.step``.

    Raises
    ------
    RequestError
        Not a distributed-dp request, or no grid fits it.
    """
    if request.mode != "distributed-dp":
        raise RequestError(f"{request.source}: request_noise needs a distributed-dp request")
    layout = SumLayout.from_request(request)
    grid = Grid.for_request(request, capacity=capacity)
    l2 = grid.sensitivity(layout.sensitivity, layout.site_dim)
    honest = request.k - request.max_dropouts
    return calibrate(request.epsilon, request.delta, l2, layout.site_dim, honest), grid


# -- federated training: one distributed discrete Gaussian gradient sum per round --------------

#: A training round's gradient sum is sent on the grid ``clip / 2**TRAINING_GRID_BITS``: one
#: participant moves it by at most ``2**16`` grid units, so the rounding's ``√d`` extra
#: sensitivity is a few parts in 10⁴ of it for the models' ≤ 1,000 parameters.
TRAINING_GRID_BITS = 16


def training_epsilon(
    sigma_site: float,
    n_honest: int,
    l2: float,
    dim: int,
    rounds: int,
    count_noise_multiplier: float,
    delta: float,
) -> float:
    """ε at ``delta`` of a ``distributed-dp`` training run at one site.

    The run is ``rounds`` sums of ``n_honest`` sites' discrete Gaussian shares (the bound of
    the module docstring, integer L2 sensitivity ``l2`` over ``dim`` coordinates) and the
    site's one Gaussian noisy count (multiplier σ_count, sensitivity 1). Rényi divergences
    add up under composition (Mironov 2017, Proposition 1), so the run's curve is
    ``rounds × D_α(sum) + α / (2 σ_count²)``, converted by dp-accounting's ``compute_epsilon``.
    No amplification by sampling is claimed: every round uses all the site's training rows.

    With τ = 0 it equals dp-accounting's RDP accountant of ``rounds`` Gaussians of multiplier
    √n σ / Δ₂ composed with the count's Gaussian:

    >>> import dp_accounting
    >>> accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    >>> _ = accountant.compose(dp_accounting.GaussianDpEvent(math.sqrt(3) * 1e6 / 4e5), 20)
    >>> _ = accountant.compose(dp_accounting.GaussianDpEvent(5.0))
    >>> ours = training_epsilon(1e6, 3, 4e5, 20, 20, 5.0, 1e-5)
    >>> bool(abs(ours - accountant.get_epsilon(1e-5)) < 1e-9)
    True
    """
    curve = int(rounds) * _sum_curve(sigma_site, n_honest, l2, dim)
    curve = curve + ORDERS / (2.0 * float(count_noise_multiplier) ** 2)
    eps, _ = compute_epsilon(ORDERS, curve, delta)
    return float(eps)


@dataclass(frozen=True)
class TrainingNoise(DistributedNoise):
    """The noise of a ``distributed-dp`` training run, the same at the hub and every site.

    The fields of :class:`DistributedNoise` for one round's gradient sum (``n_honest`` is the
    request's ``min_sites``: the hub unmasks no sum of fewer; ``l2_sensitivity`` is
    ``2**16 + √dim`` integer units; ``epsilon`` and ``local_floor_epsilon`` are the whole
    run's, :func:`training_epsilon`), and:

    Attributes
    ----------
    grid_step : float
        Gradient units per integer: ``clip / 2**TRAINING_GRID_BITS``.
    rounds : int
        Gradient sums the site sends.
    count_noise_multiplier : float
        σ_count of the site's one noisy training-row count.
    """

    grid_step: float
    rounds: int
    count_noise_multiplier: float

    def as_dict(self) -> dict[str, float | int | str]:
        """The public description recorded in the ledger and the model file."""
        return {
            **super().as_dict(),
            "mechanism": "distributed discrete Gaussian, one full-batch gradient sum per round",
            "accounting": "Kairouz, Liu & Steinke 2021, Proposition 14 (Renyi) per round, "
            "composed with the Gaussian count, converted by dp-accounting compute_epsilon",
            "grid_step": self.grid_step,
            "rounds": self.rounds,
            "count_noise_multiplier": self.count_noise_multiplier,
        }


@functools.lru_cache(maxsize=256)
def calibrate_training(
    epsilon_target: float, delta: float, clip: float, dim: int, rounds: int, n_honest: int
) -> TrainingNoise:
    """The smallest per-site σ for which a ``distributed-dp`` run costs at most (ε, δ).

    The count takes :data:`~fednipype.learn.accountant.COUNT_SHARE` of ε as in mode ``dp``
    (:func:`~fednipype.learn.accountant.count_noise_multiplier`); σ_site is then found as in
    mode ``dp`` (:func:`~fednipype.learn.accountant.smallest_noise_multiplier`: Brent's method
    on log σ, the run's ε between 0.998 ε and ε). Deterministic: the hub and every site derive
    the same noise from the request.

    Parameters
    ----------
    epsilon_target, delta : float
        The request's per-site (ε, δ) of the whole run.
    clip : float
        The per-participant L2 clip norm (gradient units).
    dim : int
        Gradient coordinates.
    rounds : int
        Rounds (one gradient sum each).
    n_honest : int
        Sites whose shares are in every unmasked sum (the request's ``min_sites``).

    Returns
    -------
    TrainingNoise

    Examples
    --------
    >>> noise = calibrate_training(4.0, 1e-5, 1.0, 11, 20, 3)
    >>> 0.99 * 4.0 <= noise.epsilon <= 4.0 < noise.local_floor_epsilon
    True
    """
    epsilon_target = check_epsilon(epsilon_target, "distributed-dp epsilon")
    delta = check_delta(delta, "distributed-dp delta")
    clip = check_positive(clip, "distributed-dp clip")
    if delta <= 0 or int(n_honest) < 1 or int(dim) < 1 or int(rounds) < 1:
        raise PolicyError(
            f"distributed-dp training: delta={delta}, n_honest={n_honest}, dim={dim}, "
            f"rounds={rounds}; expected delta > 0 and the others >= 1"
        )
    n_honest, dim, rounds = int(n_honest), int(dim), int(rounds)
    sigma_count = count_noise_multiplier(epsilon_target, delta)
    l2 = 2.0**TRAINING_GRID_BITS + math.sqrt(dim)

    def cost(multiplier: float, parties: int = n_honest) -> float:
        sigma = multiplier * l2
        if sigma < MIN_SIGMA:
            return math.inf
        return training_epsilon(sigma, parties, l2, dim, rounds, sigma_count, delta)

    multiplier = smallest_noise_multiplier(cost, epsilon_target)
    sigma = multiplier * l2
    return TrainingNoise(
        grid_step=clip / 2.0**TRAINING_GRID_BITS,
        sigma_site=sigma,
        sigma_central=math.sqrt(n_honest) * sigma,
        n_honest=n_honest,
        l2_sensitivity=l2,
        dim=dim,
        rounds=rounds,
        count_noise_multiplier=sigma_count,
        epsilon=cost(multiplier),
        delta=delta,
        tau=tau(sigma, n_honest),
        local_floor_epsilon=cost(multiplier, 1),
    )
