"""Federated training's Flower plumbing in simulation: FedAvg through SecAgg+ vs a reference.

The coordinator (:func:`fednipype.federated.training.run_federated_training`) runs a Flower
simulation (a ``flower-superlink --simulation`` it starts and stops) of a test app: fednipype's
own app folder with its client app replaced by ``make_client_app(training=TrainingSite(...))``
whose sites hold known synthetic rows (drawn here with numpy from a seed in each simulated
node's config) and train with :func:`fednipype.learn.fedavg.gradient_descent`. Everything of
Flower is real: the simulation engine, ``secaggplus_mod``, the SecAgg+ workflow, the transport.

The references are computed here: :func:`fednipype.learn.fedavg.run_fedavg` (the in-process
loop, no Flower) on the same rows for the parameters, numpy for the held-out losses each site
reports and their weighted mean.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import REPO

from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import FederationError
from fednipype.federated.app.training_codec import FixedPointCodec
from fednipype.federated.training import run_federated_training
from fednipype.learn import models
from fednipype.learn.fedavg import SiteData, run_fedavg

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

APP = REPO / "fednipype" / "federated" / "app"
REGIONS = ["L_P01", "R_P01", "L_P12"]
BOUNDS, AGE = (2000.0, 12000.0), (18.0, 90.0)

# The test sites' client app: fednipype's make_client_app with known local data.
TEST_CLIENT = '''
"""Test client app: the real TrainingClient behind secaggplus_mod, sites with known rows."""

import numpy as np

from fednipype.exceptions import PrivacyBudgetExceeded
from fednipype.federated.app.client_app import make_client_app
from fednipype.federated.app.training_client import TrainingSite
from fednipype.learn import models
from fednipype.learn.fedavg import gradient_descent


def rows(node_config):
    rng = np.random.default_rng(int(node_config["seed"]))
    n = int(node_config["n"])
    age = rng.uniform(20.0, 85.0, n)
    X = 9000.0 - 30.0 * age[:, None] + rng.normal(0.0, 300.0, (n, 3)) + [0.0, 200.0, -500.0]
    train = np.arange(n) % 5 != 0
    return X, age, train


def check(request, node_config):
    if node_config.get("refuse"):
        raise PrivacyBudgetExceeded("spent 0.97 of 1.0 by 181 participants")  # private text


def update(request, node_config, w, server_round):
    fail = int(node_config.get("fail-from", 0))
    if fail and server_round >= fail:
        raise RuntimeError("/data/private/path unreadable")  # private text
    X, age, train = rows(node_config)
    Xs = request.scaling.transform(X[train])
    y = request.scaling.label_transform(age[train])
    w_local = gradient_descent(
        request.task, w, Xs, y, learning_rate=request.learning_rate,
        local_steps=request.local_steps, l2=request.l2,
    )
    return w_local, float(train.sum())


def evaluate(request, node_config, w, server_round):
    X, age, train = rows(node_config)
    Xs = request.scaling.transform(X[~train])
    y = request.scaling.label_transform(age[~train])
    loss = models.loss(request.task, w, Xs, y, request.l2)
    return {"loss": loss, "r2": 1.0 - loss, "n": int((~train).sum())}


app = make_client_app(training=TrainingSite(check=check, update=update, evaluate=evaluate))
'''


def site_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same rows as the test client's, drawn here."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20.0, 85.0, n)
    X = 9000.0 - 30.0 * age[:, None] + rng.normal(0.0, 300.0, (n, 3)) + [0.0, 200.0, -500.0]
    return X, age, np.arange(n) % 5 != 0


def request_doc(request_id: str, sites: list[str], **changes) -> dict:
    doc = {
        "schema": "fednipype-training-request/1.0",
        "request_id": request_id,
        "sites": sites,
        "task": "brain-age",
        "regions": REGIONS,
        "bounds": {"regions": {"default": list(BOUNDS)}, "label": list(AGE)},
        "mode": "none",
        "epsilon": None,
        "delta": None,
        "rounds": 3,
        "local_steps": 2,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": None,
        "clip": None,
        "holdout_fraction": 0.2,
        "min_sites": 2,
        "max_participants": 1000,
    }
    return {**doc, **changes}


@pytest.fixture(scope="module")
def test_app(tmp_path_factory) -> Path:
    """fednipype's app folder with the test sites' client app."""
    folder = tmp_path_factory.mktemp("training-app") / "app"
    shutil.copytree(APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "client_app.py").write_text(TEST_CLIENT, encoding="utf-8")
    return folder


def train(tmp: Path, app: Path, doc: dict, nodes: list[dict], **kwargs):
    path = tmp / f"{doc['request_id']}.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    tic = time.monotonic()
    run = run_federated_training(
        path, tmp / doc["request_id"], sites=nodes, app=app, timeout=400.0,
        round_timeout=60.0, check_timeout=90.0, **kwargs,
    )  # fmt: skip
    return run, time.monotonic() - tic


def reference(doc: dict, nodes: list[dict], rounds: int, initial=None):
    request = TrainingRequest.from_document(doc)
    data = []
    for node in nodes:
        X, age, keep = site_rows(node["seed"], node["n"])
        data.append(SiteData(node["site"], X[keep], age[keep]))
    return run_fedavg(
        data, doc["task"], request.scaling, rounds=rounds, local_steps=doc["local_steps"],
        learning_rate=doc["learning_rate"], l2=doc["l2"], initial=initial,
    )  # fmt: skip


def tolerance(doc: dict, nodes: list[dict]) -> float:
    codec = FixedPointCodec.for_request(
        len(REGIONS) + 1, weight_bound=1000, param_bound=1000.0, n_sites=len(doc["sites"])
    )
    n_train = sum(int(site_rows(n["seed"], n["n"])[2].sum()) for n in nodes)
    # the rounding of each round, carried through the following rounds' local steps
    return 10 * doc["rounds"] * codec.tolerance(n_train, 10.0)


def held_out_loss(doc: dict, node: dict, w: np.ndarray) -> tuple[float, int]:
    """A site's held-out loss at ``w`` and its held-out count, with numpy on its rows."""
    request = TrainingRequest.from_document(doc)
    X, age, keep = site_rows(node["seed"], node["n"])
    Xs = request.scaling.transform(X[~keep])
    y = request.scaling.label_transform(age[~keep])
    r = Xs @ w[1:] + w[0] - y
    return 0.5 * np.mean(r**2) + 0.5 * doc["l2"] * w[1:] @ w[1:], int((~keep).sum())


