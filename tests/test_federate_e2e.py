"""``fednipype-federate`` and the ``FederatedAnalysis`` node through a real deployment.

One consortium for the module: a flower-superlink with TLS and SuperNode authentication and one
flower-supernode per bundled site (siteA, siteB, siteC), each with its participant-level
features, its policy (``[federation] modes = ["dp"]``, ``allow_exact_secure_sum = true``), its
ledger and its owner's approvals. The references are computed here, independently: statsmodels
OLS with one intercept per site on the pooled raw rows (the sites' feature tables joined with
their ``participants.tsv``), numpy sums of each site's vector, dp-accounting's Gaussian
calibration, and the sites' SQLite ledgers read with ``sqlite3``. Left-over processes are
looked up in ``/proc``.

The exact secure sum of the same three sites against statsmodels is checked on the federated
demo's exact run (``test_demo_federated``): the same request over the same features, one
SecAgg+ run fewer here.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dp_accounting import gaussian_mechanism
from support import AGE, BUNDLED, SITES, SLOPES, VOLUME, bundled_rows, reference_fit
from support import BUNDLED_REGIONS as REGIONS

from fednipype.cli import federate
from fednipype.contract.distributed_dp import request_noise
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import SumLayout
from fednipype.federated.deploy import LocalConsortium, processes_matching
from fednipype.federated.pki import make_local_pki
from fednipype.interfaces.federated import FederatedAnalysis
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

FEDERATION = '\n[federation]\nmodes = ["dp", "distributed-dp"]\nallow_exact_secure_sum = true\n'
EPSILON, DELTA = 1.0, 1e-5


def request_doc(request_id: str, mode: str, **changes) -> dict:
    doc = {
        "schema": "fednipype-request/1.0",
        "request_id": request_id,
        "sites": list(SITES),
        "model": {
            "response": "volume_mm3",
            "numeric": ["age"],
            "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]},
        },
        "regions": REGIONS,
        "bounds": {"covariates": {"age": list(AGE)}, "regions": {"default": list(VOLUME)}},
        "mode": mode,
        "epsilon": None if mode == "exact" else EPSILON,
        "delta": None if mode == "exact" else DELTA,
        "max_dropouts": 0,
        "min_sites": 3 if mode == "exact" else 2,
        "max_participants": 1000,
    }
    return {**doc, **changes}


# -- the consortium -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, bundled_derivatives, bundled_features):
    """Policies, ledgers, approvals and the running consortium; every process stopped after."""
    root = tmp_path_factory.mktemp("federate") / "hub dir"
    requests = {}
    for name, doc in {
        "exact": request_doc("e2e-exact", "exact"),
        "dp": request_doc("e2e-dp", "dp"),
        # at most one of the three sites may drop out or collude: the other two carry the noise
        "distributed": request_doc("e2e-distributed", "distributed-dp", max_dropouts=1),
        "partial": request_doc("e2e-partial", "exact"),  # siteC's owner never approves it
    }.items():
        path = root / "requests" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc), encoding="utf-8")
        requests[name] = (path, AnalysisRequest.from_file(path))
    nodes, policies = {}, {}
    for site in SITES:
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        policy = folder / "policy.toml"
        text = example_policy(dataset=site, total_epsilon=10.0) + FEDERATION
        policy.write_text(text, encoding="utf-8")
        init_ledger(policy)
        ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
        for name, (_, request) in requests.items():
            if name != "partial" or site != "siteC":
                approvals.approve(ledger, request, note="test")
        policies[site] = policy
        nodes[site] = {"site": site, "policy": str(policy), "bids-dir": str(BUNDLED / site),
                       "derivatives": str(bundled_derivatives[site])}  # fmt: skip
    rows = pd.concat([bundled_rows(s, bundled_features[s]) for s in SITES], ignore_index=True)
    begin = time.monotonic()
    with LocalConsortium(root / "consortium", nodes, stop_grace=5.0) as consortium:
        print(f"\nconsortium online in {time.monotonic() - begin:.1f} s")
        yield {"root": root, "consortium": consortium, "requests": requests, "rows": rows,
               "policies": policies}  # fmt: skip
        pattern = consortium.process_pattern()
    deadline = time.monotonic() + 10.0
    while (left := processes_matching(pattern, flower_only=False)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == {}, left


def federate_args(world, name: str, out: Path, *extra: str) -> list[str]:
    c = world["consortium"]
    return [str(world["requests"][name][0]), "--superlink", c.superlink_address,
            "--root-certificates", str(c.ca), "-o", str(out), *extra]  # fmt: skip


# -- runs -------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_dp_through_the_node_charges_each_ledger_and_has_noise_aware_errors(
    world, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path, request = world["requests"]["dp"]
    c = world["consortium"]
    node = FederatedAnalysis(
        request=str(path),
        superlink=c.superlink_address,
        root_certificates=str(c.ca),
        out_dir=str(tmp_path / "dp"),
        timeout=240.0,
    )
    tic = time.monotonic()
    outputs = node.run().outputs
    print(f"\ndp run through FederatedAnalysis: {time.monotonic() - tic:.1f} s")
    pooled = pd.read_csv(outputs.pooled_results, sep="\t")
    record = json.loads(Path(outputs.federation_json).read_text())
    assert Path(outputs.report).name == "index.html" and len(outputs.plots) == len(REGIONS)
    assert record["mode"] == "dp" and record["contributors"] == list(SITES)

    # each site's ledger: one charge of the request's (epsilon, delta), audited with the
    # request's hash, the answer's hash recorded (charged before it left)
    for site, policy in world["policies"].items():
        with contextlib.closing(sqlite3.connect(policy.parent / "ledger.sqlite")) as conn:
            charges = conn.execute(
                "SELECT c.epsilon, c.delta, a.purpose, a.parameters, a.content_sha256 "
                "FROM charge c JOIN audit a ON a.charge_id = c.id"
            ).fetchall()
        ours = [ch for ch in charges if json.loads(ch[3])["request_hash"] == request.content_hash]
        assert len(ours) == 1, (site, charges)
        eps, delta, purpose, _, answer_hash = ours[0]
        assert (eps, delta, purpose) == (EPSILON, DELTA, "federated answer")
        assert answer_hash is not None and len(answer_hash) == 64

    # the noise the SEs account for is the analytic Gaussian's (dp-accounting) on the
    # layout's sensitivity, and every interval is wider than the noise-free OLS one
    layout = SumLayout.from_request(request)
    sigma = gaussian_mechanism.get_sigma_gaussian(EPSILON, DELTA) * layout.sensitivity
    assert record["noise_sd_scaled"] == pytest.approx(sigma, rel=1e-3)
    assert pooled["note"].str.contains("secure sum of 3 sites (dp)", regex=False).all()
    rows = world["rows"]
    for region in REGIONS:
        fit = reference_fit(rows, region)
        got = pooled[pooled["region"] == region].set_index("term")
        for term in SLOPES:  # DP noise on ~100 participants at epsilon 1: far wider than OLS
            assert got.loc[term, "se"] > fit.bse[term]


@pytest.mark.timeout(360)
def test_distributed_dp_through_the_consortium(world, tmp_path, capsys):
    """distributed-dp end to end: every site adds its discrete-Gaussian share, the hub pools the
    sum with the central noise the request implies, each ledger is charged the request's
    (epsilon, delta) by basic composition (a Rényi bound, not a Gaussian mechanism)."""
    path, request = world["requests"]["distributed"]
    out = tmp_path / "distributed"
    tic = time.monotonic()
    assert federate.main(federate_args(world, "distributed", out)) == 0
    # the command's one line of success (the exact run of the same sites is the demo's, in
    # test_demo_federated)
    assert "distributed-dp secure sum of 3 of 3 sites" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\ndistributed-dp run: {time.monotonic() - tic:.1f} s")
    record = json.loads((out / "federation.json").read_text())
    assert record["mode"] == "distributed-dp" and record["contributors"] == list(SITES)
    noise, grid = request_noise(request)  # recomputed from the request alone
    # one site's share in scaled units; the three shares sum to at least the central noise,
    # and any two of them (t = 1 may drop or collude) carry it exactly
    assert record["noise_sd_scaled"] == pytest.approx(noise.sigma_site * grid.step, rel=1e-9)
    assert noise.sigma_site * math.sqrt(len(SITES) - 1) == pytest.approx(
        noise.sigma_central, rel=1e-9
    )
    for site, policy in world["policies"].items():
        with contextlib.closing(sqlite3.connect(policy.parent / "ledger.sqlite")) as conn:
            charges = conn.execute(
                "SELECT c.epsilon, c.delta, c.noise_multiplier, a.parameters "
                "FROM charge c JOIN audit a ON a.charge_id = c.id"
            ).fetchall()
        ours = [ch for ch in charges if json.loads(ch[3])["request_hash"] == request.content_hash]
        assert len(ours) == 1, (site, charges)
        assert ours[0][:3] == (EPSILON, DELTA, None)
    pooled = pd.read_csv(out / "pooled_results.tsv", sep="\t")
    rows = world["rows"]
    for region in REGIONS:
        fit = reference_fit(rows, region)
        got = pooled[pooled["region"] == region].set_index("term")
        for term in SLOPES:  # noise on ~100 participants at epsilon 1: wider than OLS
            assert np.isfinite(got.loc[term, "estimate"])
            assert got.loc[term, "se"] > fit.bse[term]


@pytest.mark.timeout(240)
def test_too_few_sites_is_one_line_and_writes_nothing(world, capsys):
    out = world["root"] / "partial out"
    tic = time.monotonic()
    c = world["consortium"]  # through an existing Flower config this time
    argv = [str(world["requests"]["partial"][0]), "--connection", c.connection]
    argv += ["--flwr-home", str(c.flwr_home), "-o", str(out), "--round-timeout", "60"]
    code = federate.main(argv)
    wall = time.monotonic() - tic
    err = capsys.readouterr().err.strip()
    print(f"\ntoo few sites: refused in {wall:.1f} s")
    assert code == 6  # the federated run did not complete
    assert len(err.splitlines()) == 1 and err.startswith("fednipype-federate: error: ")
    assert "2 of 3 sites accepted" in err and "siteC refused" in err and "not approved" in err
    assert not out.exists()
    assert not any(p.name.startswith(".partial out.tmp") for p in out.parent.iterdir())
    # siteC recorded the request as pending for its owner, and nothing was charged anywhere
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(world["policies"]["siteC"]))
    request = world["requests"]["partial"][1]
    assert approvals.request_status(ledger, request.content_hash) == "pending"


@pytest.mark.timeout(120)
def test_a_wrong_ca_is_refused_before_anything_runs(world, tmp_path, capsys):
    other = make_local_pki(tmp_path / "other", [])
    args = federate_args(world, "exact", tmp_path / "out")
    args[args.index("--root-certificates") + 1] = str(other.ca.cert)
    tic = time.monotonic()
    assert federate.main(args) == 6  # the SuperLink is not the consortium's
    assert time.monotonic() - tic < 30
    err = capsys.readouterr().err
    assert "TLS handshake failed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- no consortium needed ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_an_unreachable_superlink_is_a_clear_error_in_bounded_time(tmp_path, capsys):
    pki = make_local_pki(tmp_path / "pki", [])
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_doc("unreachable", "exact")))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tic = time.monotonic()
    argv = [str(request), "--superlink", f"127.0.0.1:{port}"]
    argv += ["--root-certificates", str(pki.ca.cert), "-o", str(tmp_path / "o")]
    code = federate.main(argv)
    wall = time.monotonic() - tic
    err = capsys.readouterr().err.strip()
    print(f"\nunreachable SuperLink: error after {wall:.1f} s")
    assert code == 6 and wall < 40
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}: not reachable" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("change", "code", "text"),
    [
        (["--num-shares", "4"], 2, "--num-shares"),
        (["--reconstruction-threshold", "3"], 2, "--reconstruction-threshold"),
        (["--superlink", "nohostport"], 2, "--superlink: expected HOST:PORT"),
        (["--root-certificates", None], 2, "--root-certificates are required"),
        (["--timeout", "0"], 2, "--timeout"),
        (["request", "malformed"], 3, "request.json"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, capsys, change, code, text):
    pki = make_local_pki(tmp_path / "pki", [])
    request = tmp_path / "request.json"
    doc = request_doc("bad", "exact")
    if change[0] == "request":
        doc["min_sites"] = 2  # exact needs min_sites >= 3
    request.write_text(json.dumps(doc))
    args = {"--superlink": "127.0.0.1:1", "--root-certificates": str(pki.ca.cert)}
    if change[0].startswith("--"):
        args[change[0]] = change[1]
    argv = [str(request), "-o", str(tmp_path / "o")]
    for key, value in args.items():
        argv += [] if value is None else [key, value]
    tic = time.monotonic()
    assert federate.main(argv) == code
    assert time.monotonic() - tic < 10  # refused before any connection attempt
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err
    assert not (tmp_path / "o").exists()
