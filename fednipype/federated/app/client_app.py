"""A site's Flower client app: checks the hub's request, then answers through SecAgg+ only.

The client app runs inside a site's SuperNode, whose node config names the site's files
(``site``, ``policy``, ``bids-dir``, ``derivatives``). It answers two kinds of message:

- ``get_properties`` (the hub's data-free check round): the request's JSON text comes in
  the config; the site checks it (approved by the data owner, mode allowed, budget) and
  answers ``{"site", "status": "accepted" | "refused", "reason"}``. Nothing is computed or
  charged here.
- ``fit`` (the SecAgg+ round): the site computes its integer vector for the request and
  returns it encoded by :class:`~fednipype.federated.transport.SecAggEncoding`, with
  ``num_examples = 1`` and its public label as the only metric. ``secaggplus_mod`` masks it
  before it leaves; a fit message that is not part of a SecAgg+ round is rejected by the mod,
  so this app never sends a vector in the clear.

A run whose run config says ``task = "training"`` (federated training) is answered by
:class:`~fednipype.federated.app.training_client.TrainingClient` instead (check, FedAvg rounds
through the same SecAgg+ transport, held-out metrics in mode ``none`` only); every other run
is a statistics run, as above.

Only public facts leave the site: a refusal's reason is a fixed sentence per kind of
refusal (or the exception's ``public_reason`` attribute when the site sets one), never the
text of an unexpected error, which stays in the site's log.

The site's computation is reached through one seam, :func:`site_check` and
:func:`site_vector`, which import :mod:`fednipype.site.node` when called (the server side
of the federation must not import the site, and the app's modules stay importable on a
hub that has no site data). :func:`make_client_app` builds the same app around other
functions (e.g. a test app that sends known vectors).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fednipype.exceptions import (
    DisclosureError,
    FederationError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.federated.app.training_client import TASK as TRAINING_TASK
from fednipype.federated.app.training_client import TrainingClient, TrainingSite
from fednipype.federated.transport import FIT_NUM_EXAMPLES, SecAggEncoding

__all__ = [
    "SiteClient",
    "app",
    "make_client_app",
    "public_reason",
    "site_check",
    "site_label",
    "site_vector",
    "simulated_node_config",
]

LOGGER = logging.getLogger(__name__)

NodeConfig = Mapping[str, Any]
LabelFn = Callable[[NodeConfig], str]
CheckFn = Callable[[str, NodeConfig], None]
VectorFn = Callable[[str, NodeConfig], np.ndarray]

# One public sentence per kind of refusal: the exception's own text may hold private facts.
_PUBLIC_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (PrivacyBudgetExceeded, "refused: the site's privacy budget does not cover the request"),
    (DisclosureError, "refused: the site's disclosure controls do not allow the request"),
    (PolicyError, "refused: the site's policy does not allow the request (mode or opt-in)"),
    (
        RequestError,
        "refused: the request is not approved by the site's data owner, altered, or not "
        "addressed to this site",
    ),
)
_UNEXPECTED = "the site could not answer (the reason is in the site's log)"


def public_reason(err: BaseException) -> str:
    """The text a refusal may carry to the hub: public facts only.

    Examples
    --------
    >>> public_reason(PrivacyBudgetExceeded("spent 0.93 of 1.0 on 212 participants"))
    "refused: the site's privacy budget does not cover the request"
    >>> public_reason(ValueError("/data/site/sub-01 unreadable"))
    "the site could not answer (the reason is in the site's log)"
    """
    explicit = getattr(err, "public_reason", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    for kind, text in _PUBLIC_REASONS:
        if isinstance(err, kind):
            return text
    return _UNEXPECTED


# -- the seam to the site -----------------------------------------------------------------


def site_label(node_config: NodeConfig) -> str:
    """The site's public label, from the SuperNode's node config key ``site``.

    Raises
    ------
    FederationError
        When the node config has no ``site``.
    """
    label = node_config.get("site")
    if not isinstance(label, str) or not label:
        raise FederationError("node config: key 'site' (the site's public label) is missing")
    return label


def site_check(request_text: str, node_config: NodeConfig) -> None:
    """Check the request at the site without computing or charging anything.

    Raises a refusal (``RequestError``, ``PolicyError``, ``PrivacyBudgetExceeded``,
    ``DisclosureError``) when the site does not answer it; an unapproved request is
    recorded as pending in the site's ledger.
    """
    # Imported here: the site package is needed only where a site's SuperNode runs, and the
    # contract (pandas, scipy) only by the messages that carry a request. A deployed
    # SuperNode starts one process per message: SecAgg+'s key-sharing and unmasking stages
    # are spared about 0.9 s of imports each.
    from fednipype.contract.request import AnalysisRequest
    from fednipype.site import node

    request = AnalysisRequest.from_json(request_text, source="the hub's request")
    node.check_request(request, node_config)


def site_vector(request_text: str, node_config: NodeConfig) -> np.ndarray:
    """The site's integer vector for the request (checked, charged, computed, encoded)."""
    # Imported here: the site package is needed only where a site's SuperNode runs, and the
    # contract (pandas, scipy) only by the messages that carry a request. A deployed
    # SuperNode starts one process per message: SecAgg+'s key-sharing and unmasking stages
    # are spared about 0.9 s of imports each.
    from fednipype.contract.request import AnalysisRequest
    from fednipype.site import node

    request = AnalysisRequest.from_json(request_text, source="the hub's request")
    return np.asarray(node.answer_node_request(request, node_config).vector)


