"""Security and bad input of a live federation: one consortium of three bundled sites (a TLS
SuperLink with SuperNode authentication, one SuperNode per site with a real policy, a real
SQLite ledger and the site's regional features), real ``flwr run``s of the federated app.

Each site's refusal is checked where it happens (the site's ledger: no charge, a pending
record) and where it arrives (the hub's ``secure_sum.json``: a public reason, and no
participant count or feature value of any site in it). The counts and values those texts must
not hold are read from the raw tables with pandas. Left-over processes are looked up in
``/proc``.

The tests share one consortium and run in file order: the last one exhausts siteA's budget.
Full SecAgg+ rounds (about a minute each here) are spent only where a refusal happens inside
the round (regions, features); refusals of the data-free check need only the check round.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from support import BUNDLED, request_document

import fednipype.federated.app as federated_app
from fednipype.cli.site import main as site_main
from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import RequestError
from fednipype.federated.deploy import LocalConsortium, processes_matching
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

APP = Path(federated_app.__file__).parent
SITES = ("siteA", "siteB", "siteC")
#: siteA and siteB answer every mode; siteC answers dp only (no exact opt-in).
FEDERATION = {
    "siteA": '\n[federation]\nmodes = ["dp", "distributed-dp"]\nallow_exact_secure_sum = true\n',
    "siteB": '\n[federation]\nmodes = ["dp", "distributed-dp"]\nallow_exact_secure_sum = true\n',
    "siteC": '\n[federation]\nmodes = ["dp"]\n',
}
ALL_REGIONS = ["L_P01", "R_P01", "L_P12"]
MISSING_AT_C = "L_P12"  # siteC's copy of its features lacks this region


def copy_features(source: Path, target: Path, drop_region: str | None = None) -> Path:
    shutil.copytree(source, target)
    if drop_region is not None:
        for table in target.rglob("*_desc-regional_features.tsv"):
            rows = pd.read_csv(table, sep="\t")
            rows[rows["name"] != drop_region].to_csv(table, sep="\t", index=False)
    return target


def private_facts(site: str, derivatives: Path) -> tuple[set[int], set[str]]:
    """A site's participant counts (all, usable, tables) and its feature values as text."""
    table = pd.read_csv(BUNDLED / site / "participants.tsv", sep="\t", na_values=["n/a"])
    tables = sorted(derivatives.rglob("*_desc-regional_features.tsv"))
    counts = {len(table), int(table.dropna().shape[0]), len(tables)}
    values: set[str] = set()
    for path in tables[:20]:
        for value in pd.read_csv(path, sep="\t")["volume_mm3"]:
            values |= {repr(float(value)), f"{value:.1f}", f"{value:.2f}", f"{value:g}"}
    return counts, values


@pytest.fixture(scope="module")
def federation(tmp_path_factory, bundled_derivatives):
    """Three sites with policies, ledgers and (copied) features, and their consortium."""
    root = tmp_path_factory.mktemp("federated security")
    policies, derivatives = {}, {}
    for site in SITES:
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        policies[site] = folder / "policy.toml"
        text = example_policy(dataset=site, total_epsilon=10.0) + FEDERATION[site]
        policies[site].write_text(text)
        init_ledger(policies[site])
        drop = MISSING_AT_C if site == "siteC" else None
        derivatives[site] = copy_features(bundled_derivatives[site], folder / "features", drop)
    sites = {
        site: {
            "site": site,
            "policy": str(policies[site]),
            "bids-dir": str(BUNDLED / site),
            "derivatives": str(derivatives[site]),
        }
        for site in SITES
    }
    facts = {site: private_facts(site, derivatives[site]) for site in SITES}
    begin = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        with LocalConsortium(root / "consortium", sites, stop_grace=5.0) as c:
            c.timings["measured_startup_s"] = time.monotonic() - begin
            yield {
                "c": c,
                "root": root,
                "policies": policies,
                "derivatives": derivatives,
                "facts": facts,
            }
            pattern = c.process_pattern()
    print(f"\nconsortium timings: {json.dumps(c.timings)}")
    deadline = time.monotonic() + 15
    while processes_matching(pattern, flower_only=False) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_matching(pattern, flower_only=False) == {}


