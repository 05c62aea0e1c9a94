"""Training in mode ``distributed-dp``: the request's rules, the accounting against
dp-accounting, the site's discrete Gaussian share (real OpenDP sampler, tested statistically),
the integer codec through the transport, the hub's FedSGD step against FedAvg of one-step
site updates, and a real bundled site's charge, reply and refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats
from test_site_training import REGIONS, W0, Site, charges, held_out, request
from test_site_training import site as site  # noqa: F401  (the fixture)

from fednipype.contract.distributed_dp import calibrate_training
from fednipype.exceptions import FederationError, PolicyError, RequestError
from fednipype.federated.app.training_codec import (
    FixedPointCodec,
    GradientCodec,
    codec_for_request,
)
from fednipype.learn.fedavg import fedavg, fedsgd_step
from fednipype.site import approvals, dpsgd
from fednipype.site.training import train_round

DISTRIBUTED = {"mode": "distributed-dp", "local_steps": 1, "sampling_rate": 1.0}
BOTH_MODES = '\n[federation]\nmodes = ["training-dp", "training-distributed-dp"]\n'
#: The Rényi orders fednipype documents for the distributed bound (1.011 to 1e5).
ORDERS = list(1.0 + np.geomspace(0.011, 1e5, 1500))
#: Two-sided false-alarm rate of every statistical check here.
ALPHA = 1e-6


def independent_epsilon(noise, rounds: int, delta: float) -> float:
    """dp-accounting's RDP accountant: ``rounds`` Gaussians of multiplier √n σ / Δ₂ (the
    bound at τ = 0) composed with the count's Gaussian."""
    accountant = rdp.RdpAccountant(orders=ORDERS)
    multiplier = math.sqrt(noise.n_honest) * noise.sigma_site / noise.l2_sensitivity
    accountant.compose(dp_accounting.GaussianDpEvent(multiplier), rounds)
    accountant.compose(dp_accounting.GaussianDpEvent(noise.count_noise_multiplier))
    return accountant.get_epsilon(delta)


# -- the request ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [({"local_steps": 5}, "field local_steps"), ({"sampling_rate": 0.5}, "field sampling_rate")],
)
def test_distributed_requests_are_one_full_batch_gradient_per_round(change, field):
    request(**DISTRIBUTED)  # valid
    with pytest.raises(RequestError) as err:
        request(**{**DISTRIBUTED, **change})
    text = str(err.value)
    assert text.startswith("train.json: field") and field in text and "\n" not in text


@pytest.mark.parametrize(
    ("epsilon", "rounds", "dim", "n_honest"),
    [(1.0, 20, 101, 10), (4.0, 3, 5, 2), (8.0, 100, 11, 5), (0.5, 1, 3, 3)],
)
def test_the_charge_is_dp_accountings_epsilon_of_the_rounds_and_the_count(
    epsilon, rounds, dim, n_honest
):
    noise = calibrate_training(epsilon, 1e-5, 1.0, dim, rounds, n_honest)
    assert noise.tau == 0.0  # σ_site is thousands of grid units: the correction vanishes
    assert noise.l2_sensitivity == 2**16 + math.sqrt(dim)
    assert noise.sigma_central == pytest.approx(math.sqrt(n_honest) * noise.sigma_site)
    reference = independent_epsilon(noise, rounds, 1e-5)
    assert noise.epsilon == pytest.approx(reference, rel=1e-9)
    assert 0.99 * epsilon <= noise.epsilon <= epsilon
    # The count's multiplier alone costs 5 % of epsilon: calibrated on the integer orders of
    # fednipype.learn.accountant, within 5 % of that by dp-accounting's default orders (the
    # run's total above is the exact check).
    count = rdp.RdpAccountant().compose(
        dp_accounting.GaussianDpEvent(noise.count_noise_multiplier)
    )
    assert count.get_epsilon(1e-5) == pytest.approx(0.05 * epsilon, rel=0.05)
    # One site's own share is a discrete Gaussian of σ_site: its floor is n_honest-fold weaker.
    alone = rdp.RdpAccountant(orders=ORDERS)
    alone.compose(dp_accounting.GaussianDpEvent(noise.sigma_site / noise.l2_sensitivity), rounds)
    alone.compose(dp_accounting.GaussianDpEvent(noise.count_noise_multiplier))
    assert noise.local_floor_epsilon == pytest.approx(alone.get_epsilon(1e-5), rel=1e-9)
    assert noise.local_floor_epsilon >= noise.epsilon