def simulated_node_config(node_config: NodeConfig, run_config: NodeConfig) -> dict[str, Any]:
    """A simulated node's site configuration, from the run config's ``simulation-sites``.

    Flower's simulation engine gives its nodes only ``partition-id`` and
    ``num-partitions``; a simulation run names a JSON file (a list of node configs, one per
    partition) in ``simulation-sites``. A SuperNode of a deployment has its own ``site`` in
    its node config and is never redirected: the file is read only for a node config with a
    ``partition-id`` and without ``site``.
    """
    config = dict(node_config)
    path = run_config.get("simulation-sites", "")
    if "site" in config or "partition-id" not in config or not path:
        return config
    try:
        with open(str(path), encoding="utf-8") as handle:
            sites = json.load(handle)
        config.update(sites[int(config["partition-id"])])
    except (OSError, ValueError, IndexError, KeyError, TypeError) as err:
        raise FederationError(f"{path}: simulation-sites: no node config here ({err})") from None
    return config


# -- the client ---------------------------------------------------------------------------


class SiteClient(NumPyClient):
    """The NumPyClient of one site for one message.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's node config.
    label, check, vector : callables
        The site's public label, its check and its vector (see :func:`site_label`,
        :func:`site_check`, :func:`site_vector`).
    """

    def __init__(
        self, node_config: NodeConfig, *, label: LabelFn, check: CheckFn, vector: VectorFn
    ) -> None:
        self._node_config = dict(node_config)
        self._label = label
        self._check = check
        self._vector = vector

    def _site(self) -> str:
        try:
            return self._label(self._node_config)
        except Exception:  # noqa: BLE001 - the label is reported as unknown, the reason logged
            LOGGER.exception("the site's label could not be read")
            return ""

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """The check round: accepted, or refused with a public reason."""
        site = self._site()
        try:
            request_text = config.get("request")
            if not isinstance(request_text, str):
                raise RequestError("the check carried no request text")
            self._check(request_text, self._node_config)
        except Exception as err:  # noqa: BLE001 - every refusal leaves as public text only
            LOGGER.warning("request refused: %s", err)
            return {"site": site, "status": "refused", "reason": public_reason(err)}
        return {"site": site, "status": "accepted", "reason": ""}

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """The SecAgg+ round: the site's integer vector, encoded for the transport."""
        try:
            encoding = SecAggEncoding.from_config(config)
            request_text = config.get("request")
            if not isinstance(request_text, str):
                raise RequestError("the fit instructions carried no request text")
            encoded = encoding.encode(self._vector(request_text, self._node_config))
        except Exception as err:  # noqa: BLE001 - only the public reason leaves the site
            LOGGER.exception("the site did not answer the request")
            raise FederationError(public_reason(err)) from None
        return [encoded], FIT_NUM_EXAMPLES, {"site": self._site()}


def make_client_app(
    *,
    label: LabelFn = site_label,
    check: CheckFn = site_check,
    vector: VectorFn = site_vector,
    training: TrainingSite | None = None,
) -> ClientApp:
    """A ``ClientApp`` whose fit replies go through ``secaggplus_mod``.

    Parameters
    ----------
    label, check, vector : callables
        The site's functions; the defaults are the site's real ones.
    training : TrainingSite, optional
        The site's training functions (default: the site's real ones), used when the run
        config's ``task`` is ``"training"``.
    """
    site_training = training if training is not None else TrainingSite()

    def client_fn(context: Context) -> Client:
        node_config = simulated_node_config(context.node_config, context.run_config)
        if context.run_config.get("task", "statistics") == TRAINING_TASK:
            return TrainingClient(
                node_config, label=label, site=site_training, public_reason=public_reason
            ).to_client()
        return SiteClient(node_config, label=label, check=check, vector=vector).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


app = make_client_app()
