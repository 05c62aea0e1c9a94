"""A site's side of federated training: check, local rounds through SecAgg+, held-out metrics.

The client app (:mod:`fednipype.federated.app.client_app`) hands a run whose run config says
``task = "training"`` to :class:`TrainingClient`, which answers three kinds of message, each
carrying ``task = "training"`` and the training request's JSON text in its config:

- ``get_properties`` (the hub's data-free check round): the site checks the request
  (:func:`fednipype.site.training.check_training_request`: addressed to it, approved by its
  data owner, allowed by its policy, its budget covers the whole run, its feature tables hold
  the regions) and answers ``accepted`` or ``refused`` with a public reason. Nothing is
  trained or charged.
- ``fit`` (one FedAvg round, under ``secaggplus_mod`` only): the site trains from the hub's
  global parameters (:func:`fednipype.site.training.train_round`, which charges the whole
  run's (ε, δ) before its first reply) and returns its weighted model as the integer vector
  of :class:`~fednipype.federated.app.training_codec.FixedPointCodec`, encoded for the
  transport; SecAgg+ masks it, so the hub sees only the sum over sites.
- ``evaluate`` (mode ``none`` only, which the site's owner opted into): the metrics of the
  global parameters on the site's held-out split
  (:func:`fednipype.site.training.evaluate_round`). In mode ``dp`` no metric leaves the site:
  an evaluate message is refused.

Refusals and failures carry public text only (:func:`~fednipype.federated.app.client_app.
public_reason`). The site's functions are reached through :func:`training_check`,
:func:`training_update` and :func:`training_evaluate`, which import :mod:`fednipype.site`
when called; :class:`TrainingSite` bundles other functions for a test app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import NumPyClient

from fednipype.exceptions import FederationError, PolicyError, RequestError
from fednipype.federated.app.training_codec import FixedPointCodec, GradientCodec
from fednipype.federated.transport import FIT_NUM_EXAMPLES

if TYPE_CHECKING:
    from fednipype.contract.training import TrainingRequest

__all__ = [
    "TASK",
    "TrainingClient",
    "TrainingSite",
    "training_check",
    "training_evaluate",
    "training_update",
]

LOGGER = logging.getLogger(__name__)

#: The value of the ``task`` key of a training run's run config and messages.
TASK = "training"

NodeConfig = Mapping[str, Any]
UpdateFn = Callable[["TrainingRequest", NodeConfig, np.ndarray, int], tuple[np.ndarray, float]]
EvaluateFn = Callable[["TrainingRequest", NodeConfig, np.ndarray, int], dict[str, Any]]
CheckFn = Callable[["TrainingRequest", NodeConfig], None]


# -- the seam to the site -----------------------------------------------------------------


def training_check(request: TrainingRequest, node_config: NodeConfig) -> None:
    """The site's data-free check of a training request (refusals raise)."""
    # Imported here: the site package is needed only where a site's SuperNode runs.
    from fednipype.site import training

    training.check_training_request(request, node_config)


def training_update(
    request: TrainingRequest, node_config: NodeConfig, w: np.ndarray, server_round: int
) -> tuple[np.ndarray, float]:
    """The site's local parameters (``distributed-dp``: its integer share) and weight."""
    from fednipype.site import training

    reply = training.train_round(request, node_config, w, server_round)
    if reply.share is not None:  # distributed-dp: the noisy integer gradient sum
        return np.asarray(reply.share, dtype=np.int64), float(reply.weight)
    return np.asarray(reply.w_local, dtype=np.float64), float(reply.weight)


def training_evaluate(
    request: TrainingRequest, node_config: NodeConfig, w: np.ndarray, server_round: int
) -> dict[str, Any]:
    """The metrics of ``w`` on the site's held-out split (mode ``none`` only)."""
    from fednipype.site import training

    return dict(training.evaluate_round(request, node_config, w, server_round))


@dataclass(frozen=True)
class TrainingSite:
    """The site's three training functions (the defaults are the site's real ones)."""

    check: CheckFn = training_check
    update: UpdateFn = training_update
    evaluate: EvaluateFn = training_evaluate


# -- the client ---------------------------------------------------------------------------