def test_more_honest_sites_share_the_same_central_noise():
    few, many = (calibrate_training(4.0, 1e-5, 1.0, 11, 20, n) for n in (2, 8))
    assert few.sigma_central == pytest.approx(many.sigma_central, rel=1e-3)
    assert many.sigma_site == pytest.approx(few.sigma_site / 2.0, rel=1e-3)
    req = request(**DISTRIBUTED)
    assert req.spent() == (req.distributed_noise().epsilon, 1e-5)
    assert req.distributed_noise().n_honest == req.min_sites


# -- the site's share ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_share_is_the_clipped_sum_on_the_grid_plus_discrete_gaussian_noise():
    """400 shares of a 60 × 5 gradient matrix through OpenDP's sampler: the residuals from the
    clipped sum (numpy) are integers with mean 0 and variance σ² (χ² on 2,000 values), each
    test at a two-sided false-alarm rate of 1e-6."""
    rng = np.random.default_rng(7)
    rows = rng.normal(0.0, 0.8, (60, 5))
    clip, step, sigma = 1.0, 1.0 / 2**16, 2500.5
    norms = np.linalg.norm(rows, axis=1)
    assert (norms > clip).any() and (norms < clip).any()
    exact = np.rint((rows * np.minimum(1.0, clip / norms)[:, None]).sum(axis=0) / step)
    draws = np.array([dpsgd.discrete_gaussian_share(rows, clip, step, sigma) for _ in range(400)])
    assert draws.dtype == np.int64
    residual = (draws - exact).reshape(-1).astype(float)
    n = residual.size
    z = stats.norm.isf(ALPHA / 2)
    assert abs(residual.mean()) < z * sigma / math.sqrt(n)
    chi2 = float(np.sum(residual**2) / sigma**2)
    assert stats.chi2.ppf(ALPHA / 2, n) < chi2 < stats.chi2.isf(ALPHA / 2, n)


# -- the codec and the hub's step -------------------------------------------------------------


def test_the_codec_sums_exactly_through_the_transport_and_refuses_another_config():
    req = request(**DISTRIBUTED)
    codec = codec_for_request(req)
    assert isinstance(codec, GradientCodec)
    assert isinstance(codec_for_request(request()), FixedPointCodec)
    noise = req.distributed_noise()
    assert codec.share_bound >= 1000 * 2**16 + 20 * noise.sigma_site
    rng = np.random.default_rng(3)
    shares = [rng.integers(-(6 * 10**7), 6 * 10**7, 5) for _ in range(3)]
    weights = [101.3, 55.75, 240.0]
    encoding = codec.encoding()
    total = encoding.plain_sum(
        [encoding.encode(codec.encode(s, m)) for s, m in zip(shares, weights, strict=True)]
    )
    assert np.array_equal(codec.gradient_sum(total), np.sum(shares, axis=0) * noise.grid_step)
    assert codec.total_weight(total) == pytest.approx(sum(weights), abs=3 * 2**-20)
    codec.check_config(codec.config())
    with pytest.raises(FederationError, match="fit config: grid-step"):
        codec.check_config({**codec.config(), "grid-step": 2 * noise.grid_step})
    with pytest.raises(FederationError, match="expected 5 integers"):
        codec.encode(np.zeros(5), 10.0)


def test_the_fedsgd_step_is_fedavg_of_each_sites_one_step_update():
    """FedAvg (weights = row counts) of each site's one full-batch gradient step equals the
    hub's step from the summed gradients: the identity distributed-dp relies on."""
    rng = np.random.default_rng(11)
    w = rng.normal(0.0, 0.3, 4)
    lr, l2, updates, weights, grads = 0.4, 1e-2, [], [], []
    for n in (40, 90, 25):
        X, y = rng.uniform(-1, 1, (n, 3)), rng.uniform(-1, 1, n)
        design = np.column_stack([np.ones(n), X])
        g = ((design @ w - y)[:, None] * design).sum(axis=0)  # least squares, by hand
        penalty = np.r_[0.0, l2 * w[1:]]
        updates.append(n * (w - lr * (g / n + penalty)))
        weights.append(n)
        grads.append(g)
        local = dpsgd.local_update("brain-age", w, X, y, learning_rate=lr, local_steps=1,
                                   l2=l2, dp=None)  # fmt: skip
        assert np.allclose(local, updates[-1] / n, rtol=1e-12, atol=1e-14)
    averaged = fedavg(np.sum(updates, axis=0), sum(weights))
    stepped = fedsgd_step(w, np.sum(grads, axis=0), sum(weights), learning_rate=lr, l2=l2)
    assert np.allclose(stepped, averaged, rtol=1e-12, atol=1e-14)


