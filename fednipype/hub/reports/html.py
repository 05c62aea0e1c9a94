"""The coordinator's HTML summary page: releases pooled, pooled results, links to forest plots.

Plain HTML built with the standard library (:func:`html.escape` on every value that comes from
a release), one self-contained page with inline CSS, written atomically.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fednipype import __version__
from fednipype.io import atomic_write_text

if TYPE_CHECKING:
    from fednipype.hub.pooling import PoolResult

__all__ = ["render_summary", "write_summary"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 75em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
tr.pooled_regression td { background: #f7f7ff; }
.notes li { color: #8a4b00; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 38em; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

_METHOD_LABELS = {
    "pooled_regression": "pooled regression",
    "fixed_effect": "fixed effect",
}


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x != 0.0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.1f}"


def _p(value: Any) -> str:
    x = float(value)
    if math.isnan(x):
        return "n/a"
    return "&lt; 1e-16" if x < 1e-16 else (f"{x:.2e}" if x < 1e-3 else f"{x:.3f}")


def _method_label(method: str) -> str:
    if method.startswith("random_effects_"):
        return f"random effects ({method.removeprefix('random_effects_')})"
    return _METHOD_LABELS.get(method, method)


def render_summary(
    result: PoolResult,
    plots: Mapping[tuple[str, str], str] | None = None,
    notes: Iterable[str] = (),
    *,
    tsv_name: str | None = "pooled_results.tsv",
) -> str:
    """The summary page as an HTML string.

    Parameters
    ----------
    result : fednipype.hub.pooling.PoolResult
        What :func:`fednipype.hub.pooling.pool` returned.
    plots : mapping, optional
        ``(region, term)`` → link to its forest plot (relative to the page).
    notes : iterable of str
        Extra notes for the reader, listed with the result's own.
    tsv_name : str, optional
        Link to the results table, relative to the page (``None``: no link).

    Returns
    -------
    str
    """
    plots = dict(plots or {})
    first = result.releases[0].doc
    model = first["model"]
    scaling = result.releases[0].scaling
    centers = ", ".join(
        f"{_esc(t)} = {_num(scaling.center(t))}"
        for t in model["terms"]
        if t != "intercept" and t in scaling.maps
    )
    reference = ", ".join(f"{_esc(k)} = {_esc(v)}" for k, v in model["reference_levels"].items())
    test = "Knapp–Hartung t" if result.test == "knha" else "Wald z"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>fednipype meta-analysis — {_esc(result.feature)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>Multi-site analysis of <code>{_esc(result.feature)}</code></h1>",
        "<p>",
        f"{len(result.releases)} site release(s) pooled two ways: a <b>pooled regression</b> "
        "of the summed differentially private sufficient statistics (mega-analysis) and a "
        "<b>meta-analysis</b> of each site's own estimates (fixed effect and random effects, "
        f"τ² by {_esc(result.method)}, {test} test). Model: <code>{_esc(model['response'])} ~ "
        f"{_esc(' + '.join(model['terms']))}</code>; reference levels: {reference or 'none'}. "
        f"All values are in original units; {result.level:.0%} intervals include the variance "
        "the DP noise adds. The intercept is the expected value at the covariate centers"
        f"{' (' + centers + ')' if centers else ''}.",
        "</p>",
    ]
    if tsv_name:
        out.append(f'<p>Full table: <a href="{_esc(tsv_name)}">{_esc(tsv_name)}</a></p>')
    all_notes = list(dict.fromkeys([*result.notes, *notes]))
    if all_notes:
        out.append('<h2>Notes</h2>\n<ul class="notes">')
        out += [f"<li>{_esc(n)}</li>" for n in all_notes]
        out.append("</ul>")
    out += _releases_table(result)
    out.append("<h2>Pooled results</h2>")
    for region in result.regions:
        out += _region_section(result, region, plots)
    out += [
        f"<hr><p><small>Generated by fednipype {_esc(__version__)}.</small></p>",
        "</body>",
        "</html>",
    ]
    return "\n".join(out) + "\n"


def _releases_table(result: PoolResult) -> list[str]:
    out = [
        "<h2>Releases</h2>",
        "<table>",
        '<tr><th class="text">site</th><th class="text">dataset</th><th class="text">file</th>'
        '<th>ε</th><th>δ</th><th>n (noisy)</th><th class="text">software</th>'
        '<th class="text">content sha256</th></tr>',
    ]
    for release in result.releases:
        software = release.doc["software"]
        out.append(
            f'<tr><td class="text">{_esc(release.site)}</td>'
            f'<td class="text">{_esc(release.dataset)}</td>'
            f'<td class="text">{_esc(Path(release.path).name)}</td>'
            f"<td>{_num(release.epsilon)}</td><td>{_num(release.delta)}</td>"
            f"<td>{_num(release.n)}</td>"
            f'<td class="text">{_esc(software["name"])} {_esc(software["version"])}</td>'
            f'<td class="text"><code>{_esc(release.content_hash[:16])}…</code></td></tr>'
        )
    out.append("</table>")
    return out


def _region_section(
    result: PoolResult, region: str, plots: Mapping[tuple[str, str], str]
) -> list[str]:
    rows = result.results[result.results["region"] == region]
    out = [
        f'<h3 id="{_esc(region)}">{_esc(region)}</h3>',
        "<table>",
        '<tr><th class="text">term</th><th class="text">method</th><th>estimate</th>'
        f"<th>se</th><th>{result.level:.0%} CI</th><th>p</th><th>k</th><th>τ²</th>"
        '<th>I² (%)</th><th class="text">note</th></tr>',
    ]
    for row in rows.itertuples(index=False):
        flags = []
        if row.psd_projected:
            flags.append("ZᵀZ projected to PSD")
        if row.sigma2_floored:
            flags.append("σ² floored")
        if row.note:
            flags.append(str(row.note))
        out.append(
            f'<tr class="{_esc(row.method)}"><td class="text">{_esc(row.term)}</td>'
            f'<td class="text">{_esc(_method_label(row.method))}</td>'
            f"<td>{_num(row.estimate)}</td><td>{_num(row.se)}</td>"
            f"<td>[{_num(row.ci_low)}, {_num(row.ci_high)}]</td><td>{_p(row.p)}</td>"
            f"<td>{int(row.k)}</td><td>{_num(row.tau2)}</td><td>{_num(row.i2, 3)}</td>"
            f'<td class="text">{_esc("; ".join(flags))}</td></tr>'
        )
    out.append("</table>")
    figures = [(term, plots[(region, term)]) for term in result.terms if (region, term) in plots]
    for term, href in figures:
        out.append(
            f'<figure><a href="{_esc(href)}"><img src="{_esc(href)}" '
            f'alt="forest plot of {_esc(region)}, {_esc(term)}"></a>'
            f"<figcaption>{_esc(region)} — {_esc(term)}</figcaption></figure>"
        )
    return out


def write_summary(
    out_html: str | os.PathLike[str],
    result: PoolResult,
    plots: Mapping[tuple[str, str], str] | None = None,
    notes: Iterable[str] = (),
    *,
    tsv_name: str | None = "pooled_results.tsv",
) -> Path:
    """Write :func:`render_summary` to ``out_html`` atomically.

    Parameters
    ----------
    out_html : path-like
        Destination.
    result, plots, notes, tsv_name
        As for :func:`render_summary`; links are relative to ``out_html``'s folder.

    Returns
    -------
    pathlib.Path
    """
    return atomic_write_text(out_html, render_summary(result, plots, notes, tsv_name=tsv_name))
