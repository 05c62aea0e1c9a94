"""What a site's ledger records of a training run: its start, each round, each evaluation.

Three event kinds in the ledger's event table, each with the request's content hash:
:data:`STARTED_KIND` (the run's start: its weight, the charge that paid for it),
:data:`ROUND_KIND` (each round answered, claimed in one write transaction before it is
computed, at most the request's ``rounds`` ever) and :data:`EVALUATION_KIND` (each evaluation
answered in mode ``none``, at most one per round trained). Refusals carry public facts only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import FednipypeError, RequestError
from fednipype.site.answer import _refusal
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.ledger_store import connect, insert_event, write_transaction

__all__ = [
    "EVALUATION_KIND",
    "ROUND_KIND",
    "STARTED_KIND",
    "RunState",
    "claim_evaluation",
    "claim_round",
    "record_start",
    "run_state",
    "used_up",
]

#: Ledger events: a run started at this site (its noisy count), and each round it answered.
STARTED_KIND = "federation-training-started"
ROUND_KIND = "federation-training-round"
#: Ledger event: an evaluation answered (mode ``none``; at most one per round trained).
EVALUATION_KIND = "federation-training-evaluation"


@dataclass(frozen=True)
class RunState:
    """What a site's ledger knows of one training run.

    Attributes
    ----------
    started : bool
        The run's first round was charged (mode ``dp``) or recorded (mode ``none``).
    rounds_answered : int
        Rounds claimed so far, ever, for this request hash.
    weight : float or None
        The site's released noisy count (``dp``) or exact count (``none``) of the run.
    charge_id : int or None
        The ledger charge that paid for the run (``dp``).
    """

    started: bool
    rounds_answered: int
    weight: float | None
    charge_id: int | None


class _Events(NamedTuple):
    started: dict[str, Any] | None
    rounds: int
    evaluations: int


def _run_events(conn: Any, request_hash: str) -> _Events:
    """The run's start, its rounds and its evaluations, read in one pass."""
    rows = conn.execute(
        "SELECT kind, detail FROM event WHERE kind IN (?, ?, ?) ORDER BY id",
        (STARTED_KIND, ROUND_KIND, EVALUATION_KIND),
    ).fetchall()
    started, counts = None, {ROUND_KIND: 0, EVALUATION_KIND: 0}
    for kind, text in rows:
        detail = json.loads(text)
        if detail.get("request_hash") != request_hash:
            continue
        if kind != STARTED_KIND:
            counts[kind] += 1
        elif started is None:
            started = detail
    return _Events(started, counts[ROUND_KIND], counts[EVALUATION_KIND])


def run_state(ledger: PrivacyLedger, request_hash: str) -> RunState:
    """What ``ledger`` records of the training run of ``request_hash`` at this site.

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's ledger.
    request_hash : str
        The training request's content hash.

    Returns
    -------
    RunState
    """
    with connect(ledger.path) as conn:
        started, rounds, _ = _run_events(conn, request_hash)
    if started is None:
        return RunState(False, rounds, None, None)
    return RunState(True, rounds, float(started["weight"]), started.get("charge_id"))


def claim_round(
    ledger: PrivacyLedger, request: TrainingRequest, site: str, where: str, server_round: int
) -> int:
    """Record one more round of the run, atomically, unless its ``rounds`` are used up.

    Returns
    -------
    int
        The round's number at this site (1 for its first).

    Raises
    ------
    RequestError
        The rounds are used up (``where`` and public facts only).
    """
    with write_transaction(ledger.path) as conn:
        started, rounds, _ = _run_events(conn, request.content_hash)
        if started is None:  # the start is recorded before any round; never reached otherwise
            raise FednipypeError(f"{where}: the run was not started in the ledger")
        if rounds >= request.rounds:
            raise _refusal(RequestError, where, used_up(request))
        detail = {
            "request_hash": request.content_hash,
            "site": site,
            "server_round": server_round,
            "round": rounds + 1,
        }
        insert_event(conn, ROUND_KIND, json.dumps(detail, sort_keys=True))
    return rounds + 1


def claim_evaluation(
    ledger: PrivacyLedger, request: TrainingRequest, where: str, server_round: int
) -> None:
    """Record one more evaluation, atomically, unless the site already answered as many
    evaluations as it trained rounds: the hub cannot query held-out metrics of parameters of
    its choosing more often than the run's rounds.

    Raises
    ------
    RequestError
        As many evaluations as rounds trained were answered already.
    """
    with write_transaction(ledger.path) as conn:
        _, rounds, done = _run_events(conn, request.content_hash)
        if done >= rounds:
            raise _refusal(
                RequestError,
                where,
                f"the site answered {done} evaluations for the {rounds} rounds it trained; "
                "one evaluation per round trained",
            )
        detail = {"request_hash": request.content_hash, "server_round": server_round}
        insert_event(conn, EVALUATION_KIND, json.dumps(detail, sort_keys=True))


def used_up(request: TrainingRequest) -> str:
    """The public text of a refusal because the run's rounds are used up."""
    return (
        f"the site answered all {request.rounds} rounds of this request already; a new run "
        "needs a new request"
    )


def record_start(
    ledger: PrivacyLedger,
    request: TrainingRequest,
    site: str,
    weight: float,
    charge_id: int | None,
) -> RunState:
    """Record the run's start at this site: its weight and the charge that paid for it."""
    detail = {
        "request_hash": request.content_hash,
        "request_id": request.request_id,
        "site": site,
        "mode": request.mode,
        "weight": weight,
        "charge_id": charge_id,
    }
    ledger.record_event(STARTED_KIND, json.dumps(detail, sort_keys=True))
    return RunState(True, 0, weight, charge_id)