def _request(config: Mapping[str, Any], *, check: bool = False) -> TrainingRequest:
    # The check round's message (shared with statistics runs) carries only the request; the
    # run config's task chose this client, and the text must parse as a training request.
    if not check and config.get("task") != TASK:
        raise RequestError("the message is not part of a training run")
    text = config.get("request")
    if not isinstance(text, str):
        raise RequestError("the message carried no training request text")
    # Imported here: a deployed SuperNode starts one process per message, and only the
    # messages that carry a request need the contract (its accountant imports dp-accounting,
    # ~0.7 s); SecAgg+'s key-sharing and unmasking stages do not.
    from fednipype.contract.training import TrainingRequest

    return TrainingRequest.from_json(text, source="the hub's training request")


def _round(config: Mapping[str, Any]) -> int:
    value = config.get("round")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FederationError(f"training message: expected a round >= 1, got {value!r}")
    return value


def _global(parameters: list[np.ndarray], n_params: int) -> np.ndarray:
    if len(parameters) != 1:
        raise FederationError(f"training message: expected 1 array, got {len(parameters)}")
    w = np.asarray(parameters[0], dtype=np.float64).reshape(-1)
    if w.size != n_params or not np.all(np.isfinite(w)):
        raise FederationError(
            f"training message: expected {n_params} finite global parameters, got {w.size}"
        )
    return w


class TrainingClient(NumPyClient):
    """The NumPyClient of one site for one message of a training run.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's node config.
    label : callable
        The site's public label from its node config.
    site : TrainingSite
        The site's check, update and evaluate functions.
    public_reason : callable
        The public text of a refusal or failure.
    """

    def __init__(
        self,
        node_config: NodeConfig,
        *,
        label: Callable[[NodeConfig], str],
        site: TrainingSite,
        public_reason: Callable[[BaseException], str],
    ) -> None:
        self._node_config = dict(node_config)
        self._label = label
        self._site = site
        self._public = public_reason

    def _site_label(self) -> str:
        try:
            return self._label(self._node_config)
        except Exception:  # noqa: BLE001 - reported as unknown, the reason logged
            LOGGER.exception("the site's label could not be read")
            return ""

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """The check round: accepted, or refused with a public reason."""
        label = self._site_label()
        try:
            self._site.check(_request(config, check=True), self._node_config)
        except Exception as err:  # noqa: BLE001 - every refusal leaves as public text only
            LOGGER.warning("training request refused: %s", err)
            return {"site": label, "status": "refused", "reason": self._public(err)}
        return {"site": label, "status": "accepted", "reason": ""}

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """One round: the site's weighted model as the transport's encoded integer vector."""
        try:
            request = _request(config)
            codec: FixedPointCodec | GradientCodec
            if request.distributed:  # the site derives the codec from the request it approved
                codec = GradientCodec.for_request(request)
                codec.check_config(config)
            else:
                codec = FixedPointCodec.from_config(config)
            if codec.n_params != len(request.regions) + 1:
                raise FederationError("fit config: n-params differs from the request's regions")
            w = _global(parameters, codec.n_params)
            vector, weight = self._site.update(request, self._node_config, w, _round(config))
            encoded = codec.encoding().encode(codec.encode(vector, weight))
        except Exception as err:  # noqa: BLE001 - only the public reason leaves the site
            LOGGER.exception("the site did not answer the training round")
            raise FederationError(self._public(err)) from None
        return [encoded], FIT_NUM_EXAMPLES, {"site": self._site_label()}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Held-out metrics of the global parameters (mode ``none`` only)."""
        try:
            request = _request(config)
            if request.dp:
                raise PolicyError(f"mode {request.mode}: no metric leaves the site")
            w = _global(parameters, len(request.regions) + 1)
            metrics = self._site.evaluate(request, self._node_config, w, _round(config))
            loss = metrics.get("loss")
            if not isinstance(loss, int | float) or not np.isfinite(loss):
                raise FederationError("evaluate: the site's metrics have no finite loss")
            n = metrics.get("n", 1)
            n = int(n) if isinstance(n, int | float) and n >= 1 else 1
            public = {
                k: float(v)
                for k, v in metrics.items()
                if k != "n" and isinstance(v, int | float) and np.isfinite(v)
            }
        except Exception as err:  # noqa: BLE001 - only the public reason leaves the site
            LOGGER.exception("the site did not evaluate the global model")
            raise FederationError(self._public(err)) from None
        return float(loss), n, {**public, "site": self._site_label()}
