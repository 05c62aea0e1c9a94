"""The data owner's decisions on federated requests, kept in the dataset's ledger.

A hub's :class:`~fednipype.contract.request.AnalysisRequest` or
:class:`~fednipype.contract.training.TrainingRequest` is answered only after the data owner has
approved exactly that request: approvals, refusals, arrivals of requests nobody has
decided on yet (*pending*) and answers are events of the ledger's audit trail (its append-only
``event`` table, :mod:`fednipype.site.ledger_store`), keyed by the request's content hash. An
altered request has another hash, so it is not approved; it is recorded as pending, with its
document, so the owner can review it and approve it by hash (``fednipype-site requests``,
``fednipype-site approve HASH``).

A request's status is read from its events, latest decision first:

``pending``
    arrived, no decision yet;
``approved``
    the owner approved it and it has not been answered since;
``refused``
    the owner refused it (a later approval overrides a refusal, and a later refusal
    revokes an approval);
``answered``
    an answer was made under the latest approval. An approval pays for **one** answer: a
    replayed request does not spend the budget again unless the owner approves it again.
    For a training request the answer is the whole run: the approval is claimed at its
    first round, which charges the run's (ε, δ); its later rounds, at most ``rounds`` of
    them ever, are counted by :mod:`fednipype.site.training`.

Claiming the approval for an answer (:func:`claim_answer`) checks the status and records the
``answered`` event in one write transaction holding the ledger's lock, so two processes can
never both answer under one approval. The claim is made just before the ledger is charged;
an answer that fails afterwards keeps its claim (fail-closed, like a charge).

Event details are JSON holding only public facts of the request (its hash, id, mode, ε, δ,
sites — for a training request also ``kind: "training"``, its task and rounds —, and for
arrivals and approvals the request document itself) and the owner's note.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fednipype.exceptions import RequestError
from fednipype.site.ledger_store import LedgerRecords, connect, insert_event, write_transaction

if TYPE_CHECKING:  # the request types only; nothing here needs their modules at run time
    from fednipype.contract.request import AnalysisRequest
    from fednipype.contract.training import TrainingRequest

    Request = AnalysisRequest | TrainingRequest

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ANSWERED",
    "APPROVED",
    "EVENT_KINDS",
    "PENDING",
    "REFUSED",
    "RequestRecord",
    "approve",
    "claim_answer",
    "find_request",
    "list_requests",
    "record_disclosure",
    "record_pending",
    "refuse",
    "request_status",
]

PENDING, APPROVED, REFUSED, ANSWERED = "pending", "approved", "refused", "answered"
#: Event kinds in the ledger's ``event`` table, by status they set.
EVENT_KINDS = {
    PENDING: "federation-request-pending",
    APPROVED: "federation-request-approved",
    REFUSED: "federation-request-refused",
    ANSWERED: "federation-request-answered",
}
#: The event an ``exact`` answer records: a disclosure without differential privacy.
DISCLOSURE_KIND = "federation-exact-disclosure"
_STATUS_OF = {kind: status for status, kind in EVENT_KINDS.items()}
_HASH = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[0-9a-f]{8,64}")
#: Longest owner's note kept.
MAX_NOTE = 2000
#: ``RequestRecord.kind`` of the two kinds of request.
ANALYSIS, TRAINING = "analysis", "training"


@dataclass(frozen=True)
class RequestRecord:
    """What the ledger knows of one request.

    Attributes
    ----------
    request_hash : str
        The request's content hash (SHA-256, hex).
    request_id : str
        The request's label.
    mode : str
        ``dp``, ``distributed-dp`` or ``exact`` (analysis); ``dp`` or ``none`` (training).
    epsilon, delta : float or None
        What one answer (a training request: its whole run) costs (None without noise).
    sites : tuple of str
        The request's sites.
    status : str
        ``pending``, ``approved``, ``refused`` or ``answered``.
    time : str
        When the status was set (UTC, ISO 8601).
    first_seen : str
        When the request was first recorded.
    note : str
        The owner's note of the latest decision ("" if none).
    document : dict or None
        The request document, when one was recorded (arrivals and approvals).
    kind : str
        ``analysis`` or ``training``.
    task : str or None
        A training request's task (``brain-age``, ``diagnosis``).
    rounds : int or None
        A training request's number of rounds.
    """

    request_hash: str
    request_id: str
    mode: str
    epsilon: float | None
    delta: float | None
    sites: tuple[str, ...]
    status: str
    time: str
    first_seen: str
    note: str
    document: dict[str, Any] | None
    kind: str = ANALYSIS
    task: str | None = None
    rounds: int | None = None


def _summary(request: Request) -> dict[str, Any]:
    summary = {
        "request_hash": request.content_hash,
        "request_id": request.request_id,
        "mode": request.mode,
        "epsilon": request.epsilon,
        "delta": request.delta,
        "sites": list(request.sites),
    }
    if hasattr(request, "rounds"):  # a training request: its task and rounds are public too
        summary.update(kind=TRAINING, task=request.task, rounds=request.rounds)
    return summary


def _record_summary(record: RequestRecord) -> dict[str, Any]:
    summary = {
        "request_hash": record.request_hash,
        "request_id": record.request_id,
        "mode": record.mode,
        "epsilon": record.epsilon,
        "delta": record.delta,
        "sites": list(record.sites),
    }
    if record.kind == TRAINING:
        summary.update(kind=TRAINING, task=record.task, rounds=record.rounds)
    return summary


def _detail(fields: Mapping[str, Any]) -> str:
    return json.dumps(dict(fields), sort_keys=True, allow_nan=False, separators=(",", ":"))


def _events(conn: Any) -> list[tuple[str, str, str]]:
    kinds = (*EVENT_KINDS.values(), DISCLOSURE_KIND)
    marks = ", ".join("?" * len(kinds))
    return conn.execute(
        f"SELECT time, kind, detail FROM event WHERE kind IN ({marks}) ORDER BY id", kinds
    ).fetchall()


def _records(rows: list[tuple[str, str, str]]) -> dict[str, RequestRecord]:
    """Fold the federation events, oldest first, into one record per request hash."""
    out: dict[str, RequestRecord] = {}
    for time, kind, text in rows:
        status = _STATUS_OF.get(kind)
        if status is None:
            continue
        try:
            detail = json.loads(text)
            digest = detail["request_hash"]
        except (ValueError, TypeError, KeyError):
            LOGGER.warning("ledger event %s at %s: unreadable detail, skipped", kind, time)
            continue
        old = out.get(digest)
        document = detail.get("document") or (old.document if old else None)
        if old is not None and status == PENDING and old.status != ANSWERED:
            continue  # a new arrival of a request still undecided or decided changes nothing
        out[digest] = RequestRecord(
            request_hash=digest,
            request_id=str(detail.get("request_id", "")),
            mode=str(detail.get("mode", "")),
            epsilon=detail.get("epsilon"),
            delta=detail.get("delta"),
            sites=tuple(detail.get("sites", ())),
            status=status,
            time=time,
            first_seen=old.first_seen if old else time,
            note=str(detail.get("note", "") if status != ANSWERED else (old.note if old else "")),
            document=document,
            kind=str(detail.get("kind", ANALYSIS)),
            task=detail.get("task"),
            rounds=detail.get("rounds"),
        )
    return out


def list_requests(ledger: LedgerRecords) -> list[RequestRecord]:
    """Every request the ledger knows of, by first arrival.

    Parameters
    ----------
    ledger : PrivacyLedger
        The dataset's ledger.

    Returns
    -------
    list of RequestRecord
    """
    with connect(ledger.path) as conn:
        rows = _events(conn)
    return sorted(_records(rows).values(), key=lambda r: r.first_seen)


def request_status(ledger: LedgerRecords, request_hash: str) -> str | None:
    """The status of the request with content hash ``request_hash`` (None if never seen)."""
    with connect(ledger.path) as conn:
        record = _records(_events(conn)).get(request_hash)
    return None if record is None else record.status


def find_request(ledger: LedgerRecords, prefix: str) -> RequestRecord:
    """The one recorded request whose content hash starts with ``prefix`` (8 to 64 hex digits).

    Raises
    ------
    RequestError
        The prefix is malformed, matches no request or more than one.
    """
    prefix = str(prefix).lower()
    if not _PREFIX.fullmatch(prefix):
        raise RequestError(
            f"request hash {prefix!r}: expected 8 to 64 hex digits of a recorded request's "
            "content hash (see `fednipype-site requests`), or a request file"
        )
    matches = [r for r in list_requests(ledger) if r.request_hash.startswith(prefix)]
    if len(matches) != 1:
        found = "no recorded request" if not matches else f"{len(matches)} recorded requests"
        raise RequestError(
            f"request hash {prefix}: {found} in privacy ledger {ledger.path} start(s) with it"
        )
    return matches[0]


def _decide(
    ledger: LedgerRecords,
    status: str,
    request: Request | RequestRecord,
    note: str | None,
) -> RequestRecord:
    if isinstance(request, RequestRecord):
        summary = _record_summary(request)
        document = request.document
    else:
        summary, document = _summary(request), request.to_document()
    if not _HASH.fullmatch(summary["request_hash"]):
        raise RequestError(f"request {summary['request_id']!r}: malformed content hash")
    note = "" if note is None else str(note).strip()
    if len(note) > MAX_NOTE:
        raise RequestError(f"note: at most {MAX_NOTE} characters, got {len(note)}")
    detail = {**summary, "note": note}
    if document is not None and status == APPROVED:
        detail["document"] = document
    ledger.record_event(EVENT_KINDS[status], _detail(detail))
    LOGGER.info(
        "privacy ledger %s: request %s (%s) %s",
        ledger.path,
        summary["request_id"],
        summary["request_hash"][:12],
        status,
    )
    return next(r for r in list_requests(ledger) if r.request_hash == summary["request_hash"])


def approve(
    ledger: LedgerRecords,
    request: Request | RequestRecord,
    note: str | None = None,
) -> RequestRecord:
    """Record the owner's approval of ``request`` (one answer; see the module docstring).

    Parameters
    ----------
    ledger : PrivacyLedger
        The dataset's ledger.
    request : AnalysisRequest, TrainingRequest or RequestRecord
        The request file's content, or a recorded (pending) request found by hash.
    note : str, optional
        The owner's reason or reference (kept in the ledger).

    Returns
    -------
    RequestRecord
        The request, now ``approved``.
    """
    return _decide(ledger, APPROVED, request, note)


def refuse(
    ledger: LedgerRecords,
    request: Request | RequestRecord,
    note: str | None = None,
) -> RequestRecord:
    """Record the owner's refusal of ``request`` (revoking an approval not yet used).

    Parameters and return as :func:`approve`.
    """
    return _decide(ledger, REFUSED, request, note)


def record_pending(ledger: LedgerRecords, request: Request) -> bool:
    """Record the arrival of a request the owner has not approved, with its document.

    A request already pending or refused is not recorded again; one answered under its last
    approval is pending again (the owner decides whether it may be answered once more).

    Returns
    -------
    bool
        Whether an event was recorded.
    """
    digest = request.content_hash
    with write_transaction(ledger.path) as conn:
        record = _records(_events(conn)).get(digest)
        if record is not None and record.status != ANSWERED:
            return False
        detail = {**_summary(request), "document": request.to_document()}
        insert_event(conn, EVENT_KINDS[PENDING], _detail(detail))
    LOGGER.info(
        "privacy ledger %s: request %s (%s) recorded as pending",
        ledger.path,
        request.request_id,
        digest[:12],
    )
    return True


def claim_answer(ledger: LedgerRecords, request: Request, site: str) -> str | None:
    """Use the approval of ``request`` for one answer, atomically.

    Returns None when the request was approved (the ``answered`` event is then recorded in the
    same transaction that read the status), else the status that stands in the way
    (``"unknown"`` for a request never seen).

    Parameters
    ----------
    ledger : PrivacyLedger
        The dataset's ledger.
    request : AnalysisRequest or TrainingRequest
        The request being answered (a training request: its run, at its first round).
    site : str
        The answering site's label (recorded).

    Returns
    -------
    str or None
    """
    digest = request.content_hash
    with write_transaction(ledger.path) as conn:
        record = _records(_events(conn)).get(digest)
        status = "unknown" if record is None else record.status
        if status != APPROVED:
            return status
        detail = {**_summary(request), "site": site}
        insert_event(conn, EVENT_KINDS[ANSWERED], _detail(detail))
    return None


def record_disclosure(
    ledger: LedgerRecords, request: Request, site: str, parameters: Mapping[str, Any]
) -> None:
    """Record a non-DP disclosure (no ε): an ``exact`` answer, or a training run of mode
    ``none``, with the request and its sites.

    Parameters
    ----------
    ledger : PrivacyLedger
        The dataset's ledger.
    request : AnalysisRequest or TrainingRequest
        The exact-mode request answered, or the non-DP training request whose run starts.
    site : str
        The answering site.
    parameters : Mapping
        Public facts of the answer (layout size, grid, min cohort checked; a run's rounds).
    """
    training = hasattr(request, "rounds")
    privacy = (
        "none: model updates and metrics without noise (not differentially private)"
        if training
        else "none: noise-free sum through secure aggregation (not differentially private)"
    )
    detail = {**_summary(request), "site": site, "privacy": privacy, **dict(parameters)}
    ledger.record_event(DISCLOSURE_KIND, _detail(detail))
