"""Federated DP training through a real deployment, with a site killed mid-training.

One :class:`~fednipype.federated.deploy.LocalConsortium` (a TLS SuperLink with SuperNode
authentication, one SuperNode per bundled site with its policy, SQLite ledger, approval,
participants table and extracted features) runs ``fednipype-train`` on a DP brain-age request
of 2 rounds through SecAgg+. siteC's SuperNode is killed (SIGKILL of its process group) when
it receives the second round's collect-masked-vectors message (its 7th SecAgg+ message of the
run): it has joined round 2's key sharing but never sends its masked vector. The run must
neither hang nor fail: round 2 completes with siteA and siteB (min_sites 2), the record says
siteC took part in round 1 and dropped at round 2, every site's ledger holds the one charge of
the whole run (made before its first reply), the model file loads as a scikit-learn estimator,
and no process of the consortium is left (looked up in ``/proc`` here).

About 2.5 minutes on 2 cores (each SecAgg+ round ~40 s; the dead site costs one stage timeout).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support import BUNDLED, wait_none_left

from fednipype.cli import train
from fednipype.contract.training import TrainingRequest
from fednipype.federated.deploy import LocalConsortium
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

SITES = ("siteA", "siteB", "siteC")
REGIONS = ["L_P01", "R_P01", "L_P12"]
FEDERATION = '\n[federation]\nmodes = ["training-dp"]\n'
TRAIN = "Receiving: train message"
#: Seconds each SecAgg+ stage waits (how long the dead site can hold a round up).
TIMEOUT_S = 40.0

DOC = {
    "schema": "fednipype-training-request/1.0",
    "request_id": "deploy-brain-age",
    "sites": list(SITES),
    "task": "brain-age",
    "regions": REGIONS,
    "bounds": {"regions": {"default": [0, 12000]}, "label": [18, 90]},
    "mode": "dp",
    "epsilon": 8.0,
    "delta": 1e-5,
    "rounds": 2,
    "local_steps": 2,
    "learning_rate": 0.5,
    "l2": 1e-3,
    "sampling_rate": 0.5,
    "clip": 1.0,
    "holdout_fraction": 0.25,
    "min_sites": 2,
    "max_participants": 1000,
}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, bundled_derivatives):
    root = tmp_path_factory.mktemp("training-deploy")
    request_path = root / "request.json"
    request_path.write_text(json.dumps(DOC), encoding="utf-8")
    request = TrainingRequest.from_file(request_path)
    nodes, policies = {}, {}
    for site in SITES:
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        policy = folder / "policy.toml"
        policy.write_text(example_policy(dataset=site, total_epsilon=20.0) + FEDERATION)
        init_ledger(policy)
        approvals.approve(PrivacyLedger.from_policy(SitePolicy.from_toml(policy)), request)
        policies[site] = policy
        nodes[site] = {"site": site, "policy": str(policy), "bids-dir": str(BUNDLED / site),
                       "derivatives": str(bundled_derivatives[site])}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        begin = time.monotonic()
        with LocalConsortium(root / "deployment", nodes, stop_grace=5.0) as c:
            print(f"\nconsortium online in {time.monotonic() - begin:.1f} s")
            yield {"c": c, "root": root, "request": request_path, "policies": policies}
    assert wait_none_left(c.ports, c.workdir, seconds=15.0) == {}


@pytest.mark.timeout(600)
def test_dp_training_survives_a_site_killed_in_round_2(consortium, capsys):
    c, root = consortium["c"], consortium["root"]
    out = root / "model out"
    args = [str(consortium["request"]), "--superlink", c.superlink_address,
            "--root-certificates", str(c.ca), "-o", str(out),
            "--round-timeout", str(TIMEOUT_S), "--timeout", "480"]  # fmt: skip
    seen = c.processes["siteC"].tail(10**6).count(TRAIN)
    seventh = rf"(?:{TRAIN}[\s\S]*?){{{seen + 6}}}{TRAIN}"  # round 2's collect stage
    with ThreadPoolExecutor(max_workers=1) as pool:
        begin = time.monotonic()
        future = pool.submit(train.main, args)
        try:
            c.wait_log("siteC", seventh, timeout=400.0)
            killed = time.monotonic() - begin
            c.kill_node("siteC")
        finally:
            code = future.result(timeout=560.0)
        wall = time.monotonic() - begin
    printed = capsys.readouterr()
    print(f"\ndeployment, DP, 3 sites x 2 rounds, siteC killed at {killed:.1f} s: {wall:.1f} s")
    assert code == 0, printed.err
    assert "siteC dropped at round 2" in printed.err
    record = json.loads((out / "training.json").read_text(encoding="utf-8"))
    print(f"rounds (s): {record['timings_s']['rounds']}; check {record['timings_s']['check']}")
    assert record["engine"] == "deployment" and record["status"] == "completed"
    assert record["secure_aggregation"] is True and record["rounds_run"] == 2
    rows = {r["site"]: (r["status"], r["rounds"]) for r in record["sites"]}
    assert rows == {"siteA": ("completed", [1, 2]), "siteB": ("completed", [1, 2]),
                    "siteC": ("dropped at round 2", [1])}  # fmt: skip
    assert record["rounds"][1]["contributors"] == ["siteA", "siteB"]
    # The dead site cost at most one stage timeout plus a normal round.
    assert record["timings_s"]["rounds"][1] < 2 * TIMEOUT_S + 60.0
    request = TrainingRequest.from_file(consortium["request"])
    epsilon, delta = request.spent()
    for site in SITES:  # charged once, the whole run, before the first reply
        ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(consortium["policies"][site]))
        with sqlite3.connect(ledger.path) as conn:
            charged = conn.execute("SELECT epsilon, delta FROM charge").fetchall()
        assert charged == [(pytest.approx(epsilon), delta)]
    from fednipype.learn.modelfile import load_model

    model = load_model(out / "model.json")
    X = np.array([[7000.0, 7100.0, 8000.0], [5000.0, 5200.0, 6100.0]])
    assert model.predict(X).shape == (2,) and np.all(np.isfinite(model.predict(X)))
    assert model.fednipype_provenance_["request_hash"] == request.content_hash


@pytest.mark.timeout(120)
def test_no_process_of_the_consortium_is_left(consortium):
    c = consortium["c"]
    ports = list(c.ports)
    c.stop()
    assert wait_none_left(ports, c.workdir, seconds=15.0) == {}
    assert not any(proc.running() for proc in c.processes.values())
