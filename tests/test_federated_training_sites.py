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
FEDERATION = '\n[federation]\nmodes = ["training-dp"]\nallow_non_dp_training = true\n'


def request_doc(request_id: str, sites: list[str], mode: str, task: str) -> dict:
    dp = mode == "dp"
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
    }


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

    nodes, policies = {}, {}
    for name, (bids, deriv) in data.items():
        folder = root / "sites" / name
        folder.mkdir(parents=True)
        budget = 0.5 if name == "siteX" else 20.0
        policy = folder / "policy.toml"
        policy.write_text(example_policy(dataset=name, total_epsilon=budget) + FEDERATION)
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
