"""The test app's client app: the real SiteClient and secaggplus_mod, with known vectors.

Site ``p`` (the simulation's ``partition-id``, or node config ``partition-id`` in a
deployment) is labelled ``site-p`` and sends ``echo_vector(p)``: uniform integers in
``[-B, B]`` from ``numpy.random.default_rng([seed, p])`` with the extremes planted in the
first four entries (``+B``, ``-B`` at every site; ``+B`` / ``-B`` alternating by site).
Partitions in ``echo-refuse`` refuse the check; those in ``echo-fail-fit`` accept it and
then fail in the SecAgg+ round with an error text that must not reach the hub.
With ``secure-aggregation = false`` (a benchmark's plain baseline) the mod is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import Client
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fednipype.exceptions import PrivacyBudgetExceeded, RequestError
from fednipype.federated.app.client_app import SiteClient


def echo_vector(partition: int, *, bound: int, size: int, seed: int) -> np.ndarray:
    """The known vector of site ``partition``."""
    vec = np.random.default_rng([seed, partition]).integers(-bound, bound + 1, size=size)
    vec[:4] = [
        bound,
        -bound,
        bound if partition % 2 else -bound,
        -bound if partition % 2 else bound,
    ]
    return vec.astype(np.int64)


def _partition(node_config: Mapping[str, Any]) -> int:
    return int(node_config["partition-id"])


def _label(node_config: Mapping[str, Any]) -> str:
    return f"site-{_partition(node_config)}"


def _listed(run_config: Mapping[str, Any], key: str, node_config: Mapping[str, Any]) -> bool:
    listed = {int(p) for p in str(run_config[key]).split(",") if p.strip()}
    return _partition(node_config) in listed


def _check(run_config: Mapping[str, Any], request_text: str, node_config: Mapping[str, Any]):
    if _listed(run_config, "echo-refuse", node_config):
        raise RequestError(f"request not approved at {_label(node_config)}: recorded as pending")


def _vector(run_config: Mapping[str, Any], request_text: str, node_config: Mapping[str, Any]):
    if _listed(run_config, "echo-fail-fit", node_config):
        raise PrivacyBudgetExceeded("spent 0.97 of 1.0 by 181 participants")  # private text
    return echo_vector(
        _partition(node_config),
        bound=int(run_config["site-bound"]),
        size=int(run_config["echo-size"]),
        seed=int(run_config["echo-seed"]),
    )


def _secagg_unless_plain(msg: Message, context: Context, call_next: Any) -> Message:
    if context.run_config.get("secure-aggregation", True):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def client_fn(context: Context) -> Client:
    run_config = context.run_config
    return SiteClient(
        context.node_config,
        label=_label,
        check=partial(_check, run_config),
        vector=partial(_vector, run_config),
    ).to_client()


app = ClientApp(client_fn=client_fn, mods=[_secagg_unless_plain])