@pytest.mark.timeout(420)
def test_non_dp_fedavg_through_secagg_equals_the_reference_loop_with_a_refusing_and_a_failing_site(
    tmp_path, test_app
):
    """One run, five sites: three answer every round, one refuses at the check, one answers
    round 1 and fails from round 2. The parameters equal the reference loop over the sites
    that contributed to each round; the others' texts stay at their sites."""
    sites = [f"site-{i}" for i in range(5)]
    nodes = [{"site": s, "seed": 11 + i, "n": 120 + 40 * i} for i, s in enumerate(sites)]
    nodes[3]["refuse"] = True
    nodes[4]["fail-from"] = 2  # answers round 1, then fails in every SecAgg+ round
    doc = request_doc("fedavg-exact", sites)
    run, wall = train(tmp_path, test_app, doc, nodes)
    print(f"\nsimulation, 5 sites x 3 rounds (1 refuses, 1 fails from round 2; SecAgg+, "
          f"evaluate): {wall:.1f} s; rounds {run.record['timings_s']['rounds']}")  # fmt: skip
    record = run.record
    assert record["status"] == "completed" and record["rounds_run"] == 3
    assert record["engine"] == "simulation" and record["privacy_spent"] is None
    assert record["request_hash"] == TrainingRequest.from_document(doc).content_hash
    assert {r["site"]: (r["status"], r["rounds"]) for r in record["sites"]} == {
        **{s: ("completed", [1, 2, 3]) for s in sites[:3]},
        "site-3": ("refused", []),
        "site-4": ("dropped at round 2", [1]),
    }
    refused = next(r for r in record["sites"] if r["site"] == "site-3")
    assert refused["reason"] == "refused: the site's privacy budget does not cover the request"
    text = run.record_path.read_text() + run.metrics.read_text()
    assert "0.97" not in text and "/data/private" not in text  # no private text at the hub
    # The reference loop: round 1 over sites 0, 1, 2 and 4; rounds 2-3 over sites 0-2.
    contributors = [[0, 1, 2, 4], [0, 1, 2], [0, 1, 2]]
    first = reference(doc, [nodes[i] for i in contributors[0]], 1)
    rest = reference(doc, nodes[:3], 2, initial=first.w)
    w = np.asarray(record["w"])
    tol = tolerance(doc, nodes)
    print(f"max |w - reference| = {np.abs(w - rest.w).max():.2e} (tolerance {tol:.1e})")
    assert np.abs(w - rest.w).max() <= tol
    assert np.abs(w).max() > 1e-3  # trained, not the zeros it started from
    # Each round's summed weight is its contributors' training-row count, and its held-out
    # loss the held-out-size-weighted mean of their losses at the round's global parameters.
    history = [first.history[0], *rest.history]
    weights = {**first.weights, **rest.weights}
    for row, w_round, who in zip(record["rounds"], history, contributors, strict=True):
        assert row["contributors"] == [sites[i] for i in who]
        assert row["total_weight"] == pytest.approx(sum(weights[sites[i]] for i in who), abs=1e-6)
        losses, sizes = zip(*(held_out_loss(doc, nodes[i], w_round) for i in who), strict=True)
        assert row["loss"] == pytest.approx(np.average(losses, weights=sizes), rel=1e-6)
        assert row["site_metrics"]["site-1"]["n"] == sizes[1]
    with run.metrics.open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert float(table[-1]["loss"]) == pytest.approx(record["rounds"][-1]["loss"], rel=1e-5)
    # The model file loads as a scikit-learn estimator that predicts years.
    from fednipype.learn.modelfile import load_model

    request = TrainingRequest.from_document(doc)
    estimator = load_model(run.model)
    X, age, _ = site_rows(11, 120)
    scaled = models.predict_scaled("brain-age", w, request.scaling.transform(X))
    expected = request.scaling.label_inverse(scaled)
    inside = (X >= BOUNDS[0]).all(axis=1) & (X <= BOUNDS[1]).all(axis=1)  # no clamping there
    assert np.allclose(estimator.predict(X[inside]), expected[inside], rtol=1e-9, atol=1e-6)


@pytest.mark.timeout(300)
def test_too_few_accepting_sites_stop_at_the_check_with_their_reasons(tmp_path, test_app):
    sites = ["site-0", "site-1", "site-2"]
    nodes = [{"site": s, "seed": 31 + i, "n": 100, "refuse": i > 0} for i, s in enumerate(sites)]
    doc = request_doc("fedavg-refused", sites)
    with pytest.raises(FederationError, match="1 of 3 sites accepted") as err:
        train(tmp_path, test_app, doc, nodes)
    assert "site-1 refused (refused: the site's privacy budget" in str(err.value)
    assert not (tmp_path / "fedavg-refused").exists()  # nothing half-written
