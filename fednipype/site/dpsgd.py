"""A site's local training step: gradient descent, or DP-SGD with OpenDP's Gaussian noise.

DP-SGD (Abadi et al. 2016) at participant level: each step Poisson-samples the site's rows,
clips every sampled participant's gradient to the public L2 norm ``clip``, sums the clipped
gradients, adds Gaussian noise of SD ``noise_multiplier × clip`` to the sum, and divides by the
*expected* batch size ``sampling_rate × ñ`` (ñ the site's released noisy count, so the
divisor is public). Adding or removing one participant changes the sum by at most ``clip``
in L2 norm, which is what :mod:`fednipype.learn.accountant` composes over the run.

The noise comes only from OpenDP (``make_gaussian``: exact sampling, floating-point safe, from
the operating system's randomness, never seeded). The Poisson sample uses
:class:`secrets.SystemRandom` (the operating system's CSPRNG): the privacy amplification by
sampling assumes the sample is unpredictable to an adversary, which a seeded PRNG such as
numpy's is not; OpenDP 0.16 offers no Poisson subsampling of a dataset to use instead.

References
----------
Abadi, M. et al. (2016). Deep learning with differential privacy. CCS '16, 308–318.
"""

from __future__ import annotations

import functools
import secrets
from typing import Any

import numpy as np

from fednipype.exceptions import DataError
from fednipype.learn import models
from fednipype.learn.accountant import DPConfig
from fednipype.learn.fedavg import gradient_descent
from fednipype.site import opendp_parts as dp
from fednipype.site.distributed_dp import integer_gaussian

__all__ = [
    "DPConfig",
    "clip_rows",
    "discrete_gaussian_share",
    "local_update",
    "noisy_clipped_sum",
    "noisy_count",
    "poisson_sample",
]

dp.enable_features("contrib")

_SYSTEM_RANDOM = secrets.SystemRandom()


@functools.lru_cache(maxsize=64)
def _vector_gaussian(scale: float) -> Any:
    """OpenDP's Gaussian measurement on float vectors (L2 distance) with SD ``scale``."""
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
    return dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale)


@functools.lru_cache(maxsize=64)
def _scalar_gaussian(scale: float) -> Any:
    """OpenDP's Gaussian measurement on one float (absolute distance) with SD ``scale``."""
    domain = dp.atom_domain(T=float, nan=False)
    return dp.m.make_gaussian(domain, dp.absolute_distance(T=float), scale=scale)


def poisson_sample(n: int, sampling_rate: float) -> np.ndarray:
    """A boolean mask of ``n`` rows, each True independently with probability ``sampling_rate``.

    The uniforms are built as :meth:`random.SystemRandom.random` builds them (53 random bits
    over 2^53), from one call for all rows to :meth:`~random.SystemRandom.randbytes`.
    """
    if n == 0:
        return np.zeros(0, dtype=bool)
    bits = np.frombuffer(_SYSTEM_RANDOM.randbytes(8 * int(n)), dtype=np.uint64) >> np.uint64(11)
    return bits.astype(float) * 2.0**-53 < float(sampling_rate)


