"""The secure-sum layout: vector, split, sensitivity (brute force), noise variances, grid."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from scipy import stats as st

from fednipype.contract.calibration import analytic_gaussian_sigma
from fednipype.contract.request import REQUEST_SCHEMA, AnalysisRequest
from fednipype.contract.secure_sum import (
    DEFAULT_CAPACITY,
    MAX_ABS_ERROR,
    Grid,
    SumLayout,
    dp_sigma,
)
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import RequestError

DOC = {
    "schema": REQUEST_SCHEMA,
    "request_id": "layout-test",
    "sites": ["site-a", "site-b", "site-c"],
    "model": {
        "response": "volume_mm3",
        "numeric": ["age", "tiv"],
        "categorical": {"sex": ["F", "M"], "group": ["control", "patient", "other"]},
    },
    "regions": ["L_P01", "R_P01"],
    "bounds": {"covariates": {"age": [18, 90], "tiv": [1, 2]}, "regions": {"default": [0, 1]}},
    "mode": "dp",
    "epsilon": 1.0,
    "delta": 1e-5,
    "max_dropouts": 0,
    "min_sites": 2,
    "max_participants": 1000,
}


def request(**changes) -> AnalysisRequest:
    doc = copy.deepcopy(DOC)
    doc.update(changes)
    return AnalysisRequest.from_json(json.dumps(doc), source="req.json")


def random_rows(rng, layout: SumLayout, n: int, corners: bool = False):
    """Scaled design rows (intercept 1, numeric in [-1, 1], dummies ±1) and responses."""
    c = layout.c
    dummy = np.array([t in layout.dummies for t in layout.terms[1:]])
    if corners:
        z = rng.choice([-1.0, 1.0], size=(n, c))
        y = rng.choice([-1.0, 1.0], size=(n, layout.r))
    else:
        z = rng.uniform(-1, 1, size=(n, c))
        z[:, dummy] = rng.choice([-1.0, 1.0], size=(n, int(dummy.sum())))
        y = rng.uniform(-1, 1, size=(n, layout.r))
    return np.column_stack([np.ones(n), z]), y


def statistics(layout: SumLayout, z: np.ndarray, y: np.ndarray) -> SufficientStatistics:
    return SufficientStatistics(
        layout.terms, layout.regions, z.T @ z, z.T @ y, (y**2).sum(0), n=len(z)
    )


def test_layout_sizes_and_labels():
    layout = SumLayout.from_request(request())
    # terms: intercept, age, tiv, group[other], group[patient], sex[M]: c = 5, 3 dummies
    assert layout.c == 5 and layout.r == 2 and layout.k == 3
    assert layout.slot_size == 1 + 5 + 2
    assert layout.shared_size == 5 * 6 // 2 - 3 + 5 * 2 + 2
    assert layout.size == 3 * layout.slot_size + layout.shared_size == len(layout.labels())
    assert len(set(layout.labels())) == layout.size
    assert "ztz:age:age" in layout.labels() and "ztz:sex[M]:sex[M]" not in layout.labels()


def test_site_vectors_sum_and_split_to_the_pooled_pieces():
    rng = np.random.default_rng(1)
    layout = SumLayout.from_request(request())
    sites = [random_rows(rng, layout, n) for n in (30, 45, 12)]
    total = sum(
        layout.site_vector(statistics(layout, z, y), slot) for slot, (z, y) in enumerate(sites)
    )
    parts = layout.split(total)
    for k, (z, y) in enumerate(sites):
        assert parts.n[k] == len(z)
        np.testing.assert_allclose(parts.z[k], z[:, 1:].sum(0), rtol=1e-12)
        np.testing.assert_allclose(parts.y[k], y.sum(0), rtol=1e-12)
    zc = np.vstack([z[:, 1:] for z, _ in sites])
    ys = np.vstack([y for _, y in sites])
    ztz = zc.T @ zc
    dummies = [layout.terms.index(d) - 1 for d in layout.dummies]
    ztz[dummies, dummies] = 0.0  # not sent: n
    np.testing.assert_allclose(parts.ztz, ztz, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parts.zty, zc.T @ ys, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parts.yty, (ys**2).sum(0), rtol=1e-12)
    # a site writes only its slot and the shared block
    one = layout.site_vector(statistics(layout, *sites[1]), 1)
    mask = np.zeros(layout.size, bool)
    mask[layout.slot_range(1)] = True
    mask[layout.shared_range] = True
    assert not one[~mask].any() and np.count_nonzero(one) <= layout.site_dim
    with pytest.raises(RequestError, match="noise-free"):
        noisy = statistics(layout, *sites[0])
        layout.site_vector(
            SufficientStatistics(
                noisy.terms, noisy.regions, noisy.ztz, noisy.zty, noisy.yty, 3, zty_noise_var=1
            ),
            0,
        )
    with pytest.raises(RequestError, match="expected a vector of"):
        layout.split(total[:-1])


@pytest.mark.parametrize("corners", [False, True])
def test_sensitivity_against_brute_force(corners):
    """max over bounded participants of ||v(D ∪ {x}) − v(D)|| never exceeds Δ, reaches it."""
    rng = np.random.default_rng(2)
    layout = SumLayout.from_request(request())
    z, y = random_rows(rng, layout, 20)
    base = layout.site_vector(statistics(layout, z, y), 2)
    xz, xy = random_rows(rng, layout, 2000, corners=corners)
    norms = []
    for i in range(len(xz)):
        added = layout.site_vector(
            statistics(layout, np.vstack([z, xz[i]]), np.vstack([y, xy[i]])), 2
        )
        norms.append(np.linalg.norm(added - base))
    delta = layout.sensitivity
    # Δ² is the number of entries a site writes (each changes by a product of |values| <= 1)
    assert math.isclose(delta**2, layout.site_dim, rel_tol=1e-12)
    assert max(norms) <= delta * (1 + 1e-12)
    if corners:
        np.testing.assert_allclose(max(norms), delta, rtol=1e-12)
    else:
        assert max(norms) > 0.5 * delta


def test_noise_variances_match_simulated_noise():
    """Per-entry variances of the sum for each mode against noise drawn as each mode adds it."""
    rng = np.random.default_rng(3)
    layout = SumLayout.from_request(request())
    sigma, reps = 2.0, 4000
    contributing = [0, 2]
    own = np.zeros((layout.k, layout.size), bool)
    for s in range(layout.k):
        own[s, layout.slot_range(s)] = True
        own[s, layout.shared_range] = True
    for mode in ("dp", "distributed-dp"):
        total = np.zeros((reps, layout.size))
        for s in contributing:
            noise = rng.normal(0, sigma, (reps, layout.size))
            total += noise * own[s] if mode == "dp" else noise
        stated = layout.noise_variance(mode, sigma, contributing)
        empirical = total.var(axis=0, ddof=1)
        zero = stated == 0
        assert np.all(empirical[zero] == 0)
        # chi-square test of each entry's variance; Bonferroni over entries, 1 % false alarms
        chi = (reps - 1) * empirical[~zero] / stated[~zero]
        p = 2 * np.minimum(st.chi2.cdf(chi, reps - 1), st.chi2.sf(chi, reps - 1))
        assert p.min() > 0.01 / p.size
    assert not layout.noise_variance("exact", 0.0, [0, 1, 2]).any()
    with pytest.raises(RequestError, match="unknown mode"):
        layout.noise_variance("central", 1.0, [0])


def test_dp_sigma_is_the_analytic_gaussian_of_the_layout_sensitivity():
    req = request()
    layout = SumLayout.from_request(req)
    assert dp_sigma(req) == analytic_gaussian_sigma(1.0, 1e-5, layout.sensitivity)


def test_grid_fits_capacity_and_sums_within_its_error():
    rng = np.random.default_rng(4)
    req = request()
    layout = SumLayout.from_request(req)
    grid = Grid.for_request(req)
    assert math.frexp(grid.step)[0] == 0.5  # a power of two
    assert req.k * grid.bound <= DEFAULT_CAPACITY
    assert grid.bound * grid.step >= req.max_participants + 20 * dp_sigma(req)
    # the finest such grid: half the step would not fit
    assert req.k * math.ceil((grid.bound - 1) * 2) > DEFAULT_CAPACITY - req.k
    sites = [random_rows(rng, layout, n) for n in (1000, 700, 999)]
    vectors = [
        layout.site_vector(statistics(layout, z, y), slot) for slot, (z, y) in enumerate(sites)
    ]
    # noise at the dp sd, as a site adds it before rounding
    vectors = [v + rng.normal(0, dp_sigma(req), v.size) for v in vectors]
    integers = [grid.encode(v) for v in vectors]
    assert all(np.abs(i).max() <= grid.bound for i in integers)
    decoded = grid.decode(np.sum(integers, axis=0))
    plain = np.sum(vectors, axis=0)
    assert np.abs(decoded - plain).max() <= grid.max_error(req.k) <= MAX_ABS_ERROR
    big = np.abs(plain) >= 1e-3
    assert (np.abs(decoded - plain)[big] / np.abs(plain[big])).max() <= 1e-6


def test_grid_sensitivity_after_rounding_brute_force():
    """||round(v(D ∪ {x})/step) − round(v(D)/step)|| <= Δ/step + √d, on a coarse grid."""
    rng = np.random.default_rng(5)
    layout = SumLayout.from_request(request())
    grid = Grid(2.0**-3, 10**6)
    z, y = random_rows(rng, layout, 15)
    base = grid.encode(layout.site_vector(statistics(layout, z, y), 0))
    xz, xy = random_rows(rng, layout, 1000, corners=True)
    bound = grid.sensitivity(layout.sensitivity, layout.site_dim)
    worst = 0.0
    for i in range(len(xz)):
        v = layout.site_vector(statistics(layout, np.vstack([z, xz[i]]), np.vstack([y, xy[i]])), 0)
        worst = max(worst, float(np.linalg.norm(grid.encode(v) - base)))
    assert 0.95 * layout.sensitivity / grid.step < worst <= bound


def test_grid_limits_are_refused():
    with pytest.raises(RequestError, match="req.json: 3 sites x max_participants 10000000"):
        Grid.for_request(request(max_participants=10_000_000, delta=1e-8))
    with pytest.raises(RequestError, match="power of two"):
        Grid(0.3, 10)
    with pytest.raises(RequestError, match="bound"):
        Grid(0.5, 0)
    with pytest.raises(RequestError, match="expected integers"):
        Grid(0.5, 10).decode([1.5])
    exact = Grid.for_request(request(mode="exact", epsilon=None, delta=None, min_sites=3))
    assert exact.bound * exact.step >= 1000
