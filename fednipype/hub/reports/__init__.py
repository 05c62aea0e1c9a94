"""Reports of pooled results: the results tables, forest plots and the HTML summary page.

:func:`write_meta_report` writes everything the coordinator hands out for one
:class:`fednipype.hub.pooling.PoolResult` into a folder; the modules do one thing each
(:mod:`fednipype.hub.reports.forest`, :mod:`fednipype.hub.reports.html`). matplotlib is
imported only when a plot is drawn.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fednipype.exceptions import MetaAnalysisError
from fednipype.hub.pooling import PoolResult
from fednipype.hub.reports.forest import forest_plot
from fednipype.hub.reports.html import write_summary
from fednipype.io import atomic_write_text

LOGGER = logging.getLogger(__name__)

__all__ = [
    "HTML_NAME",
    "MAX_DEFAULT_PLOT_REGIONS",
    "SITES_TSV_NAME",
    "TSV_NAME",
    "MetaReport",
    "plot_filename",
    "write_meta_report",
    "write_results_tsv",
]

TSV_NAME = "pooled_results.tsv"
SITES_TSV_NAME = "site_estimates.tsv"
HTML_NAME = "index.html"
#: Without an explicit list, forest plots are drawn for every region up to this many regions,
#: otherwise for the first this many (atlas order) — and the report says so.
MAX_DEFAULT_PLOT_REGIONS = 10


@dataclass(frozen=True)
class MetaReport:
    """Files written by :func:`write_meta_report`.

    Attributes
    ----------
    tsv : pathlib.Path
        Pooled results, one row per region, term and method.
    sites_tsv : pathlib.Path
        Each site's own estimates (what the forest plots show).
    html : pathlib.Path
        The summary page.
    plots : list of pathlib.Path
        Forest plots, region-major then term, in the order drawn.
    notes : list of str
        What the reader should know (e.g. which regions were not plotted).
    """

    tsv: Path
    sites_tsv: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plot_filename(region: str, term: str) -> str:
    """File name of a forest plot: characters other than letters, digits, ``.``, ``_``, ``-``
    become ``-``.

    >>> plot_filename("L_P12", "group[patient]")
    'forest_L_P12_group-patient.png'
    """

    def clean(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"

    return f"forest_{clean(region)}_{clean(term)}.png"


def write_results_tsv(result: PoolResult, path: str | os.PathLike[str]) -> Path:
    """Write :attr:`PoolResult.results` as a tab-separated table (``n/a`` for missing).

    Floats are written with Python's shortest round-trip representation, so reading the file
    back gives the same numbers.
    """
    text = result.results.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return atomic_write_text(path, text)


def _write_sites_tsv(result: PoolResult, path: Path) -> Path:
    text = result.sites.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return atomic_write_text(path, text)


def _choose(
    requested: Sequence[str] | None, available: list[str], what: str, flag: str
) -> list[str]:
    unknown = [x for x in requested or () if x not in available]
    if unknown:
        raise MetaAnalysisError(
            f"{what}(s) {', '.join(map(repr, unknown))} not in the results; available: "
            f"{', '.join(available[:20])}{' …' if len(available) > 20 else ''} (set with {flag})"
        )
    wanted = set(requested or ())
    return [x for x in available if x in wanted]


def write_meta_report(
    result: PoolResult,
    out_dir: str | os.PathLike[str],
    *,
    terms: Sequence[str] | None = None,
    plot_regions: Sequence[str] | None = None,
    max_plot_regions: int = MAX_DEFAULT_PLOT_REGIONS,
) -> MetaReport:
    """Write the results tables, forest plots and ``index.html`` of a pooled analysis.

    Parameters
    ----------
    result : fednipype.hub.pooling.PoolResult
        What :func:`fednipype.hub.pooling.pool` returned.
    out_dir : path-like
        Folder to write into (created if needed). Every file is written atomically.
    terms : sequence of str, optional
        Terms to plot; default every term except the intercept. The tables always hold every
        term.
    plot_regions : sequence of str, optional
        Regions to plot; default every region of ``result`` if there are at most
        ``max_plot_regions``, otherwise the first ``max_plot_regions`` in atlas order (noted in
        the report: pass the regions wanted to plot others).
    max_plot_regions : int
        See ``plot_regions``.

    Returns
    -------
    MetaReport

    Raises
    ------
    MetaAnalysisError
        A requested term or region is not in the results.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    regions = result.regions
    if plot_regions is None:
        plotted = regions[:max_plot_regions]
        if len(regions) > max_plot_regions:
            notes.append(
                f"forest plots drawn for the first {max_plot_regions} of {len(regions)} regions "
                f"({plotted[0]} … {plotted[-1]}); name the regions wanted to plot others (the "
                "tables hold every region)"
            )
    else:
        plotted = _choose(plot_regions, regions, "region", "--regions")
    if terms is None:
        plot_terms = [t for t in result.terms if t != "intercept"] or result.terms
    else:
        plot_terms = _choose(terms, result.terms, "term", "--terms")

    tsv = write_results_tsv(result, out / TSV_NAME)
    sites_tsv = _write_sites_tsv(result, out / SITES_TSV_NAME)
    links: dict[tuple[str, str], str] = {}
    plots: list[Path] = []
    used: set[str] = set()
    for region in plotted:
        for term in plot_terms:
            name = plot_filename(region, term)
            stem, i = name.removesuffix(".png"), 2
            while name in used:  # distinct names that clean to the same file name
                name, i = f"{stem}-{i}.png", i + 1
            used.add(name)
            plots.append(
                forest_plot(
                    result.sites,
                    result.results,
                    region,
                    term,
                    out / name,
                    level=result.level,
                    feature=result.feature,
                )
            )
            links[(region, term)] = name
    html_path = write_summary(out / HTML_NAME, result, links, notes, tsv_name=TSV_NAME)
    LOGGER.info("wrote %s, %s, %d forest plot(s) and %s", tsv, sites_tsv, len(plots), html_path)
    return MetaReport(tsv=tsv, sites_tsv=sites_tsv, html=html_path, plots=plots, notes=notes)
