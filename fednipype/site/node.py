"""A SuperNode's view of a site: its node config → the data-free check and the answer.

The site's Flower client app (:mod:`fednipype.federated.app.client_app`) calls these two with
the SuperNode's node config (``site``, ``policy``, ``bids-dir``, ``derivatives``):
:func:`check_request` in the hub's data-free check round, :func:`answer_node_request` in the
secure-aggregation round (:func:`fednipype.site.answer.answer_request` on the site's files).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fednipype.bids import find_feature_files
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import DEFAULT_CAPACITY
from fednipype.exceptions import (
    DataError,
    FednipypeError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.features import read_features
from fednipype.site.accountant import Charge, composed_epsilon

# The answer's own checks and refusals: one place for what a refusal may say.
from fednipype.site.answer import (
    SiteAnswer,
    _checked,
    _planned_multiplier,
    _refuse,
    answer_request,
)
from fednipype.site.ledger import RELATIVE_TOLERANCE, PrivacyLedger
from fednipype.site.ledger_store import connect

__all__ = ["answer_node_request", "check_request"]

LOGGER = logging.getLogger(__name__)


def check_request(request: AnalysisRequest, node_config: Mapping[str, Any]) -> None:
    """The data-free check of a request at a SuperNode: nothing is computed or charged.

    Runs every refusal of :func:`answer_request` that needs no participant data (site,
    ledger, approval — an unapproved request is recorded as pending —, policy, grid, the
    site having feature tables of an atlas with the requested regions: the region names of
    one table, which are the atlas's) and previews the charge against the ledger's budget
    (the charge itself, at answer time, is what counts).

    Parameters
    ----------
    request : AnalysisRequest
        The hub's request.
    node_config : Mapping
        The SuperNode's node config: ``site``, ``policy``, ``derivatives`` (one feature
        table's region names are read; ``bids-dir`` is not read here).

    Raises
    ------
    RequestError, PolicyError, PrivacyBudgetExceeded
        With a text of public facts only.
    """
    site, policy = _node_value(node_config, "site"), _node_value(node_config, "policy")
    context = _checked(request, policy, site, DEFAULT_CAPACITY)
    _check_atlas_regions(request, _node_value(node_config, "derivatives"), context.where)
    if request.mode == "exact":
        return
    ledger = context.ledger
    with connect(ledger.path) as conn:
        charges = PrivacyLedger._charges(conn)  # the ledger's own reading of its charges
    planned = Charge(request.epsilon, request.delta, _planned_multiplier(context))
    if composed_epsilon([*charges, planned], ledger.total.delta) > ledger.total.epsilon * (
        1.0 + RELATIVE_TOLERANCE
    ):
        _refuse(
            PrivacyBudgetExceeded,
            context.where,
            f"the site's privacy budget does not cover epsilon={request.epsilon:g}, "
            f"delta={request.delta:g}",
        )


def _check_atlas_regions(request: AnalysisRequest, derivatives: str, where: str) -> None:
    """Refuse (public facts only) when the site has no feature tables or their atlas lacks a
    requested region: the names come from one table's ``name`` column (the atlas's labels)."""
    try:
        features = find_feature_files(derivatives)
        names = set(read_features(features[0])["name"].astype(str))
    except (FednipypeError, OSError, IndexError, KeyError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(DataError, where, "the site has no usable regional features for it")
    unknown = [r for r in request.regions if r not in names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", …" if len(unknown) > 5 else "")
        _refuse(RequestError, where, f"regions not in the site's atlas: {shown}")


def answer_node_request(request: AnalysisRequest, node_config: Mapping[str, Any]) -> SiteAnswer:
    """:func:`answer_request` with the files a SuperNode's node config names.

    Parameters
    ----------
    request : AnalysisRequest
        The hub's request.
    node_config : Mapping
        ``site`` (the public label), ``policy`` (the site policy), ``bids-dir`` (the dataset
        with ``participants.tsv``) and ``derivatives`` (the participant level's output, with
        the ``*_desc-regional_features.tsv`` tables).

    Returns
    -------
    SiteAnswer
    """
    site = _node_value(node_config, "site")
    where = f"site {site}: request {request.request_id} ({request.content_hash[:12]})"
    try:
        features = find_feature_files(_node_value(node_config, "derivatives"))
    except (FednipypeError, OSError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(DataError, where, "the site has no usable regional features for it")
    return answer_request(
        request,
        _node_value(node_config, "policy"),
        features=features,
        participants=_node_value(node_config, "bids-dir"),
        site=site,
    )


def _node_value(node_config: Mapping[str, Any], key: str) -> str:
    value = node_config.get(key)
    if not isinstance(value, str) or not value:
        raise PolicyError(f"node config: key {key!r} is missing (the SuperNode's --node-config)")
    return value
