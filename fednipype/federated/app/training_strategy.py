"""The hub's legacy Flower strategy for FedAvg through SecAgg+, and a bounded evaluate round.

:class:`FedAvgSecAggStrategy` sends the global parameters to the sites that accepted the
training request and are still connected, receives (under SecAgg+) only the unmasked sum of
their fixed-point vectors (:class:`~fednipype.federated.app.training_codec.FixedPointCodec`)
and divides it: ``w <- Σ m_k w_k / Σ m_k`` (:func:`fednipype.learn.fedavg.fedavg`'s rule);
in mode ``distributed-dp`` the sum is of the sites' noisy gradient sums and the hub takes the
FedSGD step (:func:`fednipype.learn.fedavg.fedsgd_step`).
In mode ``none`` it also asks the round's contributors for their held-out metrics and
aggregates them weighted by each site's held-out count; in mode ``dp`` it never asks.

Server-side: imports the contract, the codec and the transport, never the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    FitIns,
    Parameters,
    ndarrays_to_parameters,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid

from fednipype.exceptions import FederationError
from fednipype.federated.app.strategy import _failure_text, connected, error_text, summed_vector
from fednipype.federated.app.training_codec import FixedPointCodec, GradientCodec

__all__ = ["FedAvgSecAggStrategy", "RoundRecord", "bounded_evaluate_workflow"]

LOGGER = logging.getLogger(__name__)
_TASK = "training"


@dataclass
class RoundRecord:
    """What the hub learnt in one round (public: sums, and metrics sites chose to send)."""

    round: int
    contributors: list[str]
    total_weight: float
    failures: list[str] = field(default_factory=list)
    loss: float | None = None
    #: The global parameters after the round (scaled units; the hub's own, public).
    parameters: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "round": self.round,
            "contributors": list(self.contributors),
            "total_weight": self.total_weight,
            "failures": list(self.failures),
            "parameters": list(self.parameters),
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "site_metrics": {k: dict(v) for k, v in self.site_metrics.items()},
        }


class FedAvgSecAggStrategy(Strategy):
    """FedAvg whose ``aggregate_fit`` receives one SecAgg+ sum of fixed-point vectors.

    Parameters
    ----------
    accepted : mapping of int to str
        Node id -> site label of the sites that accepted in the check round.
    request_text : str
        The training request's JSON text (sent with every instruction).
    codec : FixedPointCodec or GradientCodec
        The fixed-point map of the sites' weighted models (FedAvg), or of their noisy
        gradient sums (``distributed-dp``: the hub takes the FedSGD step).
    min_sites : int
        The fewest contributors whose sum is used.
    secure : bool
        Whether the fit rounds run SecAgg+ (else a benchmark's plain baseline).
    evaluate : bool
        Whether to ask the contributors for held-out metrics (mode ``none`` only).
    """

    def __init__(
        self,
        *,
        accepted: Mapping[int, str],
        request_text: str,
        codec: FixedPointCodec | GradientCodec,
        min_sites: int,
        secure: bool = True,
        evaluate: bool = False,
    ) -> None:
        super().__init__()
        self._accepted = dict(accepted)
        self._request_text = request_text
        self.codec = codec
        self._encoding = codec.encoding()
        self.min_sites = min_sites
        self._secure = secure
        self._evaluate = evaluate
        self.w = np.zeros(codec.n_params)
        self.rounds: list[RoundRecord] = []
        #: The global parameters after each completed round.
        self.kept: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FedAvgSecAggStrategy(sites={len(self._accepted)}, secure={self._secure})"

    def _config(self, server_round: int) -> dict[str, Any]:
        return {"task": _TASK, "request": self._request_text, "round": server_round}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial global parameters (zeros)."""
        return ndarrays_to_parameters([self.w])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The global parameters to every accepted site that is still connected."""
        config = {**self._config(server_round), **self.codec.config()}
        params = ndarrays_to_parameters([self.w])
        return [
            (proxy, FitIns(params, dict(config)))
            for proxy in connected(client_manager, self._accepted)
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, Any]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Decode the sum of the contributors' vectors; the new global parameters."""
        reasons = list(dict.fromkeys(_failure_text(failure) for failure in failures))
        if len(results) < self.min_sites:
            LOGGER.error("round %d: %d contributors, fewer than %d", server_round, len(results),
                         self.min_sites)  # fmt: skip
            return None, {}
        total, _ = summed_vector(results, self._encoding, secure=self._secure)
        self.w = self.codec.step(self.w, total)
        self.kept[server_round] = self.w.copy()
        contributors = sorted(self._accepted[proxy.node_id] for proxy, _ in results)
        self.rounds.append(
            RoundRecord(
                server_round,
                contributors,
                self.codec.total_weight(total),
                reasons,
                parameters=[float(v) for v in self.w],
            )
        )
        return ndarrays_to_parameters([self.w]), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Mode ``none``: this round's contributors evaluate the new global parameters."""
        if not self._evaluate or not self.rounds or self.rounds[-1].round != server_round:
            return []
        labels = set(self.rounds[-1].contributors)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        params = ndarrays_to_parameters([self.w])
        return [
            (proxies[node_id], EvaluateIns(params, self._config(server_round)))
            for node_id, label in sorted(self._accepted.items())
            if label in labels and node_id in proxies
        ]

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, Any]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Any]]:
        """Held-out metrics weighted by each site's held-out count; kept in the round."""
        record = self.rounds[-1] if self.rounds else None
        if record is None or record.round != server_round or not results:
            return None, {}
        losses, weights, per_metric = [], [], {}
        for proxy, res in results:
            site = self._accepted.get(proxy.node_id, "")
            numbers = {k: float(v) for k, v in res.metrics.items() if k != "site"}
            record.site_metrics[site] = {**numbers, "loss": float(res.loss), "n": res.num_examples}
            losses.append(float(res.loss))
            weights.append(float(res.num_examples))
            for key, value in numbers.items():
                per_metric.setdefault(key, []).append((value, float(res.num_examples)))
        record.loss = float(np.average(losses, weights=weights))
        record.metrics = {
            key: float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs]))
            for key, pairs in per_metric.items()
        }
        record.failures += [_failure_text(f) for f in failures]
        return record.loss, dict(record.metrics)

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """No centralised evaluation (the hub holds no data)."""
        return None


def bounded_evaluate_workflow(timeout: float) -> Callable[[Grid, Context], None]:
    """Flower's evaluate round with ``timeout`` on the exchange (the default waits forever)."""

    def run(grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise FederationError("evaluate round: expected a LegacyContext")
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        instructions = context.strategy.configure_evaluate(
            current, parameters, context.client_manager
        )
        if not instructions:
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = [
            Message(
                content=compat.evaluateins_to_recorddict(ins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.EVALUATE,
                group_id=f"evaluate-{current}",
            )
            for proxy, ins in instructions
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        # message ids are set when the grid sends: match replies to what was sent after it
        sent = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        results, failures = [], []
        for reply in replies:
            node_id = sent.get(reply.metadata.reply_to_message_id)
            if reply.has_content() and node_id in proxies:
                results.append((proxies[node_id], compat.recorddict_to_evaluateres(reply.content)))
            else:
                failures.append(
                    Exception(error_text(reply.error.reason) if reply.has_error() else "")
                )
        context.strategy.aggregate_evaluate(current, results, failures)

    return run
