"""The site report's HTML: one self-contained page, inline CSS, no script, relative images.

Every value is passed through :func:`html.escape` (file names, subject labels, error texts,
release fields): the page shows what it was given, never runs it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednipype._version import __version__
from fednipype.site.report.qc import MAD_TO_SD, ROBUST_Z_LIMIT, QCResult, Scan

__all__ = ["BudgetView", "FailureRow", "Page", "ReleaseView", "render"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 75em; }
header p, .meta { color: #555; }
nav a { margin-right: 1em; }
section { margin-bottom: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
tr.flagged td { background: #fdecea; }
.private { border-left: 4px solid #c0392b; padding: 0.3em 0.8em; background: #fdf3f2; }
.error { color: #a61b0b; }
.note { color: #8a4b00; }
figure { margin: 0.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value`` (quotes included)."""
    return html.escape(str(value), quote=True)


def num(value: Any) -> str:
    """A number as the page shows it: 6 significant digits, ``n/a`` for NaN or missing."""
    if value is None:
        return "n/a"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return esc(value)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return esc(f"{x:.6g}")


@dataclass(frozen=True)
class FailureRow:
    """A subject/session the participant level could not process."""

    subject: str
    session: str | None
    error: str
    node: str | None = None


@dataclass
class ReleaseView:
    """What the page shows of one release file (``error`` set when it could not be read)."""

    path: Path
    doc: dict[str, Any] | None = None
    content_sha256: str | None = None
    error: str | None = None


@dataclass
class BudgetView:
    """The policy and its ledger as the page shows them (``error`` replaces the ledger part)."""

    policy_source: str
    dataset: str
    ledger_path: str
    total: tuple[float, float]
    min_cohort: int
    spent: tuple[float, float] | None = None
    remaining: tuple[float, float] | None = None
    trail: list[Any] = field(default_factory=list)
    figure: str | None = None
    error: str | None = None


@dataclass
class Page:
    """Everything :func:`render` lays out."""

    bids_dir: Path
    output_dir: Path
    generated: str
    dataset_name: str | None = None
    scans: list[Scan] = field(default_factory=list)
    tables_note: str | None = None
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    qc: list[tuple[QCResult, str]] = field(default_factory=list)
    participants_error: str | None = None
    releases: list[ReleaseView] = field(default_factory=list)
    budget: BudgetView | None = None
    policy_error: str | None = None
    plan: Mapping[str, float] | None = None


def _label(subject: str, session: str | None) -> str:
    who = f"sub-{subject}" if subject else "(whole run)"
    return who + (f" ses-{session}" if session else "")


def _table(header: Sequence[tuple[str, bool]], rows: Iterable[str], css: str = "") -> list[str]:
    cells = "".join(
        f'<th class="text">{h}</th>' if text else f"<th>{h}</th>" for h, text in header
    )
    klass = f' class="{css}"' if css else ""
    return [f"<table{klass}>", f"<tr>{cells}</tr>", *rows, "</table>"]