# -- helpers -------------------------------------------------------------------------------------


def write_request(fed, **changes) -> tuple[AnalysisRequest, Path]:
    doc = request_document(sites=list(SITES), **changes)
    request = AnalysisRequest.from_document(doc, source="request.json")
    path = fed["root"] / f"{request.request_id}.json"
    path.write_text(request.dumps())
    return request, path


def approve(fed, path: Path, sites=SITES) -> None:
    for site in sites:  # each data owner, through the command
        assert site_main(["approve", str(path), "--policy", str(fed["policies"][site])]) == 0


def ledger_rows(fed, site: str) -> dict[str, list[tuple]]:
    """The site's charges and audit-trail events, read from its SQLite file."""
    policy = SitePolicy.from_toml(fed["policies"][site])
    with contextlib.closing(sqlite3.connect(policy.ledger_path)) as conn:
        return {
            "charges": conn.execute("SELECT epsilon, delta FROM charge ORDER BY id").fetchall(),
            "events": conn.execute("SELECT kind, detail FROM event ORDER BY id").fetchall(),
        }


def statuses(fed, site: str, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert site_main(["requests", "--policy", str(fed["policies"][site]), "--json"]) == 0
    return {r["request_hash"]: r["status"] for r in json.loads(capsys.readouterr().out)}


def run(fed, path: Path, name: str, timeout: float = 300.0) -> tuple[dict, float]:
    out = fed["root"] / "out" / name
    config = {"request": str(path), "out-dir": str(out), "timeout": 90.0}
    done = fed["c"].run(APP, {**config, "connect-timeout": 60.0}, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "secure_sum.json").read_text())
    return result, done.seconds


def rows(result: dict) -> dict[str, dict]:
    return {row["site"]: row for row in result["sites"]}


def hub_texts(result: dict) -> list[str]:
    """Every text about the sites that reached the hub."""
    texts = [row["reason"] for row in result.get("sites", [])]
    texts += result.get("aggregate_fit", {}).get("failures", [])
    return [t for t in [*texts, result.get("error") or ""] if t]


def assert_public(fed, result: dict) -> None:
    """No participant count or feature value of any site in what reached the hub."""
    for text in hub_texts(result):
        for site in SITES:
            counts, values = fed["facts"][site]
            for count in counts:
                assert not re.search(rf"(?<![\w.]){count}(?![\w.])", text), (site, count, text)
            assert not [v for v in values if v in text], (site, text)
        assert "/" not in text.replace("n/a", ""), text  # no local path either


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_malformed_request_is_refused_by_the_hub_before_the_run(federation):
    fed = federation
    doc = request_document(sites=list(SITES), request_id="malformed", epsilon=-1.0)
    bad = fed["root"] / "malformed.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(RequestError, match=r"malformed\.json.*epsilon"):
        AnalysisRequest.from_file(bad)  # the hub's own reading of the file
    truncated = fed["root"] / "truncated.json"
    truncated.write_text(json.dumps(request_document(sites=list(SITES)))[:-20])
    with pytest.raises(RequestError, match=r"truncated\.json"):
        AnalysisRequest.from_file(truncated)

    before = {site: ledger_rows(fed, site) for site in SITES}
    logs = {site: fed["c"].processes[site].tail(10**6) for site in SITES}
    result, seconds = run(fed, bad, "malformed", timeout=120)
    assert result["status"] == "failed"
    assert "malformed.json" in result["error"] and "epsilon" in result["error"]
    assert "sum" not in result and "sites" not in result  # no site was asked anything
    for site in SITES:
        assert ledger_rows(fed, site) == before[site]  # nothing recorded, not even pending
        new = fed["c"].processes[site].tail(10**6)[len(logs[site]) :]
        assert "Receiving" not in new, (site, new)
    print(f"\nmalformed request: refused by the hub's server app, run {seconds:.1f} s")


