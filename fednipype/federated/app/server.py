"""The hub's side of a federated run: a data-free check round, one SecAgg+ round, the sum on disk.

The run has two exchanges, bounded by the run config's ``check-timeout`` and ``timeout``:

1. **Check** (plain ``get_properties`` messages, no data): every connected SuperNode gets the
   request's text and answers ``accepted`` or ``refused`` with a public reason, and the
   public label of its site. Refusals (not approved by the data owner, mode not allowed,
   budget, ...) happen here, before anything is computed or charged. Nodes that do not
   answer in time count as absent.
2. **Secure sum** (Flower's legacy path: ``LegacyContext`` + ``DefaultWorkflow`` with a
   ``SecAggPlusWorkflow``): only the sites that accepted are sampled; each returns its
   integer vector encoded by :class:`~fednipype.federated.transport.SecAggEncoding`, and
   :class:`SecureSumStrategy` receives only the unmasked sum. The workflow halts before
   unmasking when fewer than ``min_sites`` sites are left, so the hub never learns a sum of
   fewer sites than the request allows.

The outcome (the summed vector, which sites contributed, refused, dropped or were absent,
the transport's parameters and the wall times) is written to ``OUT_DIR/secure_sum.json``
(schema ``fednipype-secure-sum/1.0``) for :func:`fednipype.hub.federated.pooled_from_sum`;
a run that cannot complete writes the same file with ``"status": "failed"`` and a one-line
error, then raises :class:`~fednipype.exceptions.FederationError`.

This module is server-side: it imports the contract and the transport, never the site.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common import GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp.grid import Grid

from fednipype.contract import secure_sum
from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import FederationError, FednipypeError
from fednipype.federated.app.polling import PollingGrid
from fednipype.federated.app.strategy import (
    QuorumSecAggPlusWorkflow,
    SecureSumStrategy,
    error_text,
    plain_fit_workflow,
)
from fednipype.federated.transport import MAX_SUM_BOUND, SecAggEncoding

__all__ = [
    "OUTPUT_NAME",
    "SCHEMA",
    "RunSettings",
    "SiteReply",
    "check_round",
    "run_secure_sum",
]

LOGGER = logging.getLogger(__name__)

SCHEMA = "fednipype-secure-sum/1.0"
OUTPUT_NAME = "secure_sum.json"
_POLL_S = 1.0


# -- the run config -------------------------------------------------------------------------


def _value(config: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    if key not in config:
        raise FederationError(f"run config: key '{key}' is missing (expected {what})")
    value = config[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise FederationError(f"run config: key '{key}': expected {what}, got {value!r}")
    return value


@dataclass(frozen=True)
class RunSettings:
    """The server app's run config (``[tool.flwr.app.config]``, kebab-case keys).

    Parameters
    ----------
    request : Path
        ``request``: the analysis request file (absolute path on the hub).
    out_dir : Path
        ``out-dir``: where ``secure_sum.json`` is written.
    min_sites : int
        ``min-sites``: the fewest sites whose sum the hub accepts (the request's
        ``min_sites`` applies too: the larger one counts).
    num_shares, reconstruction_threshold : int or float
        ``num-shares``, ``reconstruction-threshold``: SecAgg+'s, as ``SecAggPlusWorkflow``
        takes them (an int > 2 and an int below it, or fractions).
    timeout : float
        ``timeout``: seconds each SecAgg+ stage waits for replies (how long a site that died
        mid-round can hold the run up).
    check_timeout : float
        ``check-timeout``: seconds the data-free check round waits for replies (a SuperNode
        installs the app on its first message, which may take longer; default 120).
    connect_timeout : float
        ``connect-timeout``: seconds to wait for the request's sites to connect.
    site_bound : int
        ``site-bound``: the largest ``|integer|`` one site sends; ``0`` (the default) takes
        the request's grid bound (``contract.secure_sum.Grid.for_request``), which the sites
        derive from the request alike.
    secure_aggregation : bool
        ``secure-aggregation``: ``false`` only for the plain baseline of a benchmark (the
        strategy then sees every site's vector; a site's client app with ``secaggplus_mod``
        refuses such a run).
    """

    request: Path
    out_dir: Path
    min_sites: int
    num_shares: int | float
    reconstruction_threshold: int | float
    timeout: float
    connect_timeout: float
    site_bound: int
    secure_aggregation: bool = True
    check_timeout: float = 120.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read and check the run config.

        Raises
        ------
        FederationError
            A key is missing or has the wrong type or range (naming the key).
        """
        number = (int, float)
        settings = cls(
            request=Path(_value(config, "request", (str,), "the request file's path")),
            out_dir=Path(_value(config, "out-dir", (str,), "the output folder's path")),
            min_sites=_value(config, "min-sites", (int,), "an integer >= 2"),
            num_shares=_value(config, "num-shares", number, "SecAgg+'s number of shares"),
            reconstruction_threshold=_value(
                config, "reconstruction-threshold", number, "SecAgg+'s threshold"
            ),
            timeout=float(_value(config, "timeout", number, "seconds > 0")),
            connect_timeout=float(_value(config, "connect-timeout", number, "seconds >= 0")),
            site_bound=_value(config, "site-bound", (int,), "0 or an integer >= 1"),
            secure_aggregation=bool(config.get("secure-aggregation", True)),
            check_timeout=float(_value(config, "check-timeout", number, "seconds > 0"))
            if "check-timeout" in config
            else 120.0,
        )
        if not str(settings.request) or not str(settings.out_dir) or str(settings.out_dir) == ".":
            raise FederationError("run config: keys 'request' and 'out-dir' must name paths")
        if settings.min_sites < 2:
            raise FederationError(
                f"run config: key 'min-sites': expected an integer >= 2, got {settings.min_sites}"
            )
        if (
            not (settings.timeout > 0 and settings.check_timeout > 0)
            or settings.connect_timeout < 0
        ):
            raise FederationError(
                "run config: keys 'timeout', 'check-timeout' and 'connect-timeout': expected "
                "seconds > 0, > 0 and >= 0"
            )
        if settings.site_bound < 0 or settings.site_bound > MAX_SUM_BOUND:
            raise FederationError(
                f"run config: key 'site-bound': expected 0 (the request's grid) or 1 to "
                f"{MAX_SUM_BOUND}, got {settings.site_bound}"
            )
        return settings


