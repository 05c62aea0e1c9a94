"""The hub's legacy Flower strategy and workflows for one secure-sum round.

- :class:`SecureSumStrategy` samples exactly the sites that accepted the request in the
  check round and decodes, in ``aggregate_fit``, the one aggregate SecAgg+ hands it;
- :class:`QuorumSecAggPlusWorkflow` is Flower's ``SecAggPlusWorkflow`` halting before any
  unmasking when fewer than the request's minimum number of sites remain;
- :func:`plain_fit_workflow` is the bounded plain round of a benchmark's baseline.

Server-side: imports the transport, never the site.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid

from fednipype.exceptions import FederationError
from fednipype.federated.transport import SecAggEncoding

__all__ = [
    "QuorumSecAggPlusWorkflow",
    "SecureSumStrategy",
    "SumOutcome",
    "error_text",
    "plain_fit_workflow",
]

LOGGER = logging.getLogger(__name__)

# Flower's error reason for an exception raised in a ClientApp: "<class 'X'>:<'text'>" on a
# SuperNode; in simulation, Ray's traceback ending in "... occurred. Message: text".
_CLIENT_ERROR = re.compile(r"^<class '[^']*'>:<'(?P<text>.*)'>$", re.DOTALL)
_SIMULATION_ERROR = re.compile(r"Message: (?P<text>[^\n]*)\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 300


def error_text(reason: str) -> str:
    """The client's own message out of Flower's error reason (no traceback, one line).

    Examples
    --------
    >>> error_text("<class 'fednipype.exceptions.FederationError'>:<'refused: budget'>")
    'refused: budget'
    """
    reason = _ANSI.sub("", reason).strip()
    for pattern in (_CLIENT_ERROR.match, _SIMULATION_ERROR.search):
        match = pattern(reason)
        if match:
            reason = match.group("text").strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:_MAX_REASON]


def _failure_text(failure: Any) -> str:
    """The public text of a failure the workflow collected (``Exception(Error)``)."""
    arg = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    reason = getattr(arg, "reason", None)
    return error_text(reason if isinstance(reason, str) else str(arg))


def connected(client_manager: ClientManager, accepted: Iterable[int]) -> list[ClientProxy]:
    """The proxies of the ``accepted`` node ids still connected, in node-id order."""
    proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
    return [proxies[node_id] for node_id in sorted(accepted) if node_id in proxies]


def summed_vector(
    results: list[tuple[ClientProxy, Any]], encoding: SecAggEncoding, *, secure: bool
) -> tuple[np.ndarray, int]:
    """The exact integer sum of a fit round's vectors, and how many distinct payloads came.

    Under SecAgg+ every result carries the same unmasked aggregate (anything else is an
    error); the plain baseline sums the vectors received in the clear.
    """
    payloads: dict[bytes, Parameters] = {}
    for _, fitres in results:
        payloads.setdefault(b"".join(fitres.parameters.tensors), fitres.parameters)
    if not secure:
        vectors = [parameters_to_ndarrays(fitres.parameters)[0] for _, fitres in results]
        return encoding.plain_sum(vectors), len(payloads)
    if len(payloads) != 1:
        raise FederationError(
            f"secure sum: aggregate_fit received {len(payloads)} distinct vectors; SecAgg+ "
            "hands it one aggregate"
        )
    (aggregate,) = (parameters_to_ndarrays(p) for p in payloads.values())
    return encoding.decode(aggregate[0], len(results)), 1


@dataclass
class SumOutcome:
    """What :class:`SecureSumStrategy.aggregate_fit` received, decoded."""

    total: np.ndarray
    node_ids: list[int]
    distinct_parameters: int
    failures: list[str]


class SecureSumStrategy(Strategy):
    """A legacy strategy for one round whose ``aggregate_fit`` decodes the secure sum.

    Parameters
    ----------
    accepted : mapping of int to str
        Node id -> site label of the sites that accepted in the check round; only these
        are sampled.
    fit_config : dict
        The fit instructions' config (the request text and the encoding's bound).
    encoding : SecAggEncoding
        The transport's encoding.
    secure : bool
        Whether the fit round runs SecAgg+ (``aggregate_fit`` then receives one vector).
    """

    def __init__(
        self,
        *,
        accepted: Mapping[int, str],
        fit_config: dict[str, Any],
        encoding: SecAggEncoding,
        secure: bool = True,
    ) -> None:
        super().__init__()
        self._accepted = dict(accepted)
        self._fit_config = dict(fit_config)
        self._encoding = encoding
        self._secure = secure
        self.outcome: SumOutcome | None = None

    def __repr__(self) -> str:
        return f"SecureSumStrategy(sites={len(self._accepted)}, secure={self._secure})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """No model: empty parameters (so no site is asked for any)."""
        return ndarrays_to_parameters([])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample exactly the accepted sites that are still connected."""
        return [
            (proxy, FitIns(parameters, dict(self._fit_config)))
            for proxy in connected(client_manager, self._accepted)
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, Any]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Decode the sum; under SecAgg+ every result carries the same unmasked aggregate."""
        if not results:
            return None, {}
        total, distinct = summed_vector(results, self._encoding, secure=self._secure)
        self.outcome = SumOutcome(
            total=total,
            node_ids=[proxy.node_id for proxy, _ in results],
            distinct_parameters=distinct,
            # Distinct reasons: Flower's collect stage lists each failed reply twice.
            failures=list(dict.fromkeys(_failure_text(failure) for failure in failures)),
        )
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """No evaluation round."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Any]]:
        """No evaluation round."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """No centralised evaluation."""
        return None


class QuorumSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that halts before unmasking when fewer than ``min_sites`` remain.

    Flower's workflow halts only below the reconstruction threshold; a request's minimum
    number of sites can be larger, and the sum of fewer sites must never be unmasked.
    """

    def __init__(self, *args: Any, min_sites: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites
        self.halted: str | None = None
        self.live_at_halt: set[int] = set()

    def _quorum(self, ok: bool, state: Any, stage: str) -> bool:
        live = len(state.active_node_ids)
        if ok and live < self.min_sites:
            LOGGER.error("SecAgg+ %s: %d sites left, fewer than %d", stage, live, self.min_sites)
            ok = False
        if not ok and self.halted is None:
            self.halted = f"{stage} stage with {live} site(s) answering"
            self.live_at_halt = set(state.active_node_ids)
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's setup stage, then the quorum."""
        return self._quorum(super().setup_stage(grid, context, state), state, "setup")

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's share-keys stage, then the quorum."""
        return self._quorum(super().share_keys_stage(grid, context, state), state, "share-keys")

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's collect stage, then the quorum (before any unmasking)."""
        ok = super().collect_masked_vectors_stage(grid, context, state)
        return self._quorum(ok, state, "collect-masked-vectors")


def plain_fit_workflow(timeout: float) -> Callable[[Grid, Context], None]:
    """A bounded plain fit round (the non-secure baseline of a benchmark).

    Flower's ``default_fit_workflow`` waits without a time limit; this one is the same
    round with ``timeout`` on the exchange.
    """

    def run(grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise FederationError("plain fit round: expected a LegacyContext")
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        instructions = context.strategy.configure_fit(current, parameters, context.client_manager)
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = [
            Message(
                content=compat.fitins_to_recorddict(ins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.TRAIN,
                group_id=str(current),
            )
            for proxy, ins in instructions
        ]
        results, failures = [], []
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_content() and reply.metadata.src_node_id in proxies:
                fitres = compat.recorddict_to_fitres(reply.content, False)
                results.append((proxies[reply.metadata.src_node_id], fitres))
            else:
                failures.append(Exception(reply.error.reason if reply.has_error() else ""))
        context.strategy.aggregate_fit(current, results, failures)

    return run