def clip_rows(per_example: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``clip`` (rows already shorter are unchanged)."""
    norms = np.linalg.norm(per_example, axis=1)
    factor = np.minimum(1.0, float(clip) / np.maximum(norms, np.finfo(float).tiny))
    return per_example * factor[:, None]


def noisy_clipped_sum(per_example: np.ndarray, clip: float, noise_multiplier: float) -> np.ndarray:
    """Σ of the clipped rows plus OpenDP Gaussian noise of SD ``noise_multiplier × clip``.

    Parameters
    ----------
    per_example : ndarray
        (batch, p) per-participant gradients (the batch may be empty).
    clip : float
        L2 clip norm (the sum's sensitivity under add/remove one participant).
    noise_multiplier : float
        σ of the accountant.

    Returns
    -------
    ndarray
        The noisy sum, length p.
    """
    total = clip_rows(per_example, clip).sum(axis=0)
    measurement = _vector_gaussian(float(noise_multiplier) * float(clip))
    return np.asarray(measurement(total.tolist()), dtype=float)


def discrete_gaussian_share(
    per_example: np.ndarray, clip: float, grid_step: float, sigma: float
) -> np.ndarray:
    """A site's ``distributed-dp`` round: its clipped gradient sum on the grid, plus its share.

    Every row is clipped to L2 norm ``clip`` (:func:`clip_rows`), the rows are summed, the sum
    is rounded to the integer grid of ``grid_step`` and OpenDP's discrete Gaussian
    (``make_gaussian`` over ``vector_domain(atom_domain(T="i64"))``: exact sampling from the
    operating system's randomness, never seeded) of σ ``sigma`` integer units is added to every
    coordinate. Alone it protects the site's rows only up to its local floor; the request's
    guarantee is that of the SecAgg+ sum of ``n_honest`` such shares
    (:func:`fednipype.contract.distributed_dp.training_epsilon`).

    Parameters
    ----------
    per_example : ndarray
        (rows, p) per-participant gradients: every training row of the site.
    clip : float
        L2 clip norm.
    grid_step : float
        Gradient units per integer (``clip / 2**16``).
    sigma : float
        The site's σ in integer units.

    Returns
    -------
    ndarray of int64
        Length p.
    """
    total = clip_rows(np.asarray(per_example, dtype=float), clip).sum(axis=0)
    rounded = np.rint(total / float(grid_step)).astype(np.int64)
    measurement = integer_gaussian(float(sigma))
    return np.asarray(measurement([int(v) for v in rounded]), dtype=np.int64)


def noisy_count(n: int, noise_multiplier: float) -> float:
    """The site's participant count plus OpenDP Gaussian noise of SD ``noise_multiplier``.

    Sensitivity 1 (add/remove one participant). Floored at 1 (post-processing) so it can
    divide.
    """
    if int(n) != n or n < 0:
        raise DataError(f"count: expected a whole number >= 0, got {n!r}")
    return max(1.0, float(_scalar_gaussian(float(noise_multiplier))(float(n))))


def local_update(
    task: str,
    w: Any,
    Xs: Any,
    y: Any,
    *,
    learning_rate: float,
    local_steps: int,
    l2: float,
    dp: DPConfig | None,
    batch_size: int | None = None,
) -> np.ndarray:
    """The site's new local parameters after ``local_steps`` steps from ``w``.

    Parameters
    ----------
    task : {"brain-age", "diagnosis"}
    w : ndarray
        The hub's parameters ``[intercept, coef...]`` (scaled units).
    Xs, y : ndarray
        The site's scaled training features and labels (participants with missing values
        already left out: a NaN here is a :class:`~fednipype.exceptions.DataError`).
    learning_rate : float
        Step size.
    local_steps : int
        Steps per round.
    l2 : float
        Ridge penalty (its gradient is data-independent and added after the noise).
    dp : DPConfig or None
        None: plain gradient descent (full batch, or cyclic mini-batches of ``batch_size``,
        see :func:`fednipype.learn.fedavg.gradient_descent`). Otherwise DP-SGD as described
        in the module docstring (``batch_size`` must then be None: the batch is Poisson).

    Returns
    -------
    ndarray
        The new local parameters.
    """
    if dp is None:
        return gradient_descent(
            task,
            w,
            Xs,
            y,
            learning_rate=learning_rate,
            local_steps=local_steps,
            l2=l2,
            batch_size=batch_size,
        )
    if batch_size is not None:
        raise DataError("batch_size: DP-SGD batches are Poisson samples; expected None")
    w = np.array(w, dtype=float)
    Xs = np.asarray(Xs, dtype=float)
    y = np.asarray(y, dtype=float)
    # check once (NaN, shapes, 0/1 labels) on all rows, before any noise is drawn
    models.per_example_gradients(task, w, Xs, y)
    divisor = dp.sampling_rate * dp.expected_n
    for _ in range(int(local_steps)):
        batch = poisson_sample(Xs.shape[0], dp.sampling_rate)
        rows = models.per_example_gradients(task, w, Xs[batch], y[batch])
        noisy = noisy_clipped_sum(rows, dp.clip, dp.noise_multiplier)
        w = w - float(learning_rate) * (noisy / divisor + models.penalty_gradient(w, l2))
    return w
