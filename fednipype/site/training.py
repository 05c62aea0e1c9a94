"""A site's part in federated training: the data-free check, the charged run, its rounds.

The site's Flower client app calls these three with the SuperNode's node config (``site``,
``policy``, ``bids-dir``, ``derivatives``) and the hub's
:class:`~fednipype.contract.training.TrainingRequest`:

:func:`check_training_request`
    the data-free check round: every refusal that needs no participant data (the site is one
    of the request's sites; its policy and ledger can be used; the data owner approved
    exactly this request — an unapproved or altered one is recorded as pending —; the policy
    allows the mode: ``"training-dp"`` in ``[federation] modes``, or ``allow_non_dp_training
    = true`` for mode ``none``; the site's public maximum cohort is within the request's;
    the run's rounds are not used up), a preview of the run's charge against the budget, and
    the requested regions present in the site's feature tables. Nothing is recorded but a
    pending request.
:func:`train_round`
    one FedAvg round: the site's participants' features and labels are read (first session
    per participant; those with a NaN feature or a missing label are left out, counted in the
    site's log only), split into training and held-out rows by
    :func:`fednipype.learn.fedavg.holdout_split` keyed by the request's hash, and
    :func:`fednipype.site.dpsgd.local_update` runs ``local_steps`` steps from the hub's
    parameters (mode ``distributed-dp``: the site's clipped gradient sum over all its
    training rows, on the request's integer grid, plus its OpenDP discrete Gaussian share,
    :func:`fednipype.site.dpsgd.discrete_gaussian_share`; the hub takes the FedSGD step from
    the SecAgg+ sum). The **first** round of a run charges the whole run's (ε, δ) — the
    accountant's ε for the request's noise (:meth:`TrainingRequest.spent`), composed by its
    own (ε, δ) in the ledger — before anything is returned, claims the owner's approval and
    releases the site's noisy count of its training rows (OpenDP Gaussian, σ_count of the
    request), which is kept in the ledger and reused by every round of the run as the site's
    FedAvg weight and the expected batch's denominator. A site answers at most ``rounds``
    rounds per request hash, ever: each is claimed in the ledger (one write transaction)
    before it is computed, so a replayed request gets no free rounds.
:func:`evaluate_round`
    mode ``none`` only: the metrics of the hub's parameters on the held-out rows. In mode
    ``dp`` no metric leaves the site: :func:`train_round` writes the held-out metrics of the
    parameters it receives to the site's log, and an evaluate call is refused.

Mode ``none`` (a non-DP run the policy opted into) charges nothing; its start is recorded in
the ledger as a non-DP disclosure, and its weight is the exact training-row count.

Every refusal carries public facts only (the site, the request's id, hash and fields, the
policy's switches) — never a count, a value or a local path: the texts are also set as the
exception's ``public_reason`` for the hub. Local details go to the site's log.

The feature tables and ``participants.tsv`` are read once per process and reused while none
of their files changed (:mod:`fednipype.site.table_cache`): a client app that answers every
message in one process reads them once per run, not once per round and evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from fednipype.contract.document import content_hash
from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import (
    DataError,
    FednipypeError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.learn import models
from fednipype.learn.accountant import DPConfig, accountant_name
from fednipype.learn.fedavg import holdout_split
from fednipype.site import approvals, dpsgd
from fednipype.site.accountant import Charge, composed_epsilon

# The statistics path's checks and refusals: one place for what a refusal may say.
from fednipype.site.answer import _check_approved, _open, _refusal
from fednipype.site.ledger import RELATIVE_TOLERANCE, PrivacyLedger
from fednipype.site.ledger_store import connect
from fednipype.site.node import _node_value
from fednipype.site.policy import TRAINING_MODES, SitePolicy
from fednipype.site.table_cache import read_feature_table, read_participants_table
from fednipype.site.training_record import (
    ROUND_KIND,
    STARTED_KIND,
    RunState,
    claim_evaluation,
    claim_round,
    record_start,
    run_state,
    used_up,
)

__all__ = [
    "ROUND_KIND",
    "STARTED_KIND",
    "RunState",
    "TrainingReply",
    "check_training_request",
    "evaluate_round",
    "run_state",
    "train_round",
]

LOGGER = logging.getLogger(__name__)

#: What the ledger's audit row of a training run's charge says it paid for.
PURPOSE = "federated training run"
#: The label column of each task in ``participants.tsv``, and the diagnosis task's coding.
LABEL_COLUMN = {"brain-age": "age", "diagnosis": "group"}
DIAGNOSIS_LEVELS = {"control": 0.0, "patient": 1.0}


@dataclass(frozen=True)
class TrainingReply:
    """One round's reply of a site.

    Attributes
    ----------
    w_local : ndarray or None
        The site's new local parameters ``[intercept, coef...]`` (scaled units); None in mode
        ``distributed-dp``.
    share : ndarray of int64 or None
        Mode ``distributed-dp``: the site's clipped gradient sum on the request's integer grid
        plus its discrete Gaussian share (:func:`fednipype.site.dpsgd.discrete_gaussian_share`);
        None in the other modes.
    weight : float
        Its FedAvg weight: the noisy count of its training rows, released at the run's first
        round (mode ``dp``), or their exact count (mode ``none``).
    metrics : dict or None
        Mode ``none``: the training loss of ``w_local`` and the training-row count; mode
        ``dp``: None (metrics stay in the site's log).
    """

    w_local: np.ndarray | None
    weight: float
    metrics: dict[str, float] | None
    share: np.ndarray | None = None


@dataclass(frozen=True)
class _Context:
    request: TrainingRequest
    node_config: Mapping[str, Any]
    policy: SitePolicy
    ledger: PrivacyLedger
    site: str
    where: str
    state: RunState


@dataclass(frozen=True)
class _Rows:
    """A site's complete rows for a task: ids, raw features (request order) and labels."""

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray


def _refuse(kind: type[FednipypeError], where: str, text: str) -> NoReturn:
    raise _refusal(kind, where, text)


# -- checks before anything is computed or recorded -------------------------------------------


def _checked(
    request: TrainingRequest, node_config: Mapping[str, Any], *, evaluating: bool = False
) -> _Context:
    """Every refusal on public facts, in order; the context of a round that may proceed
    (``evaluating``: an evaluation of a started run, which its used-up rounds do not stop)."""
    if not isinstance(request, TrainingRequest):
        raise RequestError(f"site training: expected a TrainingRequest, got {type(request)}")
    site = _node_value(node_config, "site")
    where = f"site {site}: training request {request.request_id} ({request.content_hash[:12]})"
    if site not in request.sites:
        _refuse(RequestError, where, "this site is not one of the request's sites")
    policy, ledger = _open(_node_value(node_config, "policy"), where)
    state = run_state(ledger, request.content_hash)
    if state.started:
        if state.rounds_answered >= request.rounds and not evaluating:
            _refuse(RequestError, where, used_up(request))
        if approvals.request_status(ledger, request.content_hash) == approvals.REFUSED:
            _refuse(RequestError, where, "the site's data owner refused this request")
    elif evaluating:
        _refuse(RequestError, where, "no round of this run was trained at this site")
    else:
        _check_approved(ledger, request, where)  # type: ignore[arg-type]
    if not policy.allows_training(request.mode):
        switch = (
            "[federation] allow_non_dp_training is not true"
            if request.mode == "none"
            else f"'{TRAINING_MODES[request.mode]}' is not in [federation] modes"
        )
        _refuse(
            PolicyError,
            where,
            f"the site's policy does not allow training in mode {request.mode} ({switch})",
        )
    mp = policy.max_participants
    if mp is None or mp > request.max_participants:
        _refuse(
            PolicyError,
            where,
            f"the site's public maximum cohort is not declared or exceeds the request's "
            f"max_participants {request.max_participants}",
        )
    return _Context(request, node_config, policy, ledger, site, where, state)


def _budget_text(request: TrainingRequest) -> str:
    epsilon, delta = request.spent()  # type: ignore[misc]
    return (
        f"the site's privacy budget does not cover the run's epsilon={epsilon:g}, "
        f"delta={delta:g} ({request.rounds} rounds)"
    )


def _preview_budget(context: _Context) -> None:
    """Refuse a run the remaining budget cannot cover (the charge itself is what counts)."""
    request, ledger = context.request, context.ledger
    if not request.dp or context.state.started:
        return
    epsilon, delta = request.spent()  # type: ignore[misc]
    with connect(ledger.path) as conn:
        charges = PrivacyLedger._charges(conn)  # the ledger's own reading of its charges
    total = ledger.total
    composed = composed_epsilon([*charges, Charge(epsilon, delta, None)], total.delta)
    if composed > total.epsilon * (1.0 + RELATIVE_TOLERANCE):
        _refuse(PrivacyBudgetExceeded, context.where, _budget_text(request))


def check_training_request(request: TrainingRequest, node_config: Mapping[str, Any]) -> None:
    """The data-free check of a training request at a SuperNode: nothing is computed or charged.

    Parameters
    ----------
    request : TrainingRequest
        The hub's request.
    node_config : Mapping
        The SuperNode's node config: ``site``, ``policy``, ``derivatives`` (the feature
        tables' region names are read; ``bids-dir`` is not read here).

    Raises
    ------
    RequestError, PolicyError, PrivacyBudgetExceeded, DataError
        With a text of public facts only (also its ``public_reason``).
    """
    context = _checked(request, node_config)
    _preview_budget(context)
    _features(context)


# -- the site's rows ------------------------------------------------------------------------


def _features(context: _Context) -> pd.DataFrame:
    """The site's regional-feature table (a copy); refusals when it lacks a requested region."""
    request, where = context.request, context.where
    derivatives = os.path.abspath(_node_value(context.node_config, "derivatives"))
    try:
        table = read_feature_table(derivatives).copy()
    except (FednipypeError, OSError, KeyError, ValueError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(DataError, where, "the site has no usable regional features for it")
    unknown = [r for r in request.regions if r not in table.columns]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", …" if len(unknown) > 5 else "")
        _refuse(RequestError, where, f"regions not in the site's atlas: {shown}")
    return table


def _site_rows(context: _Context) -> _Rows:
    """The site's participants with every requested feature and the task's label."""
    request, where, config = context.request, context.where, context.node_config
    table = _features(context)
    column = LABEL_COLUMN[request.task]
    try:
        bids = os.path.abspath(_node_value(config, "bids-dir"))
        files = [os.path.join(bids, f"participants.{ext}") for ext in ("tsv", "json")]
        participants = read_participants_table(bids, files).copy()
        if column not in participants.columns:
            raise DataError(f"{participants.attrs.get('source')}: no column {column!r}")
    except (FednipypeError, OSError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(
            DataError,
            where,
            f"the site's participants table does not hold the task's label ({column})",
        )
    first = table.groupby(level="participant_id", sort=True).head(1).droplevel("session")
    dropped = {"extra_sessions": len(table) - len(first)}
    known = first.index.isin(participants.index)
    dropped["no_participants_row"] = int((~known).sum())
    first = first.loc[known, list(request.regions)]
    labels = participants.loc[first.index, column]
    if request.task == "brain-age":
        y = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=float)
        has_label = np.isfinite(y)
    else:
        has_label = labels.isin(list(DIAGNOSIS_LEVELS)).to_numpy()
        y = labels.map(DIAGNOSIS_LEVELS).to_numpy(dtype=float)
    X = first.to_numpy(dtype=float)
    complete = np.isfinite(X).all(axis=1)
    dropped["missing_label"] = int((~has_label).sum())
    dropped["missing_feature"] = int((has_label & ~complete).sum())
    keep = has_label & complete
    dropped = {k: v for k, v in dropped.items() if v}
    if dropped:  # the site's log only: counts never leave the site
        LOGGER.info("%s: participants left out: %s", where, dropped)
    return _Rows(np.asarray(first.index[keep], dtype=str), X[keep], y[keep])


def _split(context: _Context, rows: _Rows) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Scaled ``(X, y)`` of the training and the held-out rows."""
    request = context.request
    scaling = request.scaling
    held = holdout_split(list(rows.ids), request.holdout_fraction, request.content_hash)
    Xs = scaling.transform(rows.X) if len(rows.ids) else rows.X.reshape(0, len(request.regions))
    y = rows.y
    if request.task == "brain-age" and y.size:
        y = scaling.label_transform(y)
    return (Xs[~held], y[~held]), (Xs[held], y[held])


def _parameters(context: _Context, w: Any, server_round: Any, first: int = 1) -> np.ndarray:
    request, where = context.request, context.where
    size = len(request.regions) + 1
    w = np.asarray(w, dtype=float).reshape(-1)
    if w.size != size or not np.all(np.isfinite(w)):
        _refuse(RequestError, where, f"expected {size} finite global parameters")
    if isinstance(server_round, bool) or not isinstance(server_round, int | np.integer):
        _refuse(RequestError, where, "the server round is not a whole number")
    if not first <= int(server_round) <= request.rounds:
        _refuse(RequestError, where, f"the server round is outside {first}..{request.rounds}")
    return w


def _held_out_metrics(request: TrainingRequest, w: np.ndarray, held) -> dict[str, float]:
    """Metrics of ``w`` on the held-out rows (ages in years); undefined ones left out."""
    Xs, y = held
    if not len(y):
        return {}
    prediction = models.predict_scaled(request.task, w, Xs)
    if request.task == "brain-age":
        scaling = request.scaling
        y, prediction = scaling.label_inverse(y), scaling.label_inverse(prediction)
    found = models.metrics(request.task, y, prediction)
    return {k: float(v) for k, v in found.items() if v is not None}


# -- the run's start: charge, claim, count -----------------------------------------------------


def _audit(context: _Context, n_train: int, n_held: int) -> dict[str, Any]:
    request = context.request
    noise = request.noise()
    return {
        "site": context.site,
        "request_hash": request.content_hash,
        "request_id": request.request_id,
        "task": request.task,
        "mode": request.mode,
        "sites": list(request.sites),
        "regions": len(request.regions),
        "rounds": request.rounds,
        "local_steps": request.local_steps,
        "steps": request.steps,
        "sampling_rate": request.sampling_rate,
        "clip": request.clip,
        "noise_multiplier": None if noise is None else noise[0],
        "distributed_noise": None
        if (shared := request.distributed_noise()) is None
        else shared.as_dict(),
        "count_noise_multiplier": None if noise is None else noise[1],
        "requested_epsilon": request.epsilon,
        "accountant": accountant_name(),
        "composition": "by its own (epsilon, delta) in this ledger",
        "n_train": n_train,
        "n_held_out": n_held,
    }


def _start(context: _Context, n_train: int, n_held: int) -> RunState:
    """Charge the whole run (``dp``) or record the disclosure (``none``), claim the approval,
    release the weight; recorded in the ledger before any round is computed."""
    request, ledger, where = context.request, context.ledger, context.where
    parameters = _audit(context, n_train, n_held)
    if not request.dp:
        if approvals.claim_answer(ledger, request, context.site) is not None:  # type: ignore[arg-type]
            _refuse(RequestError, where, "its approval was used by another run")
        approvals.record_disclosure(ledger, request, context.site, parameters)  # type: ignore[arg-type]
        LOGGER.warning("%s: a training run without noise (mode none) started", where)
        return record_start(context.ledger, request, context.site, float(n_train), None)
    epsilon, delta = request.spent()  # type: ignore[misc]
    with contextlib.ExitStack() as stack:
        # The whole run's charge first: a refusal records nothing. The approval is claimed
        # inside it (fail-closed: if another process used it meanwhile the charge stays).
        try:
            spend = stack.enter_context(
                ledger.reserve(epsilon, delta, PURPOSE, parameters, noise_multiplier=None)
            )
        except PrivacyBudgetExceeded as err:
            LOGGER.error("%s: %s", where, err)
            raise _refusal(PrivacyBudgetExceeded, where, _budget_text(request)) from err
        if approvals.claim_answer(ledger, request, context.site) is not None:  # type: ignore[arg-type]
            _refuse(RequestError, where, "its approval was used by another run")
        count = dpsgd.noisy_count(n_train, request.noise()[1])  # type: ignore[index]
        ledger.record_release(
            spend.charge_id,
            content_hash({"request_hash": request.content_hash, "noisy_count": count}),
        )
        spend.released = True  # the noisy count is the charge's one release
        return record_start(context.ledger, request, context.site, count, spend.charge_id)


# -- rounds ---------------------------------------------------------------------------------


def train_round(
    request: TrainingRequest, node_config: Mapping[str, Any], w: Any, server_round: int
) -> TrainingReply:
    """One FedAvg round at the site: checked, (first round) charged, claimed, trained.

    Parameters
    ----------
    request : TrainingRequest
        The hub's request.
    node_config : Mapping
        ``site``, ``policy``, ``bids-dir`` (``participants.tsv``) and ``derivatives`` (the
        ``*_desc-regional_features.tsv`` tables).
    w : array-like
        The hub's global parameters ``[intercept, coef...]`` (scaled units).
    server_round : int
        The hub's round number, 1..``rounds``.

    Returns
    -------
    TrainingReply

    Raises
    ------
    RequestError, PolicyError, PrivacyBudgetExceeded, DataError
        With a text of public facts only; before any charge, except that a round refused
        because the run's rounds are used up leaves the run's charge as it was.
    """
    context = _checked(request, node_config)
    w = _parameters(context, w, server_round)
    rows = _site_rows(context)
    (X_train, y_train), held = _split(context, rows)
    state = context.state
    if not state.started:
        state = _start(context, len(y_train), len(held[1]))
    number = claim_round(context.ledger, request, context.site, context.where, int(server_round))
    if request.dp:
        LOGGER.info(
            "%s: held-out metrics of the global parameters at round %d (site log only): %s",
            context.where,
            server_round,
            _held_out_metrics(request, w, held),
        )
    reply = _reply(context, w, X_train, y_train, float(state.weight))  # type: ignore[arg-type]
    LOGGER.info("%s: round %d of %d answered (server round %d)", context.where, number,
                request.rounds, server_round)  # fmt: skip
    return reply


def _reply(
    context: _Context, w: np.ndarray, X_train: np.ndarray, y_train: np.ndarray, weight: float
) -> TrainingReply:
    """The round's reply from the site's training rows: the distributed-dp share, or the
    local update (DP-SGD in mode ``dp``, plain gradient descent in mode ``none``)."""
    request = context.request
    if (shared := request.distributed_noise()) is not None:
        rows_gradient = models.per_example_gradients(request.task, w, X_train, y_train)
        share = dpsgd.discrete_gaussian_share(
            rows_gradient,
            request.clip,
            shared.grid_step,
            shared.sigma_site,  # type: ignore[arg-type]
        )
        return TrainingReply(None, weight, None, share)
    noise = request.noise()
    config = (
        None if noise is None else DPConfig(request.clip, noise[0], request.sampling_rate, weight)  # type: ignore[arg-type]
    )
    w_local = dpsgd.local_update(
        request.task,
        w,
        X_train,
        y_train,
        learning_rate=request.learning_rate,
        local_steps=request.local_steps,
        l2=request.l2,
        dp=config,
    )
    metrics = None
    if not request.dp and len(y_train):
        loss = models.loss(request.task, w_local, X_train, y_train, request.l2)
        metrics = {"loss": float(loss), "n": float(len(y_train))}
    return TrainingReply(np.asarray(w_local, dtype=float), weight, metrics)


def evaluate_round(
    request: TrainingRequest, node_config: Mapping[str, Any], w: Any, server_round: int
) -> dict[str, float]:
    """The metrics of the hub's parameters on the site's held-out rows (mode ``none`` only).

    Parameters
    ----------
    request, node_config, w, server_round
        As for :func:`train_round`.

    Returns
    -------
    dict
        brain-age: ``r2``, ``mae`` (years), ``loss``; diagnosis: ``auc``,
        ``balanced_accuracy``, ``loss`` — a metric that is undefined on the site's held-out
        rows (one class only, fewer than two rows) is left out — and ``n``, the held-out
        count.

    Raises
    ------
    RequestError, PolicyError, DataError
        Mode ``dp`` or ``distributed-dp`` (no metric leaves the site), a run not started at
        this site, more evaluations than rounds trained at this site (each is recorded in the
        ledger), or any refusal of :func:`train_round`; public facts only.
    """
    context = _checked(request, node_config, evaluating=True)
    if request.dp:
        _refuse(RequestError, context.where, f"in mode {request.mode} no metric leaves the site")
    w = _parameters(context, w, server_round, first=0)
    _, held = _split(context, _site_rows(context))
    claim_evaluation(context.ledger, request, context.where, int(server_round))
    found = _held_out_metrics(request, w, held)
    return {**found, "n": float(len(held[1]))} if found else {}