@pytest.mark.timeout(240)
def test_unapproved_or_altered_request_is_refused_without_a_charge(federation, capsys):
    """One check round, two reasons: siteA's owner never saw the request; siteB's and siteC's
    approved it before one field was changed (epsilon 1 -> 4). Every site refuses it as not
    approved, records it as pending and charges nothing; the original's approvals stay
    unused."""
    fed = federation
    original, path = write_request(fed, request_id="altered", epsilon=1.0)
    approve(fed, path, sites=("siteB", "siteC"))
    altered_doc = original.to_document()
    altered_doc["epsilon"] = 4.0  # one field changed after the owners approved
    altered = AnalysisRequest.from_document(altered_doc, source="altered.json")
    path.write_text(altered.dumps())
    before = {site: ledger_rows(fed, site)["charges"] for site in SITES}
    result, seconds = run(fed, path, "altered")
    assert result["request_hash"] == altered.content_hash != original.content_hash
    assert result["status"] == "failed" and "0 of 3 sites accepted" in result["error"]
    for site in SITES:
        row = rows(result)[site]
        assert row["status"] == "refused"
        assert "not approved by the site's data owner" in row["reason"]
        assert "recorded as pending" in row["reason"]
        assert ledger_rows(fed, site)["charges"] == before[site]
        status = statuses(fed, site, capsys)
        assert status[altered.content_hash] == "pending"
        if site != "siteA":  # the approval of the original is still unused
            assert status[original.content_hash] == "approved"
        else:
            assert original.content_hash not in status
    assert_public(fed, result)
    with capsys.disabled():
        print(
            f"\nunapproved at siteA, altered (epsilon 1 -> 4) at siteB and siteC: refused by "
            f"all three sites in {seconds:.1f} s: {row['reason']}"
        )

    # siteA's owner reviews what arrived and approves it by its hash: it is answerable there
    capsys.readouterr()
    policy = str(fed["policies"]["siteA"])
    assert site_main(["approve", altered.content_hash[:12], "--policy", policy]) == 0
    assert statuses(fed, "siteA", capsys)[altered.content_hash] == "approved"


@pytest.mark.timeout(240)
def test_exact_request_is_refused_where_the_policy_does_not_allow_it(federation, capsys):
    fed = federation
    request, path = write_request(
        fed, request_id="exact", mode="exact", epsilon=None, delta=None, min_sites=3
    )
    approve(fed, path)  # siteC's owner approves, but its policy has no exact opt-in
    before = {site: ledger_rows(fed, site) for site in SITES}
    result, seconds = run(fed, path, "exact")
    assert result["status"] == "failed"
    assert "2 of 3 sites accepted" in result["error"] and "min-sites is 3" in result["error"]
    assert "sum" not in result
    assert [rows(result)[s]["status"] for s in SITES] == ["accepted", "accepted", "refused"]
    assert "allow_exact_secure_sum" in rows(result)["siteC"]["reason"]
    for site in SITES:  # nothing charged, nothing disclosed, every approval still unused
        assert ledger_rows(fed, site) == before[site]
        assert statuses(fed, site, capsys)[request.content_hash] == "approved"
    assert_public(fed, result)
    with capsys.disabled():
        print(
            f"\nexact at a site without opt-in: stopped after {seconds:.1f} s: {result['error']}"
        )


def charged_once(fed, site: str, before: list[tuple], request: AnalysisRequest) -> bool:
    return ledger_rows(fed, site)["charges"] == [*before, (request.epsilon, request.delta)]


