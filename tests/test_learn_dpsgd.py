"""DP-SGD at a site and its accountant: the ε against dp-accounting called directly, the
calibration, OpenDP's noise level, clipping and the CSPRNG Poisson sample."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

from fednipype.exceptions import DataError
from fednipype.learn import accountant, models
from fednipype.learn.fedavg import gradient_descent
from fednipype.site import dpsgd

#: False-alarm rate of every statistical check here (two-sided where a band is checked).
ALPHA = 1e-6

CASES = [(0.1, 1.3, 100, 20.0), (0.02, 0.8, 1000, 9.0), (0.5, 4.0, 30, 60.0)]


#: The Rényi orders the module documents (integers 2-64, a sparser grid to 1024).
ORDERS = [float(a) for a in [*range(2, 65), 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024]]


def independent_epsilon(q, sigma, steps, sigma_count, delta):
    """dp-accounting's RDP accountant composing the same mechanisms, built here."""
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc.compose(dp_accounting.GaussianDpEvent(sigma_count))
    return acc.get_epsilon(delta)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("q", "sigma", "steps", "sigma_count"), CASES)
def test_training_epsilon_is_dp_accountings(q, sigma, steps, sigma_count):
    delta = 1e-5
    expected = independent_epsilon(q, sigma, steps, sigma_count, delta)
    assert accountant.training_epsilon(q, sigma, steps, sigma_count, delta) == pytest.approx(
        expected, rel=1e-12
    )
    # the event is the composition the module documents
    event = accountant.training_event(q, sigma, steps, sigma_count)
    assert event == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            ),
            dp_accounting.GaussianDpEvent(sigma_count),
        ]
    )
    # and the count alone is the Gaussian mechanism's exact bound or looser (RDP)
    from dp_accounting import gaussian_mechanism  # noqa: PLC0415

    exact = gaussian_mechanism.get_epsilon_gaussian(sigma_count, delta)
    assert accountant.count_epsilon(sigma_count, delta) >= exact * (1 - 1e-9)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_calibration_meets_the_target_within_one_percent(epsilon):
    delta, q, steps = 1e-5, 0.1, 150
    accountant.calibrate_noise_multiplier.cache_clear()
    sigma, sigma_count = accountant.calibrate_noise_multiplier(epsilon, delta, q, steps)
    spent = independent_epsilon(q, sigma, steps, sigma_count, delta)
    assert 0.99 * epsilon <= spent <= epsilon
    # the count's share: its own ε is 5 % of the target (within 1 %), by the same accountant
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(dp_accounting.GaussianDpEvent(sigma_count))
    assert 0.99 * 0.05 * epsilon <= acc.get_epsilon(delta) <= 0.05 * epsilon
    # deterministic: the hub and every site derive the same numbers
    accountant.calibrate_noise_multiplier.cache_clear()
    assert accountant.calibrate_noise_multiplier(epsilon, delta, q, steps) == (sigma, sigma_count)


@pytest.mark.timeout(30)
def test_accountant_refuses_bad_numbers():
    with pytest.raises(DataError, match="sampling_rate"):
        accountant.training_epsilon(0.0, 1.0, 10, 5.0, 1e-5)
    with pytest.raises(DataError, match="steps"):
        accountant.training_epsilon(0.1, 1.0, 0, 5.0, 1e-5)
    with pytest.raises(DataError, match="epsilon"):
        accountant.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10)
    with pytest.raises(DataError, match="dp/clip"):
        accountant.DPConfig(clip=0.0, noise_multiplier=1.0, sampling_rate=0.1, expected_n=10)


def variance_band(n: int) -> tuple[float, float]:
    """Two-sided band of Σx²/σ² for n independent N(0, σ²) draws, false alarm ALPHA."""
    return stats.chi2.ppf(ALPHA / 2, n), stats.chi2.ppf(1 - ALPHA / 2, n)


@pytest.mark.timeout(60)
def test_noise_of_the_sum_has_the_calibrated_sd():
    """Zero gradients: the released sum is the noise alone; its SD is σ·C (χ² band)."""
    clip, sigma, p, draws = 0.7, 2.5, 200, 100
    zeros = np.zeros((5, p))
    noise = np.concatenate([dpsgd.noisy_clipped_sum(zeros, clip, sigma) for _ in range(draws)])
    n = noise.size
    lo, hi = variance_band(n)
    assert lo <= np.sum(noise**2) / (sigma * clip) ** 2 <= hi
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(noise.mean()) <= z * sigma * clip / np.sqrt(n)
    # independent coordinates: lag-1 correlation within the null band
    r = np.corrcoef(noise[:-1], noise[1:])[0, 1]
    assert abs(r) <= z / np.sqrt(n)