# -- a real site ----------------------------------------------------------------------------------


@pytest.fixture
def both(tmp_path, site_policy, bundled_derivatives) -> Site:
    return Site(tmp_path / "d", site_policy, bundled_derivatives["siteA"], federation=BOTH_MODES)


@pytest.mark.timeout(300)
def test_a_site_charges_the_run_once_and_sends_integer_shares(both):
    req = request(**DISTRIBUTED)
    approvals.approve(both.ledger, req)
    first = train_round(req, both.config, W0, 1)
    assert first.w_local is None and first.metrics is None
    assert first.share.dtype == np.int64 and first.share.shape == (len(REGIONS) + 1,)
    ((epsilon, delta, multiplier),) = charges(both.ledger)
    noise = req.distributed_noise()
    assert epsilon == pytest.approx(independent_epsilon(noise, 3, 1e-5), rel=1e-9)
    assert delta == 1e-5 and multiplier is None and epsilon <= 2.0
    (record,) = both.ledger.audit_trail()
    recorded = record.parameters["distributed_noise"]
    assert recorded["sigma_site"] == noise.sigma_site and recorded["n_honest"] == 2
    assert recorded["local_floor_epsilon"] > epsilon
    # The share is the clipped gradient sum at W0 (numpy, from the files) plus its noise.
    rows = both.raw_rows("brain-age")
    train = rows[~held_out(rows.index, 0.25, req.content_hash)]
    x = np.clip(train[REGIONS].to_numpy(float) / 12000.0 * 2.0 - 1.0, -1.0, 1.0)
    y = np.clip((train["label"].to_numpy(float) - 18.0) / 72.0 * 2.0 - 1.0, -1.0, 1.0)
    design = np.column_stack([np.ones(len(y)), x])
    gradients = (design @ W0 - y)[:, None] * design
    norms = np.linalg.norm(gradients, axis=1)
    exact = (gradients * np.minimum(1.0, 1.0 / norms)[:, None]).sum(axis=0) / noise.grid_step
    z = stats.norm.isf(ALPHA / 2 / len(exact))  # every coordinate, Bonferroni
    assert np.all(np.abs(first.share - exact) < z * noise.sigma_site + 1)
    second = train_round(req, both.config, W0, 2)
    assert second.weight == first.weight and len(charges(both.ledger)) == 1
    assert not np.array_equal(second.share, first.share)  # fresh noise every round


@pytest.mark.timeout(300)
def test_a_policy_without_the_mode_refuses_before_any_charge(site):
    req = request(**DISTRIBUTED)
    approvals.approve(site.ledger, req)
    text = site.refusal(lambda: train_round(req, site.config, W0, 1), PolicyError)
    assert "'training-distributed-dp' is not in [federation] modes" in text
    assert charges(site.ledger) == [] and site.ledger.audit_trail() == []


def test_secure_aggregation_cannot_be_turned_off(tmp_path):
    from fednipype.federated.training import run_federated_training

    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(request(**DISTRIBUTED).to_document()), encoding="utf-8")
    with pytest.raises(FederationError, match="secure aggregation cannot be turned off"):
        run_federated_training(path, tmp_path / "out", sites=[{"site": "siteA"}],
                               secure_aggregation=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["dp", "distributed-dp"])
def test_a_site_without_one_usable_row_is_charged_and_sends_noise_only(
    tmp_path, site_policy, bundled_derivatives, mode
):
    """Every age missing: the site has no training row. It cannot tell the hub so without
    a data-dependent refusal, so it answers like any site: charged once, its weight the
    noisy count of zero rows (floored at 1), its reply noise around nothing."""
    site = Site(tmp_path / "z", site_policy, bundled_derivatives["siteA"], federation=BOTH_MODES)
    people = site.participants()
    people["age"] = "n/a"
    site.write_participants(people)
    req = request(**DISTRIBUTED) if mode == "distributed-dp" else request()
    approvals.approve(site.ledger, req)
    reply = train_round(req, site.config, W0, 1)
    assert len(charges(site.ledger)) == 1
    sigma_count = req.noise()[1]
    assert 1.0 <= reply.weight < stats.norm.isf(ALPHA) * sigma_count + 1
    if mode == "distributed-dp":
        sigma = req.distributed_noise().sigma_site
        z = stats.norm.isf(ALPHA / 2 / reply.share.size)
        assert np.all(np.abs(reply.share) < z * sigma)
    else:
        assert np.all(np.isfinite(reply.w_local))