@pytest.mark.timeout(420)
def test_mismatched_regions_refused_by_that_site_others_unaffected(federation, capsys):
    fed = federation
    request, path = write_request(fed, request_id="regions", regions=ALL_REGIONS)
    approve(fed, path)
    before = {site: ledger_rows(fed, site)["charges"] for site in SITES}
    result, seconds = run(fed, path, "regions")
    assert result["status"] == "completed", result["error"]
    assert result["contributors"] == ["siteA", "siteB"]
    assert rows(result)["siteC"]["status"] == "refused"  # in the data-free check round
    reason = f"regions not in the site's atlas: {MISSING_AT_C}"
    assert any(reason in text for text in hub_texts(result)), hub_texts(result)
    assert ledger_rows(fed, "siteC")["charges"] == before["siteC"]
    assert statuses(fed, "siteC", capsys)[request.content_hash] == "approved"  # unused
    for site in ("siteA", "siteB"):
        assert charged_once(fed, site, before[site], request)
        assert statuses(fed, site, capsys)[request.content_hash] == "answered"
    assert_public(fed, result)
    with capsys.disabled():
        print(f"\nmismatched regions: siteC refused, siteA+siteB summed in {seconds:.1f} s")


@pytest.mark.timeout(420)
def test_site_without_features_refuses_others_unaffected(federation, capsys):
    fed = federation
    request, path = write_request(fed, request_id="no-features", regions=ALL_REGIONS[:2])
    approve(fed, path)
    before = {site: ledger_rows(fed, site)["charges"] for site in SITES}
    features = fed["derivatives"]["siteB"]
    aside = features.parent / "features-aside"
    aside.mkdir()
    for subject in features.glob("sub-*"):  # siteB has no participant-level output now
        subject.rename(aside / subject.name)
    try:
        result, seconds = run(fed, path, "no-features")
    finally:
        for subject in aside.glob("sub-*"):
            subject.rename(features / subject.name)
    assert result["status"] == "completed", result["error"]
    assert result["contributors"] == ["siteA", "siteC"]
    assert rows(result)["siteB"]["status"] == "refused"  # in the data-free check round
    reason = "the site has no usable regional features for it"
    assert any(reason in text for text in hub_texts(result)), hub_texts(result)
    assert ledger_rows(fed, "siteB")["charges"] == before["siteB"]
    for site in ("siteA", "siteC"):
        assert charged_once(fed, site, before[site], request)
    assert_public(fed, result)
    with capsys.disabled():
        print(f"\nno features at siteB: refused, siteA+siteC summed in {seconds:.1f} s")


@pytest.mark.timeout(240)
def test_exhausted_budget_refused_before_any_charge_others_unaffected(federation, capsys):
    """siteA has spent its budget: it refuses in the data-free check, before any charge.

    With min_sites 3 the run stops there, so this costs a check round, not a SecAgg+ round:
    siteB and siteC accepted and keep their budgets and their unused approvals (the runs above
    show the others completing a sum when one site refuses).
    """
    fed = federation
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(fed["policies"]["siteA"]))
    left = ledger.remaining().epsilon
    ledger.charge(left * (1 - 1e-6), 0.0, "an earlier release", {"note": "test"})
    assert ledger.remaining().epsilon < 1e-3  # siteA's budget is spent
    request, path = write_request(fed, request_id="budget", regions=ALL_REGIONS[:2], min_sites=3)
    approve(fed, path)
    before = {site: ledger_rows(fed, site) for site in SITES}
    result, seconds = run(fed, path, "budget")
    assert result["status"] == "failed"
    assert "2 of 3 sites accepted" in result["error"]
    assert [rows(result)[s]["status"] for s in SITES] == ["refused", "accepted", "accepted"]
    reason = rows(result)["siteA"]["reason"]
    assert "privacy budget does not cover epsilon=1, delta=1e-05" in reason
    for site in SITES:  # nothing charged anywhere; every approval still unused
        assert ledger_rows(fed, site) == before[site]
        assert statuses(fed, site, capsys)[request.content_hash] == "approved"
    assert f"{left:.4g}" not in reason and f"{left:.3g}" not in reason  # nothing of the ledger
    assert_public(fed, result)
    with capsys.disabled():
        print(f"\nexhausted budget at siteA: refused in the check round, run {seconds:.1f} s")