@pytest.mark.timeout(60)
def test_noisy_count_has_the_calibrated_sd_and_is_floored():
    sigma, n, draws = 12.0, 500, 2000
    counts = np.array([dpsgd.noisy_count(n, sigma) for _ in range(draws)])
    lo, hi = variance_band(draws)
    assert lo <= np.sum((counts - n) ** 2) / sigma**2 <= hi
    assert abs(counts.mean() - n) <= stats.norm.ppf(1 - ALPHA / 2) * sigma / np.sqrt(draws)
    assert min(dpsgd.noisy_count(0, 50.0) for _ in range(50)) >= 1.0
    with pytest.raises(DataError, match="count"):
        dpsgd.noisy_count(-1, 1.0)


@pytest.mark.timeout(30)
def test_clipping_bounds_each_participants_contribution():
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 1, (300, 11)) * rng.choice([0.01, 1.0, 100.0], (300, 1))
    clip = 1.5
    clipped = dpsgd.clip_rows(rows, clip)
    norms = np.linalg.norm(clipped, axis=1)
    assert np.all(norms <= clip * (1 + 1e-12))
    short = np.linalg.norm(rows, axis=1) <= clip
    np.testing.assert_array_equal(clipped[short], rows[short])  # short rows untouched
    long = ~short
    np.testing.assert_allclose(norms[long], clip)
    cos = np.sum(clipped[long] * rows[long], axis=1) / (
        norms[long] * np.linalg.norm(rows[long], axis=1)
    )
    np.testing.assert_allclose(cos, 1.0)  # same direction
    # add/remove one participant moves the clipped sum by at most the clip norm
    total = clipped.sum(axis=0)
    for i in range(0, 300, 7):
        assert np.linalg.norm(total - np.delete(clipped, i, axis=0).sum(axis=0)) <= clip + 1e-9


@pytest.mark.timeout(30)
def test_poisson_sample_has_the_sampling_rate():
    n, q = 200_000, 0.1
    mask = dpsgd.poisson_sample(n, q)
    assert mask.dtype == bool and mask.shape == (n,)
    lo, hi = stats.binom.ppf(ALPHA / 2, n, q), stats.binom.ppf(1 - ALPHA / 2, n, q)
    assert lo <= mask.sum() <= hi
    assert dpsgd.poisson_sample(0, q).shape == (0,)
    assert dpsgd.poisson_sample(1000, 1.0).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task", models.TASKS)
def test_dp_update_without_clipping_or_sampling_is_gradient_descent_plus_small_noise(task):
    """q = 1, a clip no gradient reaches, ñ = n, tiny σ: DP-SGD's arithmetic is plain GD's."""
    rng = np.random.default_rng(6)
    Xs = rng.uniform(-1, 1, (80, 6))
    y = rng.uniform(-1, 1, 80) if task == "brain-age" else (rng.uniform(size=80) < 0.4) * 1.0
    w0 = rng.normal(0, 0.3, 7)
    config = accountant.DPConfig(clip=1e3, noise_multiplier=1e-9, sampling_rate=1.0, expected_n=80)
    dp_w = dpsgd.local_update(
        task, w0, Xs, y, learning_rate=0.3, local_steps=10, l2=0.01, dp=config
    )
    plain = gradient_descent(task, w0, Xs, y, learning_rate=0.3, local_steps=10, l2=0.01)
    np.testing.assert_allclose(dp_w, plain, atol=1e-6)
    assert np.array_equal(
        dpsgd.local_update(task, w0, Xs, y, learning_rate=0.3, local_steps=10, l2=0.01, dp=None),
        plain,
    )


@pytest.mark.timeout(30)
def test_dp_update_refuses_nan_before_drawing_noise():
    Xs = np.zeros((10, 3))
    Xs[4, 1] = np.nan
    config = accountant.DPConfig(clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, expected_n=10)
    with pytest.raises(DataError, match=r"features: 1 missing .*row 4, column 1"):
        dpsgd.local_update(
            "brain-age", np.zeros(4), Xs, np.zeros(10), learning_rate=0.1, local_steps=3,
            l2=0.0, dp=config,
        )  # fmt: skip
    with pytest.raises(DataError, match="batch_size"):
        dpsgd.local_update(
            "brain-age", np.zeros(4), np.zeros((10, 3)), np.zeros(10), learning_rate=0.1,
            local_steps=3, l2=0.0, dp=config, batch_size=5,
        )  # fmt: skip
