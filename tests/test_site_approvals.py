"""The owner's decisions on federated requests, in the real ledger (SQLite): approve, refuse,
pending arrivals, one answer per approval, and the policy's ``[federation]`` table."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import make_request

from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import PolicyError, RequestError
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy


@pytest.fixture
def ledger(tmp_path, site_policy) -> PrivacyLedger:
    return PrivacyLedger.from_policy(SitePolicy.from_toml(site_policy(tmp_path / "site")))


def _federation_events(ledger: PrivacyLedger) -> list[tuple[str, str, str]]:
    return [e for e in ledger.events() if e[1].startswith("federation-")]


def test_approval_round_trip(ledger):
    request = make_request()
    assert approvals.request_status(ledger, request.content_hash) is None
    # An unapproved arrival is refused by the claim and recorded as pending, with its document.
    assert approvals.claim_answer(ledger, request, "siteA") == "unknown"
    assert approvals.record_pending(ledger, request) is True
    assert approvals.record_pending(ledger, request) is False  # once, not per arrival
    (record,) = approvals.list_requests(ledger)
    assert record.status == approvals.PENDING
    assert record.document == request.to_document()
    assert AnalysisRequest.from_document(record.document).content_hash == request.content_hash
    assert (record.request_id, record.mode, record.epsilon, record.delta) == (
        "age-gm-test",
        "dp",
        1.0,
        1e-5,
    )
    # The owner finds it by a hash prefix and approves it.
    found = approvals.find_request(ledger, request.content_hash[:10])
    approved = approvals.approve(ledger, found, note="ethics ref 12")
    assert approved.status == approvals.APPROVED and approved.note == "ethics ref 12"
    # One answer per approval: the first claim wins, a replay does not.
    assert approvals.claim_answer(ledger, request, "siteA") is None
    assert approvals.request_status(ledger, request.content_hash) == approvals.ANSWERED
    assert approvals.claim_answer(ledger, request, "siteA") == approvals.ANSWERED
    # Arriving again after its answer, it is pending again; a refusal then stands.
    assert approvals.record_pending(ledger, request) is True
    assert approvals.request_status(ledger, request.content_hash) == approvals.PENDING
    approvals.refuse(ledger, request, note="enough")
    assert approvals.claim_answer(ledger, request, "siteA") == approvals.REFUSED
    assert approvals.record_pending(ledger, request) is False
    kinds = [kind for _, kind, _ in _federation_events(ledger)]
    assert kinds == [
        "federation-request-pending",
        "federation-request-approved",
        "federation-request-answered",
        "federation-request-pending",
        "federation-request-refused",
    ]
    (record,) = approvals.list_requests(ledger)
    assert record.status == approvals.REFUSED and record.note == "enough"


def test_an_altered_request_is_not_approved(ledger):
    request = make_request()
    approvals.approve(ledger, request)
    altered = make_request(epsilon=1.5)  # one field changed
    assert altered.content_hash != request.content_hash
    assert approvals.claim_answer(ledger, altered, "siteA") == "unknown"
    assert approvals.record_pending(ledger, altered)
    statuses = {r.request_hash: r.status for r in approvals.list_requests(ledger)}
    assert statuses == {request.content_hash: "approved", altered.content_hash: "pending"}


def test_a_refusal_revokes_an_unused_approval_and_a_later_approval_overrides(ledger):
    request = make_request(mode="exact", epsilon=None, delta=None, min_sites=3)
    approvals.approve(ledger, request)
    approvals.refuse(ledger, request)
    assert approvals.claim_answer(ledger, request, "siteB") == approvals.REFUSED
    approvals.approve(ledger, request)
    assert approvals.claim_answer(ledger, request, "siteB") is None
    (record,) = approvals.list_requests(ledger)
    assert record.epsilon is None and record.delta is None and record.status == "answered"


@pytest.mark.timeout(120)
def test_concurrent_claims_use_an_approval_once(ledger):
    request = make_request()
    approvals.approve(ledger, request)
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda _: approvals.claim_answer(ledger, request, "s"), range(6)))
    assert outcomes.count(None) == 1
    assert outcomes.count(approvals.ANSWERED) == 5


def test_decisions_are_append_only(ledger):
    approvals.approve(ledger, make_request())
    with sqlite3.connect(ledger.path) as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("UPDATE event SET kind = 'x' WHERE kind LIKE 'federation-%'")
    with sqlite3.connect(ledger.path) as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("DELETE FROM event WHERE kind LIKE 'federation-%'")
    assert approvals.list_requests(ledger)[0].status == "approved"


def test_find_request_refuses_malformed_and_unknown_hashes(ledger):
    approvals.record_pending(ledger, make_request())
    with pytest.raises(RequestError, match="8 to 64 hex digits"):
        approvals.find_request(ledger, "xyz")
    with pytest.raises(RequestError, match="no recorded request"):
        approvals.find_request(ledger, "0" * 12)
    with pytest.raises(RequestError, match="note: at most"):
        approvals.approve(ledger, make_request(), note="x" * 5000)


# -- the policy's [federation] table -------------------------------------------------------


def _policy(tmp_path, site_policy, federation: str) -> SitePolicy:
    path = site_policy(tmp_path / "p", bind=False)
    path.write_text(path.read_text() + federation, encoding="utf-8")
    return SitePolicy.from_toml(path)


def test_federation_defaults_allow_dp_only(tmp_path, site_policy):
    policy = _policy(tmp_path, site_policy, "")
    assert policy.federation_modes == ("dp",) and policy.allow_exact_secure_sum is False
    assert [policy.allows_mode(m) for m in ("dp", "distributed-dp", "exact")] == [
        True,
        False,
        False,
    ]


def test_federation_table_is_read(tmp_path, site_policy):
    policy = _policy(
        tmp_path,
        site_policy,
        '\n[federation]\nmodes = ["distributed-dp"]\nallow_exact_secure_sum = true\n',
    )
    assert [policy.allows_mode(m) for m in ("dp", "distributed-dp", "exact")] == [
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('modes = ["dp", "central"]', "unknown mode 'central'"),
        ('modes = ["exact"]', "allow_exact_secure_sum = true"),
        ('modes = ["dp", "dp"]', "lists a mode twice"),
        ('modes = "dp"', "expected a list of mode names"),
        ('allow_exact_secure_sum = "yes"', "must be true or false"),
        ("allow_exact = true", "unknown key"),
    ],
)
def test_federation_table_is_validated(tmp_path, site_policy, table, message):
    with pytest.raises(PolicyError, match=message) as err:
        _policy(tmp_path, site_policy, f"\n[federation]\n{table}\n")
    assert "policy.toml" in str(err.value) and "federation" in str(err.value)
