"""The hub's report of a federated run: ``secure_sum.json`` to pooled tables, plots and a page.

The server app (:mod:`fednipype.federated.app.server`) leaves one document per run,
``secure_sum.json`` (schema ``fednipype-secure-sum/1.0``): its status, the summed integer
vector, which sites contributed, and each other site's public reason. This module turns a
completed document into what ``fednipype-meta`` hands out, with the same file names and
columns:

``pooled_results.tsv``
    :func:`fednipype.hub.federated.pooled_from_sum`: the pooled regression with site
    intercepts, one row per region and term, noise-aware standard errors, original units.
``site_estimates.tsv``
    Each contributing site's own intercept (the only per-site quantity a secure sum holds:
    no per-site slopes, hence no meta-analysis rows).
``forest_<region>_intercept.png``
    Site intercepts next to the pooled intercept (:mod:`fednipype.hub.reports.forest`).
``index.html``
    The summary page.
``federation.json``
    The run's public record: request id and hash, mode, (ε, δ), the sites that contributed,
    those that dropped, refused or were absent with their public reasons, the transport's
    parameters and the wall times.

It is post-processing of the sum only: no network, no site code, no noise drawn.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fednipype import __version__
from fednipype.contract.distributed_dp import request_noise
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import Grid, dp_sigma
from fednipype.exceptions import FederationError
from fednipype.hub.federated import pooled_from_sum
from fednipype.hub.reports import (
    HTML_NAME,
    MAX_DEFAULT_PLOT_REGIONS,
    SITES_TSV_NAME,
    TSV_NAME,
    plot_filename,
)
from fednipype.hub.reports.forest import forest_plot
from fednipype.io import atomic_write_json, atomic_write_text

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FEDERATION_NAME",
    "FEDERATION_SCHEMA",
    "SECURE_SUM_NAME",
    "FederatedReport",
    "FederatedResult",
    "failure_message",
    "federation_record",
    "pool_secure_sum",
    "read_secure_sum",
    "write_federated_report",
]

#: The server app's output (the name and schema of ``fednipype.federated.app.server``; the
#: hub does not import the federation's modules, it reads their document).
SECURE_SUM_NAME = "secure_sum.json"
SECURE_SUM_SCHEMA = "fednipype-secure-sum/1.0"
FEDERATION_NAME = "federation.json"
FEDERATION_SCHEMA = "fednipype-federation/1.0"


def read_secure_sum(path: str | os.PathLike[str], request: AnalysisRequest) -> dict[str, Any]:
    """Read a ``secure_sum.json`` of ``request``, whatever its status.

    Raises
    ------
    FederationError
        The file is missing, not JSON, of another schema, or of another request (its hash).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FederationError(f"{path}: the server app wrote no result") from None
    except (OSError, ValueError) as err:
        raise FederationError(f"{path}: unreadable ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SECURE_SUM_SCHEMA:
        raise FederationError(f"{path}: schema: expected {SECURE_SUM_SCHEMA!r}")
    if doc.get("request_hash", request.content_hash) != request.content_hash:
        raise FederationError(
            f"{path}: request_hash: expected {request.content_hash[:16]}… (the request given), "
            f"got {str(doc['request_hash'])[:16]}…"
        )
    return doc


def _site_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = doc.get("sites") or []
    return [
        {"site": str(r.get("site", "")), "status": str(r.get("status", "")),
         "reason": str(r.get("reason") or "")}
        for r in rows if isinstance(r, Mapping)
    ]  # fmt: skip


def failure_message(doc: Mapping[str, Any]) -> str:
    """One line: why a run failed, and each site that did not answer with its public reason."""
    error = str(doc.get("error") or f"status {doc.get('status')!r}")
    others = [
        f"{r['site']} {r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
        for r in _site_rows(doc)
        if r["status"] not in ("accepted", "contributed")
    ]
    return error + (f"; sites: {'; '.join(others)}" if others else "")


@dataclass(frozen=True)
class FederatedResult:
    """The pooled regression of one completed federated run.

    Attributes
    ----------
    request : AnalysisRequest
    secure_sum : dict
        The server app's document (``status`` ``completed``).
    pooled, sites : pandas.DataFrame
        As :func:`fednipype.hub.federated.pooled_from_sum` returns them.
    noise_sd : float
        One site's noise sd per noisy coordinate (scaled units) the SEs account for.
    level : float
        Confidence level.
    """

    request: AnalysisRequest
    secure_sum: dict[str, Any]
    pooled: pd.DataFrame
    sites: pd.DataFrame
    noise_sd: float
    level: float = 0.95

    @property
    def contributors(self) -> list[str]:
        """Sites whose vectors are in the sum, in slot order."""
        return list(self.secure_sum.get("contributors") or [])


def _noise(request: AnalysisRequest) -> tuple[float, Grid]:
    """One site's noise sd (scaled units) and the grid, from the request alone."""
    if request.mode == "distributed-dp":
        noise, grid = request_noise(request)
        return noise.sigma_site * grid.step, grid
    grid = Grid.for_request(request)
    return (0.0 if request.mode == "exact" else dp_sigma(request)), grid


def pool_secure_sum(
    request: AnalysisRequest, doc: Mapping[str, Any], *, level: float = 0.95
) -> FederatedResult:
    """The pooled regression of a ``secure_sum.json`` document.

    Raises
    ------
    FederationError
        The run did not complete (the message lists each site's public reason), or the sum
        is missing or unusable.
    """
    if doc.get("status") != "completed":
        raise FederationError(f"federated run {request.request_id}: {failure_message(doc)}")
    summed = doc.get("sum")
    contributors = doc.get("contributors")
    if not isinstance(summed, list) or not isinstance(contributors, list):
        raise FederationError(f"{SECURE_SUM_NAME}: a completed run without sum or contributors")
    sd, grid = _noise(request)
    ints = np.asarray(summed, dtype=np.int64)
    pooled, sites = pooled_from_sum(
        request,
        ints,
        contributors,
        noise_sd=None if request.mode == "exact" else sd,
        grid=grid,
        level=level,
    )
    return FederatedResult(request, dict(doc), pooled, sites, sd, level)


def federation_record(
    result_or_doc: FederatedResult | Mapping[str, Any],
    request: AnalysisRequest,
    **extra: Any,
) -> dict[str, Any]:
    """``federation.json``: the run's public facts (no sum, no per-site values).

    Parameters
    ----------
    result_or_doc : FederatedResult or mapping
        A pooled result, or the ``secure_sum.json`` document of a run that did not complete.
    request : AnalysisRequest
    **extra
        Added as they are (e.g. ``superlink``, ``timings_s`` of the hub command).
    """
    if isinstance(result_or_doc, FederatedResult):
        doc, noise_sd = result_or_doc.secure_sum, result_or_doc.noise_sd
    else:
        doc, noise_sd = result_or_doc, None
    rows = _site_rows(doc)
    timings = dict(doc.get("timings_s") or {})
    record: dict[str, Any] = {
        "schema": FEDERATION_SCHEMA,
        "software": {"name": "fednipype", "version": __version__},
        "status": doc.get("status"),
        "error": doc.get("error"),
        "request_id": request.request_id,
        "request_hash": request.content_hash,
        "mode": request.mode,
        "epsilon": request.epsilon,
        "delta": request.delta,
        "max_dropouts": request.max_dropouts,
        "min_sites": doc.get("min_sites", request.min_sites),
        "sites": list(request.sites),
        "contributors": list(doc.get("contributors") or []),
        "dropped": [r["site"] for r in rows if r["status"] == "dropped"],
        "not_contributing": [r for r in rows if r["status"] != "contributed"],
        "aggregate_fit": doc.get("aggregate_fit"),
        "transport": doc.get("transport"),
        "noise_sd_scaled": noise_sd,
        "timings_s": {"server": timings},
    }
    for key, value in extra.items():
        if key == "timings_s":
            record["timings_s"].update(value)
        else:
            record[key] = value
    return record


# -- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FederatedReport:
    """Files written by :func:`write_federated_report` (paths inside its folder)."""

    tsv: Path
    sites_tsv: Path
    html: Path
    federation: Path
    secure_sum: Path
    plots: list[Path] = field(default_factory=list)


def _tsv(table: pd.DataFrame, path: Path) -> Path:
    text = table.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return atomic_write_text(path, text)


def write_federated_report(
    result: FederatedResult,
    out_dir: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    plot_regions: Sequence[str] | None = None,
) -> FederatedReport:
    """Write the tables, forest plots, ``index.html``, ``federation.json`` and the
    server's ``secure_sum.json`` of one run into ``out_dir`` (each atomically).

    Parameters
    ----------
    result : FederatedResult
    out_dir : path-like
        Created if needed.
    record : mapping
        :func:`federation_record`'s document.
    plot_regions : sequence of str, optional
        Regions with a forest plot (default: the first :data:`MAX_DEFAULT_PLOT_REGIONS`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    regions = list(result.request.regions)
    plotted = list(plot_regions) if plot_regions is not None else regions
    plotted = [r for r in plotted if r in regions][:MAX_DEFAULT_PLOT_REGIONS]
    tsv = _tsv(result.pooled, out / TSV_NAME)
    sites_tsv = _tsv(result.sites, out / SITES_TSV_NAME)
    plots = []
    if len(result.contributors) > 0:
        for region in plotted:
            plots.append(
                forest_plot(
                    result.sites,
                    result.pooled,
                    region,
                    "intercept",
                    out / plot_filename(region, "intercept"),
                    level=result.level,
                    feature=result.request.response,
                )
            )
    secure = atomic_write_json(out / SECURE_SUM_NAME, result.secure_sum)
    federation = atomic_write_json(out / FEDERATION_NAME, dict(record))
    page = atomic_write_text(out / HTML_NAME, render_page(result, record, plots))
    LOGGER.info("wrote %s, %s, %d forest plot(s), %s", tsv, federation, len(plots), page)
    return FederatedReport(tsv, sites_tsv, page, federation, secure, plots)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    x = float(value)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.1f}"


def render_page(
    result: FederatedResult, record: Mapping[str, Any], plots: Sequence[Path] = ()
) -> str:
    """The summary page of a federated run (plain HTML, every value escaped)."""
    req = result.request
    privacy = (
        "no noise (exact secure sum: a non-DP disclosure the sites' policies opted in to)"
        if req.mode == "exact"
        else f"ε = {req.epsilon:g}, δ = {req.delta:g} per site ({req.mode}); the intervals "
        "include the noise variance"
    )
    out = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>fednipype federated analysis — {_esc(req.request_id)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:75em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:right}th{background:#f0f0f0}.text{text-align:left}"
        "figure{display:inline-block;margin:.5em}figure img{max-width:38em}</style>",
        "</head>\n<body>",
        f"<h1>Federated analysis <code>{_esc(req.request_id)}</code></h1>",
        f"<p>Pooled regression of <code>{_esc(req.response)} ~ {_esc(' + '.join(req.terms))}"
        "</code> with one intercept per site, from the sites' sufficient statistics summed "
        "by secure aggregation (SecAgg+): the hub received only the sum. "
        f"Privacy: {_esc(privacy)}. Original units; {result.level:.0%} intervals. Request "
        f"hash <code>{_esc(req.content_hash[:16])}…</code>. Full table: "
        f'<a href="{TSV_NAME}">{TSV_NAME}</a>; run record: '
        f'<a href="{FEDERATION_NAME}">{FEDERATION_NAME}</a>.</p>',
        "<h2>Sites</h2>",
        '<table><tr><th class="text">site</th><th class="text">status</th>'
        '<th class="text">public reason</th></tr>',
    ]
    for row in _site_rows(result.secure_sum):
        out.append(
            f'<tr><td class="text">{_esc(row["site"])}</td><td class="text">'
            f'{_esc(row["status"])}</td><td class="text">{_esc(row["reason"])}</td></tr>'
        )
    out.append("</table>\n<h2>Pooled regression</h2>")
    links = {p.name: p for p in plots}
    for region in req.regions:
        rows = result.pooled[result.pooled["region"] == region]
        out += [
            f'<h3 id="{_esc(region)}">{_esc(region)}</h3>',
            '<table><tr><th class="text">term</th><th>estimate</th><th>se</th>'
            f"<th>{result.level:.0%} CI</th><th>p</th><th>n</th></tr>",
        ]
        for row in rows.itertuples(index=False):
            out.append(
                f'<tr><td class="text">{_esc(row.term)}</td><td>{_num(row.estimate)}</td>'
                f"<td>{_num(row.se)}</td><td>[{_num(row.ci_low)}, {_num(row.ci_high)}]</td>"
                f"<td>{_num(row.p)}</td><td>{_num(row.n)}</td></tr>"
            )
        out.append("</table>")
        name = plot_filename(region, "intercept")
        if name in links:
            out.append(
                f'<figure><a href="{_esc(name)}"><img src="{_esc(name)}" alt="site intercepts '
                f'of {_esc(region)}"></a><figcaption>{_esc(region)}: site intercepts'
                "</figcaption></figure>"
            )
    timings = record.get("timings_s", {})
    out += [
        f"<p><small>Timings (s): {_esc(json.dumps(timings))}.</small></p>",
        f"<hr><p><small>Generated by fednipype {_esc(__version__)}.</small></p>",
        "</body>\n</html>\n",
    ]
    return "\n".join(out)