# -- the check round --------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteReply:
    """One node's answer to the check round (public facts only)."""

    node_id: int
    site: str
    status: str  # "accepted", "refused", "error" or "no-reply"
    reason: str = ""


def check_round(
    grid: Grid, node_ids: Iterable[int], request_text: str, timeout: float
) -> list[SiteReply]:
    """Ask every node, without data, whether its site answers the request.

    Parameters
    ----------
    grid : Grid
        The server app's grid.
    node_ids : iterable of int
        The connected nodes to ask.
    request_text : str
        The request's JSON text; each site checks approval, mode and budget against it.
    timeout : float
        Seconds to wait for the replies.

    Returns
    -------
    list of SiteReply
        One per node, in the order given; nodes that did not reply have ``"no-reply"``.
    """
    ids = list(node_ids)
    content = GetPropertiesIns(config={"request": request_text})
    messages = [
        Message(
            content=compat.getpropertiesins_to_recorddict(content),
            dst_node_id=node_id,
            message_type=MessageTypeLegacy.GET_PROPERTIES,
            group_id="check",
        )
        for node_id in ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Error replies may come from the SuperLink, so match replies to what was sent.
    sent = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
    answers: dict[int, SiteReply] = {}
    for reply in replies:
        node_id = sent.get(reply.metadata.reply_to_message_id)
        if node_id is None:
            continue
        if reply.has_error():
            answers[node_id] = SiteReply(node_id, "", "error", error_text(reply.error.reason))
            continue
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        status = str(props.get("status", ""))
        if status not in ("accepted", "refused"):
            answers[node_id] = SiteReply(node_id, "", "error", "malformed check reply")
            continue
        answers[node_id] = SiteReply(
            node_id, str(props.get("site", "")), status, str(props.get("reason", ""))
        )
    return [
        answers.get(node_id, SiteReply(node_id, "", "no-reply", f"no reply in {timeout:g} s"))
        for node_id in ids
    ]


def _screen(replies: list[SiteReply], sites: tuple[str, ...]) -> list[SiteReply]:
    """Refuse accepted replies whose label is not one of the request's or is claimed twice."""
    claimed: dict[str, int] = {}
    for reply in replies:
        if reply.status == "accepted":
            claimed[reply.site] = claimed.get(reply.site, 0) + 1
    screened = []
    for reply in replies:
        if reply.status == "accepted" and reply.site not in sites:
            reply = SiteReply(reply.node_id, reply.site, "error", "site label not in the request")
        elif reply.status == "accepted" and claimed[reply.site] > 1:
            reply = SiteReply(
                reply.node_id, reply.site, "error", "site label claimed by several nodes"
            )
        screened.append(reply)
    return screened


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Record:
    """The output document, filled as the run goes."""

    settings: RunSettings
    doc: dict[str, Any] = field(
        default_factory=lambda: {"schema": SCHEMA, "status": "running", "error": None}
    )
    started: float = field(default_factory=time.monotonic)

    def write(self, status: str, error: str | None = None) -> Path:
        self.doc.update(status=status, error=error)
        self.doc.setdefault("timings_s", {})["total"] = round(time.monotonic() - self.started, 3)
        out_dir = self.settings.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / OUTPUT_NAME
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".secure_sum-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.doc, handle, indent=1, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, target)
        return target


def _wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= want or time.monotonic() >= deadline:
            return node_ids
        time.sleep(_POLL_S)


def _site_table(
    sites: tuple[str, ...], replies: list[SiteReply], contributors: set[int] | None
) -> list[dict[str, Any]]:
    """One row per request site (slot order): its check-round answer, then what it did.

    Before the SecAgg+ round (``contributors`` None) a site is ``accepted``, ``refused``,
    ``error``, ``no-reply`` or ``absent`` (not connected); after it an accepted site is
    ``contributed`` or ``dropped``.
    """
    by_site = {r.site: r for r in replies if r.site in sites}
    rows = []
    for site in sites:
        reply = by_site.get(site)
        if reply is None:
            rows.append({"site": site, "node_id": None, "status": "absent", "reason": ""})
        elif reply.status == "accepted":
            if contributors is None:
                status = "accepted"
            else:
                status = "contributed" if reply.node_id in contributors else "dropped"
            rows.append({"site": site, "node_id": reply.node_id, "status": status, "reason": ""})
        else:
            rows.append(
                {
                    "site": site,
                    "node_id": reply.node_id,
                    "status": reply.status,
                    "reason": reply.reason,
                }  # fmt: skip
            )
    return rows


def run_secure_sum(grid: Grid, context: Context) -> Path:
    """Run the check round and one SecAgg+ round; write ``OUT_DIR/secure_sum.json``.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FederationError
        Too few sites accepted or stayed (the file says which and why), a bad run config,
        or an unreadable request (``RequestError``).
    """
    settings = RunSettings.from_run_config(context.run_config)
    grid = PollingGrid(grid)  # replies pulled every 0.25 s rather than Flower's 3 s
    record = _Record(settings)
    try:
        return _run(grid, context, settings, record)
    except FednipypeError as err:
        record.write("failed", str(err))
        raise


def _run(grid: Grid, context: Context, settings: RunSettings, record: _Record) -> Path:
    request = AnalysisRequest.from_file(settings.request)
    min_sites = max(settings.min_sites, request.min_sites)
    bound = settings.site_bound
    if bound == 0:  # the request's grid, which every site derives from the request alike
        bound = secure_sum.Grid.for_request(request, capacity=MAX_SUM_BOUND).bound
    encoding = SecAggEncoding.for_bound(bound, n_sites=len(request.sites))
    record.doc.update(
        request_id=request.request_id,
        request_hash=request.content_hash,
        mode=request.mode,
        min_sites=min_sites,
        secure_aggregation=settings.secure_aggregation,
        transport={
            "site_bound": encoding.site_bound,
            "limbs": encoding.limbs,
            "limb_bits": encoding.limb_bits,
            **encoding.workflow_parameters(),
            "num_shares": settings.num_shares,
            "reconstruction_threshold": settings.reconstruction_threshold,
            "timeout_s": settings.timeout,
            "check_timeout_s": settings.check_timeout,
        },
    )
    timings = record.doc.setdefault("timings_s", {})

    tic = time.monotonic()
    node_ids = _wait_for_nodes(grid, len(request.sites), settings.connect_timeout)
    timings["wait"] = round(time.monotonic() - tic, 3)
    tic = time.monotonic()
    replies = _screen(
        check_round(grid, node_ids, request.dumps(), settings.check_timeout), request.sites
    )
    timings["check"] = round(time.monotonic() - tic, 3)
    accepted = {r.node_id: r.site for r in replies if r.status == "accepted"}
    record.doc["sites"] = _site_table(request.sites, replies, None)
    record.doc["other_nodes"] = [r.node_id for r in replies if r.site not in request.sites]
    if len(accepted) < min_sites:
        raise FederationError(
            f"check round: {len(accepted)} of {len(request.sites)} sites accepted the request "
            f"and min-sites is {min_sites}; see 'sites' in {OUTPUT_NAME} for each site's reason"
        )

    strategy = SecureSumStrategy(
        accepted=accepted,
        fit_config={"request": request.dumps(), **encoding.config()},
        encoding=encoding,
        secure=settings.secure_aggregation,
    )
    if settings.secure_aggregation:
        fit_workflow: Any = QuorumSecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            min_sites=min_sites,
            timeout=settings.timeout,
            **encoding.workflow_parameters(),
        )
    else:
        fit_workflow = plain_fit_workflow(settings.timeout)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    tic = time.monotonic()
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    timings["aggregation"] = round(time.monotonic() - tic, 3)

    outcome = strategy.outcome
    contributors = set(outcome.node_ids) if outcome else set()
    record.doc["sites"] = _site_table(request.sites, replies, contributors)
    if outcome is None or len(contributors) < min_sites:
        halted = getattr(fit_workflow, "halted", None) or "the fit round"
        live = getattr(fit_workflow, "live_at_halt", set())
        record.doc["sites"] = [  # halted: who was still there, and who had dropped
            {**row, "status": "accepted" if row["node_id"] in live else "dropped"}
            if row["status"] == "dropped"
            else row
            for row in record.doc["sites"]
        ]
        raise FederationError(
            f"secure sum: halted at the {halted}; fewer than min-sites = {min_sites} sites "
            "remained, so no sum was unmasked"
        )
    record.doc.update(
        sum=[int(v) for v in outcome.total],
        contributors=[
            row["site"] for row in record.doc["sites"] if row["status"] == "contributed"
        ],
        aggregate_fit={
            "results": len(outcome.node_ids),
            "distinct_parameters": outcome.distinct_parameters,
            "failures": outcome.failures,
        },
    )
    path = record.write("completed")
    LOGGER.info("secure sum of %d sites written to %s", len(contributors), path)
    return path
