"""Federated training of the bundled sites in Flower's simulation: real sites, real ledgers.

The installed app (check round, FedAvg rounds through SecAgg+) runs through
:func:`fednipype.federated.training.run_federated_training` in a ``flower-superlink
--simulation`` with one simulated SuperNode per site, each with the site's real node config:
its policy (``[federation] modes = ["training-dp"]``, ``allow_non_dp_training = true``), its
SQLite ledger, its owner's approval of the request, its participants table and extracted
regional features. Two runs serve the module:

- **non-DP diagnosis** on siteA, siteB, a copy of siteC with one participant's feature NaN and
  another's group missing (both left out at the site), and a copy of siteC whose participants
  are all controls (a single-class site: it trains, its AUC is not reported). The final
  parameters equal :func:`fednipype.learn.fedavg.run_fedavg` on the rows read here with pandas
  (first session, complete rows, the request-keyed held-out split), within the fixed-point
  tolerance.
- **DP brain-age** on siteA, siteB, siteC, a site whose budget cannot cover the run (refused at
  the check, nothing charged) and a site whose feature tables lack a requested region
  (refused at the check with the region named). The three others complete, and each of their
  ledgers holds exactly one charge: dp-accounting's RDP epsilon of the request's sampled
  Gaussian steps composed with the noisy count, computed here.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dp_accounting import (
    ComposedDpEvent,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
)
from dp_accounting.rdp import RdpAccountant
from support import BUNDLED

from fednipype.contract.training import TrainingRequest
from fednipype.federated.app.training_codec import FixedPointCodec
from fednipype.federated.training import run_federated_training
from fednipype.learn.accountant import ORDERS
from fednipype.learn.fedavg import SiteData, holdout_split, run_fedavg
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

REGIONS = ["L_P01", "R_P01", "L_P12", "R_P33"]
FEDERATION = (
    '\n[federation]\nmodes = ["training-dp", "training-distributed-dp"]\n'
    "allow_non_dp_training = true\n"
)
#: siteD's policy allows DP-SGD training but not distributed-DP training.
LOCAL_ONLY = '\n[federation]\nmodes = ["training-dp"]\n'


def request_doc(request_id: str, sites: list[str], mode: str, task: str, **changes) -> dict:
    dp = mode != "none"
    return {
        "schema": "fednipype-training-request/1.0",
        "request_id": request_id,
        "sites": sites,
        "task": task,
        "regions": REGIONS,
        "bounds": {"regions": {"default": [0, 12000]}}
        | ({"label": [18, 90]} if task == "brain-age" else {}),
        "mode": mode,
        "epsilon": 8.0 if dp else None,
        "delta": 1e-5 if dp else None,
        "rounds": 2,
        "local_steps": 3,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": 0.5 if dp else None,
        "clip": 1.0 if dp else None,
        "holdout_fraction": 0.25,
        "min_sites": 2,
        "max_participants": 1000,
    } | changes


def raw_rows(bids: Path, derivatives: Path) -> pd.DataFrame:
    """One row per participant (first session) with its participants.tsv columns and volumes."""
    volumes = {}
    for path in sorted(derivatives.rglob("*_desc-regional_features.tsv")):
        subject = path.name.split("_")[0]
        if subject not in volumes:
            table = pd.read_csv(path, sep="\t", na_values=["n/a"]).set_index("name")
            volumes[subject] = table["volume_mm3"].reindex(REGIONS)
    features = pd.DataFrame(volumes).T.rename_axis("participant_id").reset_index()
    people = pd.read_csv(bids / "participants.tsv", sep="\t", na_values=["n/a"])
    return people.merge(features, on="participant_id")


def site_data(name: str, rows: pd.DataFrame, request: TrainingRequest) -> SiteData:
    """The site's training rows: complete rows, the request-keyed split's training part."""
    label = "age" if request.task == "brain-age" else "group"
    rows = rows[rows[label].isin(["patient", "control"]) if label == "group" else rows[label] > 0]
    rows = rows.dropna(subset=[label, *REGIONS])
    y = rows["age"].to_numpy(float) if label == "age" else (rows["group"] == "patient") * 1.0
    held = holdout_split(list(rows["participant_id"]), request.holdout_fraction,
                         request.content_hash)  # fmt: skip
    return SiteData(name, rows[REGIONS].to_numpy(float)[~held], np.asarray(y, float)[~held])


@pytest.fixture(scope="module")
def world(tmp_path_factory, bundled_derivatives):
    """Site folders (real policies and ledgers; modified copies of siteC) and the node configs."""
    root = tmp_path_factory.mktemp("training-sites")
    data = {s: (BUNDLED / s, bundled_derivatives[s]) for s in ("siteA", "siteB", "siteC")}

    def copy(name: str, source: str) -> tuple[Path, Path]:
        bids, deriv = root / "data" / name / "bids", root / "data" / name / "derivatives"
        bids.mkdir(parents=True)
        shutil.copy(BUNDLED / source / "participants.tsv", bids / "participants.tsv")
        shutil.copy(BUNDLED / source / "dataset_description.json", bids)
        shutil.copytree(bundled_derivatives[source], deriv)
        data[name] = (bids, deriv)
        return bids, deriv

    # siteN: one participant's feature NaN, another's group missing
    bids, deriv = copy("siteN", "siteC")
    people = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    people.loc[1, "group"] = "n/a"
    people.to_csv(bids / "participants.tsv", sep="\t", index=False)
    first = sorted(deriv.rglob(f"{people.loc[3, 'participant_id']}_*regional_features.tsv"))[0]
    table = pd.read_csv(first, sep="\t", dtype=str)
    table.loc[table["name"] == REGIONS[1], "volume_mm3"] = "n/a"
    table.to_csv(first, sep="\t", index=False)
    # siteS: a single class (every participant a control)
    bids, _ = copy("siteS", "siteC")
    people = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    people["group"] = "control"
    people.to_csv(bids / "participants.tsv", sep="\t", index=False)
    # siteR: its atlas lacks a requested region
    _, deriv = copy("siteR", "siteB")
    for path in deriv.rglob("*_desc-regional_features.tsv"):
        table = pd.read_csv(path, sep="\t", dtype=str)
        table[table["name"] != REGIONS[3]].to_csv(path, sep="\t", index=False)
    copy("siteX", "siteA")  # its budget does not cover the run
    copy("siteD", "siteA")  # its policy does not allow distributed-DP training

    nodes, policies = {}, {}
    for name, (bids, deriv) in data.items():
        folder = root / "sites" / name
        folder.mkdir(parents=True)
        budget = 0.5 if name == "siteX" else 20.0
        policy = folder / "policy.toml"
        federation = LOCAL_ONLY if name == "siteD" else FEDERATION
        policy.write_text(example_policy(dataset=name, total_epsilon=budget) + federation)
        init_ledger(policy)
        policies[name] = policy
        nodes[name] = {"site": name, "policy": str(policy), "bids-dir": str(bids),
                       "derivatives": str(deriv)}  # fmt: skip
    rows = {name: raw_rows(bids, deriv) for name, (bids, deriv) in data.items()}
    return {"root": root, "nodes": nodes, "policies": policies, "rows": rows}


def run(world, name: str, doc: dict):
    path = world["root"] / f"{name}.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    request = TrainingRequest.from_file(path)
    for site in doc["sites"]:
        ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(world["policies"][site]))
        approvals.approve(ledger, request, note="test")
    tic = time.monotonic()
    done = run_federated_training(
        path, world["root"] / name, sites=[world["nodes"][s] for s in doc["sites"]],
        timeout=500.0, round_timeout=60.0, check_timeout=120.0,
    )  # fmt: skip
    return request, done, time.monotonic() - tic


def charges(policy: Path) -> list[tuple[float, float]]:
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    with sqlite3.connect(ledger.path) as conn:
        return [tuple(r) for r in conn.execute("SELECT epsilon, delta FROM charge ORDER BY id")]


@pytest.mark.timeout(500)
def test_non_dp_diagnosis_equals_the_reference_with_bad_rows_and_a_single_class_site(world):
    sites = ["siteA", "siteB", "siteN", "siteS"]
    request, done, wall = run(
        world, "diagnosis-none", request_doc("dx", sites, "none", "diagnosis")
    )
    print(f"\nsimulation, non-DP diagnosis, 4 sites x 2 rounds: {wall:.1f} s; "
          f"rounds {done.record['timings_s']['rounds']}")  # fmt: skip
    record = done.record
    assert record["status"] == "completed"
    assert {r["site"]: r["status"] for r in record["sites"]} == dict.fromkeys(sites, "completed")
    data = [site_data(s, world["rows"][s], request) for s in sites]
    assert len(data[2].y) < len(site_data("siteC", world["rows"]["siteC"], request).y)
    ref = run_fedavg(data, "diagnosis", request.scaling, rounds=2, local_steps=3,
                     learning_rate=0.5, l2=1e-3)  # fmt: skip
    codec = FixedPointCodec.for_request(5, weight_bound=1000, param_bound=1000.0, n_sites=4)
    tol = 20 * codec.tolerance(sum(d.n for d in data), 10.0)
    w = np.asarray(record["w"])
    print(f"max |w - reference| = {np.abs(w - ref.w).max():.2e} (tolerance {tol:.1e})")
    assert np.abs(w - ref.w).max() <= tol
    last = record["rounds"][-1]
    assert last["total_weight"] == pytest.approx(sum(d.n for d in data), abs=1e-6)
    assert "auc" in last["site_metrics"]["siteA"] and "auc" not in last["site_metrics"]["siteS"]
    assert {"loss", "balanced_accuracy"} <= set(last["metrics"])
    assert record["privacy_spent"] is None
    from fednipype.learn.modelfile import load_model

    model = load_model(done.model)
    assert (
        list(model.classes_) == [0, 1]
        and model.predict_proba(world["rows"]["siteA"][REGIONS].dropna().to_numpy(float)).shape[1]
        == 2
    )


@pytest.mark.timeout(500)
def test_dp_brain_age_charges_each_ledger_the_accountants_epsilon_and_refusals_stay_clean(world):
    sites = ["siteA", "siteB", "siteC", "siteX", "siteR"]
    request, done, wall = run(world, "brain-age-dp", request_doc("ba", sites, "dp", "brain-age"))
    print(f"\nsimulation, DP brain-age, 5 sites (2 refuse) x 2 rounds: {wall:.1f} s")
    record = done.record
    status = {r["site"]: r["status"] for r in record["sites"]}
    assert status == {"siteA": "completed", "siteB": "completed", "siteC": "completed",
                      "siteX": "refused", "siteR": "refused"}  # fmt: skip
    reasons = {r["site"]: r["reason"] for r in record["sites"]}
    assert "budget" in reasons["siteX"] and REGIONS[3] in reasons["siteR"]
    assert all(not r["site_metrics"] and r["loss"] is None for r in record["rounds"])
    # The accountant's epsilon, computed here: RDP of the sampled Gaussian steps and the count.
    sigma, sigma_count = request.noise()
    event = ComposedDpEvent([
        SelfComposedDpEvent(PoissonSampledDpEvent(0.5, GaussianDpEvent(sigma)), 2 * 3),
        GaussianDpEvent(sigma_count),
    ])  # fmt: skip
    # dp-accounting's RDP accountant on the Renyi orders fednipype documents (integers, no
    # fractional orders); its default order grid (with fractional orders) gives a slightly
    # smaller epsilon, so the charge is the conservative one.
    epsilon = RdpAccountant(orders=list(ORDERS)).compose(event).get_epsilon(1e-5)
    finer = RdpAccountant().compose(event).get_epsilon(1e-5)
    assert finer <= epsilon <= 8.0 and epsilon < 1.02 * finer
    for site in ("siteA", "siteB", "siteC"):
        (charged,) = charges(world["policies"][site])
        assert charged[0] == pytest.approx(epsilon, rel=1e-6) and charged[1] == 1e-5
        spent = next(r for r in record["sites"] if r["site"] == site)["privacy_spent"]
        assert spent["epsilon"] == pytest.approx(epsilon, rel=1e-6)
    assert charges(world["policies"]["siteX"]) == [] and charges(world["policies"]["siteR"]) == []
    from fednipype.learn.modelfile import load_model

    model = load_model(done.model)
    ages = model.predict(world["rows"]["siteA"][REGIONS].dropna().to_numpy(float))
    assert np.all(np.isfinite(ages))


def clipped_gradient_sum(data: SiteData, request: TrainingRequest, w: np.ndarray) -> np.ndarray:
    """Σ of the rows' least-squares gradients ``(prediction − y)·[1, x]``, each clipped to L2
    norm ``clip``, with numpy on the scaled training rows."""
    lo, hi = 0.0, 12000.0
    x = np.clip((data.X - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
    y = np.clip((data.y - 18.0) / (90.0 - 18.0) * 2.0 - 1.0, -1.0, 1.0)
    design = np.column_stack([np.ones(len(y)), x])
    rows = (design @ w - y)[:, None] * design
    norms = np.linalg.norm(rows, axis=1)
    return (rows * np.minimum(1.0, request.clip / norms)[:, None]).sum(axis=0)


@pytest.mark.timeout(500)
def test_distributed_dp_steps_are_fedsgd_with_the_stated_noise_and_each_ledger_charged(world):
    """distributed-dp brain-age on siteA, siteB, siteC; siteD's policy does not allow the mode.

    Each round's hub step is compared with the noise-free FedSGD step computed here from the
    rows (numpy): the difference, in grid units, is the sum of the three contributors' discrete
    Gaussian shares, N(0, 3 σ_site²) per coordinate. Its χ² over 3 rounds × 5 coordinates (15
    df) is accepted within the two-sided 1e-6 false-alarm interval; absent noise (χ² ≈ 0)
    falls below it. Each ledger holds one charge: the Rényi bound composed over the rounds
    with the noisy count, checked against dp-accounting's RDP accountant (τ = 0)."""
    from scipy import stats

    sites = ["siteA", "siteB", "siteC", "siteD"]
    doc = request_doc("ba-ddp", sites, "distributed-dp", "brain-age", rounds=3, local_steps=1,
                      sampling_rate=1.0, learning_rate=0.5)  # fmt: skip
    before = {site: charges(world["policies"][site]) for site in sites}  # other tests' charges
    request, done, wall = run(world, "brain-age-ddp", doc)
    print(f"\nsimulation, distributed-DP brain-age, 4 sites (1 refuses) x 3 rounds: {wall:.1f} s")
    record = done.record
    status = {r["site"]: r["status"] for r in record["sites"]}
    assert status == {"siteA": "completed", "siteB": "completed", "siteC": "completed",
                      "siteD": "refused"}  # fmt: skip
    reason = next(r["reason"] for r in record["sites"] if r["site"] == "siteD")
    assert "'training-distributed-dp' is not in [federation] modes" in reason
    assert charges(world["policies"]["siteD"]) == before["siteD"]
    assert all(not r["site_metrics"] and r["loss"] is None for r in record["rounds"])
    noise = request.distributed_noise()
    # The charge, recomputed: at tau = 0 the bound is the Renyi curve of a Gaussian of
    # multiplier sqrt(n) sigma / Delta_2 per round; composed with the count's Gaussian.
    assert noise.tau == 0.0 and noise.n_honest == 2
    delta_2 = 2.0**16 + np.sqrt(5)
    orders = list(1.0 + np.geomspace(0.011, 1e5, 1500))
    accountant = RdpAccountant(orders=orders)
    accountant.compose(GaussianDpEvent(np.sqrt(2) * noise.sigma_site / delta_2), 3)
    accountant.compose(GaussianDpEvent(noise.count_noise_multiplier))
    epsilon = accountant.get_epsilon(1e-5)
    assert 0.99 * 8.0 <= epsilon <= 8.0
    for site in ("siteA", "siteB", "siteC"):
        *earlier, charged = charges(world["policies"][site])
        assert earlier == before[site]  # one charge more: the run's
        assert charged[0] == pytest.approx(epsilon, rel=1e-9) and charged[1] == 1e-5
    spent = record["privacy_spent"]
    assert spent["distributed"]["local_floor_epsilon"] > spent["epsilon"]
    # The steps: noise-free FedSGD from the hub's previous parameters, with the round's
    # summed (noisy) count as the denominator the hub used.
    data = [site_data(s, world["rows"][s], request) for s in sites[:3]]
    step = noise.grid_step
    chi2, w_prev = 0.0, np.zeros(len(REGIONS) + 1)
    for row in record["rounds"]:
        assert row["contributors"] == sites[:3]
        w_new, total = np.asarray(row["parameters"]), row["total_weight"]
        assert abs(total - sum(d.n for d in data)) < 6 * np.sqrt(3) * noise.count_noise_multiplier
        exact = sum(clipped_gradient_sum(d, request, w_prev) for d in data)
        penalty = np.r_[0.0, 1e-3 * w_prev[1:]]
        summed = (w_prev - w_new) / 0.5 * total - penalty * total  # the hub's noisy gradient sum
        shares = (summed - exact) / step  # grid units: the three shares (and the rounding)
        chi2 += float(np.sum(shares**2) / (3 * noise.sigma_site**2))
        w_prev = w_new
    low, high = stats.chi2.ppf(5e-7, 15), stats.chi2.isf(5e-7, 15)
    print(f"chi2 of the shares = {chi2:.2f} on 15 df, accepted in [{low:.2f}, {high:.2f}]")
    assert low < chi2 < high
    assert np.allclose(record["w"], w_prev)
    from fednipype.learn.modelfile import load_model

    model = load_model(done.model)
    assert model.fednipype_provenance_["privacy"]["siteA"]["epsilon"] == pytest.approx(epsilon)
