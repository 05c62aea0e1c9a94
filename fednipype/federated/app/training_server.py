"""The hub's side of federated training: check round, FedAvg rounds through SecAgg+, model file.

Run when the run config says ``task = "training"`` (:mod:`fednipype.federated.app.server_app`):

1. **Check** (:func:`fednipype.federated.app.server.check_round`, no data): every connected
   SuperNode gets the training request's text and answers ``accepted`` or ``refused`` with a
   public reason (not approved, mode not allowed, budget does not cover the whole run,
   regions missing from its tables). Nothing is trained or charged.
2. **Rounds** (Flower's legacy path: ``LegacyContext`` with a
   :class:`~fednipype.federated.app.strategy.QuorumSecAggPlusWorkflow` fit round per FedAvg
   round): the accepted, still connected sites get the global parameters, each returns its
   weighted local model as a fixed-point integer vector, and
   :class:`~fednipype.federated.app.training_strategy.FedAvgSecAggStrategy` divides the
   unmasked sum. Each SecAgg+ stage waits at most ``timeout``: a site that dies mid-round is
   dropped and the round completes with the others if at least ``min_sites`` remain; a
   round that cannot (fewer remain) ends the training. In mode ``none`` a bounded evaluate
   exchange follows each round (the held-out metrics of the sites, aggregated weighted), and
   ``patience`` > 0 stops early when the aggregated held-out loss has not improved for that
   many rounds (the best round's parameters are kept). In mode ``dp`` no metric is asked for.
3. **Output** (:mod:`fednipype.hub.training`): ``training.json`` (the record),
   ``metrics.tsv`` and the model file ``model.json`` with its provenance, in ``out-dir``.
   A run without a completed round writes only ``training.json`` with ``"status":
   "failed"`` and raises :class:`~fednipype.exceptions.FederationError`.

Server-side: imports the contract, learn, the hub and the transport, never the site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid

from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import FederationError, FednipypeError
from fednipype.federated.app.polling import PollingGrid
from fednipype.federated.app.server import (
    RunSettings,
    _screen,
    _site_table,
    _value,
    _wait_for_nodes,
    check_round,
)
from fednipype.federated.app.strategy import QuorumSecAggPlusWorkflow, plain_fit_workflow
from fednipype.federated.app.training_codec import DEFAULT_PARAM_BOUND, codec_for_request
from fednipype.federated.app.training_strategy import (
    FedAvgSecAggStrategy,
    bounded_evaluate_workflow,
)
from fednipype.hub import training as hub_training
from fednipype.learn.models import initial_parameters

__all__ = ["TrainingSettings", "run_training"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """The training run's settings: the statistics app's keys plus three of its own.

    Parameters
    ----------
    base : RunSettings
        ``request`` (the training request file), ``out-dir``, ``min-sites``, ``num-shares``,
        ``reconstruction-threshold``, ``timeout``, ``check-timeout``, ``connect-timeout``,
        ``secure-aggregation``.
    param_bound : float
        ``param-bound``: every parameter a site sends is clipped to ``±param-bound`` (scaled
        units; the fixed-point codec's public bound).
    patience : int
        ``patience``: mode ``none``: stop when the held-out loss has not improved for this
        many rounds (0: never stop early).
    evaluate : bool
        ``evaluate``: mode ``none``: ask the sites for held-out metrics each round.
    """

    base: RunSettings
    param_bound: float = DEFAULT_PARAM_BOUND
    patience: int = 0
    evaluate: bool = True

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> TrainingSettings:
        """Read and check the run config (FederationError naming a bad key)."""
        base = RunSettings.from_run_config({"site-bound": 0, **config})
        bound = float(config.get("param-bound", DEFAULT_PARAM_BOUND))
        if not 0 < bound < float("inf"):
            raise FederationError(f"run config: key 'param-bound': expected > 0, got {bound}")
        patience = (
            _value(config, "patience", (int,), "an integer >= 0") if ("patience" in config) else 0
        )
        if patience < 0:
            raise FederationError(f"run config: key 'patience': expected >= 0, got {patience}")
        return cls(base, bound, patience, bool(config.get("evaluate", True)))


def run_training(grid: Grid, context: Context) -> Path:
    """Run the check round and the FedAvg rounds; write the record, metrics and model file.

    Returns
    -------
    Path
        The model file.

    Raises
    ------
    FederationError
        Too few sites accepted, no round completed, or a bad run config; ``RequestError``
        for an unreadable request. ``training.json`` says which and why.
    """
    settings = TrainingSettings.from_run_config(context.run_config)
    grid = PollingGrid(grid)  # replies pulled every 0.25 s rather than Flower's 3 s
    record: dict[str, Any] = {"schema": hub_training.RECORD_SCHEMA, "status": "running"}
    begin = time.monotonic()
    out = settings.base.out_dir
    try:
        return _run(grid, context, settings, record, begin)
    except Exception as err:  # every failure leaves a record; unexpected ones named as such
        text = str(err) if isinstance(err, FednipypeError) else f"{type(err).__name__}: {err}"
        record.update(status="failed", error=text)
        record.setdefault("rounds", [])
        record.setdefault("request_hash", None)
        record.setdefault("sites", [])
        record.setdefault("timings_s", {})["total"] = round(time.monotonic() - begin, 3)
        hub_training.write_json(record, out / hub_training.RECORD_NAME)
        raise


def _run(
    grid: Grid, context: Context, settings: TrainingSettings, record: dict[str, Any], begin: float
) -> Path:
    base = settings.base
    request = TrainingRequest.from_file(base.request)
    min_sites = max(base.min_sites, request.min_sites)
    request.check_secure_aggregation(base.secure_aggregation)
    codec = codec_for_request(request, param_bound=settings.param_bound)
    evaluate = settings.evaluate and not request.dp
    record.update(
        request_id=request.request_id,
        request_hash=request.content_hash,
        task=request.task,
        mode=request.mode,
        min_sites=min_sites,
        rounds_requested=request.rounds,
        secure_aggregation=base.secure_aggregation,
        evaluate=evaluate,
        patience=settings.patience,
        transport={
            **codec.config(),
            "limbs": codec.encoding().limbs,
            "num_shares": base.num_shares,
            "reconstruction_threshold": base.reconstruction_threshold,
            "timeout_s": base.timeout,
            "check_timeout_s": base.check_timeout,
        },
    )
    timings = record.setdefault("timings_s", {})
    tic = time.monotonic()
    node_ids = _wait_for_nodes(grid, request.k, base.connect_timeout)
    timings["wait"] = round(time.monotonic() - tic, 3)
    tic = time.monotonic()
    answers = check_round(grid, node_ids, request.dumps(), base.check_timeout)
    replies = _screen(answers, request.sites)
    timings["check"] = round(time.monotonic() - tic, 3)
    checks = _site_table(request.sites, replies, None)
    record["sites"] = hub_training.site_participation(request, checks, [])
    accepted = {r.node_id: r.site for r in replies if r.status == "accepted"}
    if len(accepted) < min_sites:
        raise FederationError(
            f"check round: {len(accepted)} of {request.k} sites accepted the training request "
            f"and min-sites is {min_sites}; see 'sites' in {hub_training.RECORD_NAME} for "
            "each site's reason"
        )

    strategy = FedAvgSecAggStrategy(
        accepted=accepted,
        request_text=request.dumps(),
        codec=codec,
        min_sites=min_sites,
        secure=base.secure_aggregation,
        evaluate=evaluate,
    )
    strategy.w = initial_parameters(len(request.regions))
    halted, early_stop, best_round, round_times = _rounds(
        grid, context, settings, request, strategy
    )
    timings["rounds"] = round_times
    rounds = [r.as_dict() for r in strategy.rounds]
    record["rounds"] = rounds
    record["sites"] = hub_training.site_participation(request, checks, rounds)
    record.update(halted=halted, early_stop=early_stop)
    if not rounds:
        raise FederationError(f"training: no round completed ({halted or 'no contributors'})")
    w = strategy.w if best_round is None else strategy.kept[best_round]
    record.update(
        rounds_run=len(rounds),
        best_round=best_round,
        w=[float(v) for v in w],
        privacy_spent=hub_training.privacy_spent(request),
        software=hub_training.software_versions(),
    )
    # "stopped": fewer than min-sites remained in a round; the last completed round's model
    record["status"] = "completed" if halted is None else "stopped"
    timings["total"] = round(time.monotonic() - begin, 3)
    target = base.out_dir / hub_training.MODEL_NAME
    model = hub_training.write_model(target, request, w, record)
    hub_training.write_metrics_tsv(rounds, base.out_dir / hub_training.METRICS_NAME)
    hub_training.write_json(record, base.out_dir / hub_training.RECORD_NAME)
    LOGGER.info("model of %d rounds written to %s", len(rounds), model)
    return model


def _rounds(
    grid: Grid,
    context: Context,
    settings: TrainingSettings,
    request: TrainingRequest,
    strategy: FedAvgSecAggStrategy,
) -> tuple[str | None, str | None, int | None, list[float]]:
    """The FedAvg rounds (Flower's ``DefaultWorkflow`` loop, with a stop after any round).

    Returns why a round halted (None: none did), why training stopped early (None: it did
    not), the best round when early stopping is on, and each round's wall time.
    """
    base = settings.base
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=request.rounds), strategy=strategy
    )
    evaluate = bounded_evaluate_workflow(base.timeout)
    best: tuple[float, int] | None = None
    halted: str | None = None
    early_stop: str | None = None
    times: list[float] = []
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        registered.wait()
        params = strategy.initialize_parameters(legacy.client_manager)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            params, keep_input=True
        )
        config = ConfigRecord()
        config[WorkflowKey.START_TIME] = time.monotonic()
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = config
        for current in range(1, request.rounds + 1):
            tic = time.monotonic()
            config[WorkflowKey.CURRENT_ROUND] = current
            if base.secure_aggregation:
                fit: Any = QuorumSecAggPlusWorkflow(
                    num_shares=base.num_shares,
                    reconstruction_threshold=base.reconstruction_threshold,
                    min_sites=strategy.min_sites,
                    timeout=base.timeout,
                    **strategy.codec.encoding().workflow_parameters(),
                )
            else:
                fit = plain_fit_workflow(base.timeout)
            fit(grid, legacy)
            if not strategy.rounds or strategy.rounds[-1].round != current:
                where = getattr(fit, "halted", None) or "the fit round"
                halted = (
                    f"round {current} halted at the {where}: fewer than min-sites = "
                    f"{strategy.min_sites} sites remained"
                )
                times.append(round(time.monotonic() - tic, 3))
                break
            evaluate(grid, legacy)
            times.append(round(time.monotonic() - tic, 3))
            loss = strategy.rounds[-1].loss
            if settings.patience and loss is not None:
                if best is None or loss < best[0]:
                    best = (loss, current)
                elif current - best[1] >= settings.patience:
                    early_stop = (
                        f"after round {current}: no better held-out loss in "
                        f"{settings.patience} round(s) than round {best[1]}"
                    )
                    break
    finally:
        stop.set()
        thread.join(timeout=30.0)
    return halted, early_stop, (best[1] if best is not None else None), times