def _kv(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """A two-column table; each value cell carries ``data-key`` for machines reading the page."""
    out = ['<table class="kv">']
    for key, label, value in rows:
        out.append(f'<tr><th class="text">{label}</th><td data-key="{esc(key)}">{value}</td></tr>')
    out.append("</table>")
    return out


def _subjects(page: Page) -> list[str]:
    subjects = sorted({s.subject for s in page.scans})
    failed = sorted({f.subject for f in page.failures if f.subject})
    out = [
        '<section id="subjects">',
        "<h2>Subjects</h2>",
        *_kv(
            [
                ("processed-subjects", "subjects with features", str(len(subjects))),
                ("processed-tables", "feature tables (subject/session)", str(len(page.scans))),
                ("failed-subjects", "subjects with a failure", str(len(failed))),
                ("failed-items", "failures", str(len(page.failures))),
            ]
        ),
    ]
    if page.tables_note:
        out.append(f'<p class="note">{esc(page.tables_note)}</p>')
    if page.failures:
        out.append("<h3>Failed</h3>")
        rows = [
            f'<tr class="failure"><td class="text">{esc(_label(f.subject, f.session))}</td>'
            f'<td class="text">{esc(f.node or "")}</td>'
            f'<td class="text error">{esc(f.error)}</td></tr>'
            for f in page.failures
        ]
        out += _table([("subject/session", True), ("step", True), ("error", True)], rows)
    if page.unreadable:
        out.append("<h3>Feature tables that could not be read</h3>")
        rows = [
            f'<tr><td class="text"><code>{esc(path.name)}</code></td>'
            f'<td class="text error">{esc(reason)}</td></tr>'
            for path, reason in page.unreadable
        ]
        out += _table([("file", True), ("reason", True)], rows)
    out.append("</section>")
    return out


def _qc(page: Page) -> list[str]:
    out = [
        '<section id="qc">',
        "<h2>Feature quality control</h2>",
        f"<p>Total grey-matter volume of each scan (the sum of its regional volumes) against "
        f"age from <code>participants.tsv</code>. Rule: a Theil–Sen line of total grey matter "
        f"on age; each scan's residual gets a robust z = (r − median r) / ({MAD_TO_SD} · MAD); "
        f"scans with |robust z| &gt; {ROBUST_Z_LIMIT:g} are flagged (modified z-score, "
        "Iglewicz and Hoaglin 1993). Scans without an age are listed but not scored.</p>",
    ]
    if page.participants_error:
        out.append(f'<p class="error">participants.tsv: {esc(page.participants_error)}</p>')
    if not page.qc:
        out.append("<p>No feature table to check.</p>")
    for result, href in page.qc:
        flagged = [s for s in result.scans if s.outlier]
        unscored = [s for s in result.scans if math.isnan(s.age)]
        alt = f"total grey matter against age, atlas {result.atlas}"
        out += [
            f"<h3>Atlas {esc(result.atlas)}</h3>",
            f'<figure><img src="{esc(href)}" alt="{esc(alt)}" width="750" height="460">'
            f"<figcaption>{len(result.scans) - len(unscored)} scan(s) with an age, "
            f"{len(flagged)} flagged, {len(unscored)} without an age. Robust scale "
            f"(1.4826 · MAD of residuals): {num(result.scale)} mm³; Theil–Sen slope "
            f"{num(result.slope)} mm³ per year.</figcaption></figure>",
        ]
        rows = [
            f'<tr class="{"flagged" if s.outlier else "scan"}">'
            f'<td class="text">{esc(_label(s.subject, s.session))}</td>'
            f"<td>{num(s.age)}</td><td>{num(round(s.total_gm_mm3, 1))}</td>"
            f"<td>{num(round(s.robust_z, 2))}</td>"
            f'<td class="text">{"outlier" if s.outlier else ""}</td></tr>'
            for s in result.scans
        ]
        out.append(f"<details{' open' if flagged else ''}><summary>Every scan</summary>")
        out += _table(
            [
                ("subject/session", True),
                ("age", False),
                ("total grey matter (mm³)", False),
                ("robust z", False),
                ("flag", True),
            ],
            rows,
            css="qc",
        )
        out.append("</details>")
    out.append("</section>")
    return out


def _bounds(bounds: Mapping[str, Sequence[float]]) -> str:
    groups: dict[tuple[float, ...], list[str]] = {}
    for name, pair in bounds.items():
        groups.setdefault(tuple(float(v) for v in pair), []).append(str(name))
    parts = []
    for pair, names in groups.items():
        who = (
            esc(names[0])
            if len(names) == 1
            else (f"{len(names)} quantities ({esc(names[0])} … {esc(names[-1])})")
        )
        parts.append(f"{who}: [{num(pair[0])}, {num(pair[1])}]")
    return "; ".join(parts)


def _statistic_summary(name: str, stat: Mapping[str, Any]) -> str:
    if name == "sufficient_statistics":
        return (
            f"n (noisy) = {num(stat.get('n'))}; {len(stat.get('terms', []))} terms × "
            f"{len(stat.get('regions', []))} regions (ZᵀZ, Zᵀy, yᵀy)"
        )
    if name == "group_means":
        groups = stat.get("groups", {})
        counts = ", ".join(
            f"{esc(level)}: n (noisy) = {num(g.get('count'))} ± "
            f"{num(math.sqrt(float(g.get('count_noise_variance', math.nan))))}"
            for level, g in groups.items()
        )
        return f"means of {len(stat.get('regions', []))} regions per group; {counts}"
    return ""


def _release(view: ReleaseView) -> list[str]:
    out = [f"<h3><code>{esc(view.path.name)}</code></h3>"]
    if view.error is not None or view.doc is None:
        return [*out, f'<p class="error">{esc(view.error)}</p>']
    doc, privacy = view.doc, view.doc.get("privacy", {})
    out += _kv(
        [
            ("site", "site", esc(doc.get("site"))),
            ("dataset", "dataset", esc(doc.get("dataset"))),
            ("created", "created", esc(doc.get("created"))),
            ("epsilon", "ε (whole release)", num(privacy.get("epsilon"))),
            ("delta", "δ (whole release)", num(privacy.get("delta"))),
            ("unit", "privacy unit", esc(privacy.get("unit"))),
            ("min-cohort", "minimum cohort", num(privacy.get("min_cohort"))),
            ("max-participants", "public maximum cohort", num(privacy.get("max_participants"))),
            ("bounds", "public bounds", _bounds(privacy.get("bounds", {}))),
            ("ledger-charge", "ledger charge", num(privacy.get("ledger_charge"))),
            ("content-sha256", "content SHA-256", f"<code>{esc(view.content_sha256)}</code>"),
        ]
    )
    rows = []
    for name, stat in doc.get("statistics", {}).items():
        rows.append(
            f'<tr data-statistic="{esc(name)}"><td class="text">{esc(name)}</td>'
            f'<td class="text">{esc(stat.get("mechanism"))}</td>'
            f"<td>{num(stat.get('epsilon'))}</td><td>{num(stat.get('delta'))}</td>"
            f"<td>{num(stat.get('sensitivity'))} ({esc(stat.get('sensitivity_norm'))})</td>"
            f"<td>{num(stat.get('scale'))}</td>"
            f'<td class="text">{_statistic_summary(name, stat)}</td></tr>'
        )
    out += _table(
        [
            ("statistic", True),
            ("mechanism", True),
            ("ε", False),
            ("δ", False),
            ("sensitivity", False),
            ("σ (noise scale)", False),
            ("released", True),
        ],
        rows,
        css="statistics",
    )
    return out


def _releases(page: Page) -> list[str]:
    out = ['<section id="releases">', "<h2>Releases</h2>"]
    if not page.releases:
        out.append("<p>No release file was given to this report.</p>")
    for view in page.releases:
        out += _release(view)
    out.append("</section>")
    return out


def _budget(page: Page) -> list[str]:
    out = ['<section id="budget">', "<h2>Privacy budget</h2>"]
    if page.policy_error:
        return [*out, f'<p class="error">{esc(page.policy_error)}</p>', "</section>"]
    budget = page.budget
    if budget is None:
        return [*out, "<p>No site policy was given to this report.</p>", "</section>"]
    out += _kv(
        [
            ("policy", "site policy", f"<code>{esc(budget.policy_source)}</code>"),
            ("dataset-id", "dataset", esc(budget.dataset)),
            ("ledger", "ledger", f"<code>{esc(budget.ledger_path)}</code>"),
            ("total-epsilon", "total ε", num(budget.total[0])),
            ("total-delta", "total δ", num(budget.total[1])),
            ("policy-min-cohort", "minimum cohort", num(budget.min_cohort)),
        ]
    )
    if budget.error is not None or budget.spent is None or budget.remaining is None:
        error = esc(budget.error or "the ledger was not read")
        return [*out, f'<p class="error" id="ledger-error">{error}</p>', "</section>"]
    out += _kv(
        [
            ("spent-epsilon", "spent ε", num(budget.spent[0])),
            ("spent-delta", "spent δ", num(budget.spent[1])),
            ("remaining-epsilon", "remaining ε", num(budget.remaining[0])),
            ("remaining-delta", "remaining δ", num(budget.remaining[1])),
            ("charges", "charges", str(len(budget.trail))),
        ]
    )
    if budget.figure:
        out.append(
            f'<figure><img src="{esc(budget.figure)}" alt="privacy budget spent over time" '
            'width="750" height="380"><figcaption>Each charge\'s ε added up (basic composition, '
            "an upper bound) and the spent ε the ledger reports with its own composition, "
            "against the dataset's total.</figcaption></figure>"
        )
    rows = [
        f'<tr><td>{r.charge_id}</td><td class="text">{esc(r.time)}</td>'
        f'<td class="text">{esc(r.purpose)}</td><td>{num(r.epsilon)}</td><td>{num(r.delta)}</td>'
        f'<td class="text"><code>{esc((r.content_sha256 or "not released")[:16])}</code></td></tr>'
        for r in budget.trail
    ]
    if rows:
        out.append("<h3>Audit trail</h3>")
        out += _table(
            [
                ("charge", False),
                ("time (UTC)", True),
                ("purpose", True),
                ("ε", False),
                ("δ", False),
                ("release SHA-256", True),
            ],
            rows,
            css="audit",
        )
    out.append("</section>")
    return out


def _plan(page: Page) -> list[str]:
    out = ['<section id="plan">', "<h2>Planner</h2>"]
    if not page.plan:
        return [
            *out,
            "<p>The planner's prediction appears here when a plan is given: the standard "
            "error each model term is expected to have, DP noise included, predicted from "
            "public inputs before any budget is spent.</p>",
            "</section>",
        ]
    rows = [
        f'<tr><td class="text">{esc(term)}</td><td>{num(se)}</td></tr>'
        for term, se in page.plan.items()
    ]
    out += _table([("term", True), ("predicted SE", False)], rows, css="plan")
    out.append("</section>")
    return out


def render(page: Page) -> str:
    """The report page as an HTML5 string.

    Parameters
    ----------
    page : Page
        What to show.

    Returns
    -------
    str
    """
    title = "fednipype site report" + (f" — {page.dataset_name}" if page.dataset_name else "")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">BIDS dataset <code>{esc(page.bids_dir)}</code>; outputs '
        f"<code>{esc(page.output_dir)}</code>; written {esc(page.generated)} by fednipype "
        f"{esc(__version__)}.</p>",
        '<p class="private"><b>Private to the site.</b> This report shows values of single '
        "participants; it is for the site's own checks and is never shared. Only release "
        "files leave the site.</p>",
        '<nav><a href="#subjects">Subjects</a><a href="#qc">Feature QC</a>'
        '<a href="#releases">Releases</a><a href="#budget">Privacy budget</a>'
        '<a href="#plan">Planner</a></nav>',
        "</header>",
        "<main>",
        *_subjects(page),
        *_qc(page),
        *_releases(page),
        *_budget(page),
        *_plan(page),
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(out) + "\n"
