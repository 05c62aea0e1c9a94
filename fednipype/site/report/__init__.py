"""The site report: one private HTML page per output folder, the fMRIPrep habit.

:func:`write_site_report` writes ``<output_dir>/fednipype_report.html`` and its figures in
``<output_dir>/figures/``: the subjects processed (the participant level's feature tables found
under ``output_dir``) and those that failed with their reasons, a feature QC figure (total grey
matter against age, robust outliers flagged: :mod:`fednipype.site.report.qc`), each release's
privacy parameters and what it released, the site policy's budget with the ledger's spent and
remaining budget and a plot of the audit trail over time, and the planner's prediction when a
plan is given.

The report holds per-participant values: it is for the site and never leaves it. It reads the
ledger only through :class:`~fednipype.site.ledger.PrivacyLedger`'s reading methods and never
creates one: a policy whose ledger file does not exist, or a ledger that cannot be opened,
is shown as a message in place of the budget. Every file is written atomically, the page last.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from fednipype.bids import find_feature_files, read_participants
from fednipype.contract.document import content_hash, read_release
from fednipype.exceptions import FednipypeError
from fednipype.io import atomic_write_text
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy
from fednipype.site.report.figures import budget_figure, qc_figure
from fednipype.site.report.page import BudgetView, FailureRow, Page, ReleaseView, render
from fednipype.site.report.qc import ROBUST_Z_LIMIT, read_scans, robust_outliers

__all__ = ["FIGURES_DIR", "REPORT_NAME", "ROBUST_Z_LIMIT", "write_site_report"]

LOGGER = logging.getLogger(__name__)

#: The page, at the root of the output folder.
REPORT_NAME = "fednipype_report.html"
#: Folder of the page's figures, beside it.
FIGURES_DIR = "figures"
_QC_FIGURE = "fednipype_report_qc_{n}.png"
_BUDGET_FIGURE = "fednipype_report_budget.png"


def _failure_row(item: Any) -> FailureRow:
    """A failure given as a mapping or an object with ``subject``, ``session``, ``error``."""

    def get(key: str) -> Any:
        return item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)

    subject = str(get("subject") or "").removeprefix("sub-")
    session = get("session")
    session = str(session).removeprefix("ses-") if session not in (None, "") else None
    node = get("node")
    return FailureRow(subject, session, str(get("error") or "unknown error"), node and str(node))


def _dataset_name(bids_dir: Path) -> str | None:
    try:
        name = json.loads((bids_dir / "dataset_description.json").read_text("utf-8"))["Name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(name) if name else None


def _ages(bids_dir: Path, page: Page) -> pd.Series:
    try:
        table = read_participants(bids_dir)
    except FednipypeError as err:
        page.participants_error = str(err)
        return pd.Series(dtype=float)
    if "age" not in table.columns:
        page.participants_error = f"{table.attrs.get('source', bids_dir)}: no 'age' column"
        return pd.Series(dtype=float)
    return pd.to_numeric(table["age"], errors="coerce")


def _features(output_dir: Path, bids_dir: Path, figures: Path, page: Page) -> list[Path]:
    try:
        tables = find_feature_files(output_dir)
    except FednipypeError as err:
        page.tables_note = f"no feature tables read: {err}"
        tables = []
    page.scans, page.unreadable = read_scans(tables)
    if not page.scans:
        return []
    ages = _ages(bids_dir, page)
    written = []
    for n, atlas in enumerate(sorted({s.atlas for s in page.scans}), start=1):
        result = robust_outliers([s for s in page.scans if s.atlas == atlas], atlas, ages)
        name = _QC_FIGURE.format(n=n)
        written.append(qc_figure(result, figures / name))
        page.qc.append((result, f"{FIGURES_DIR}/{name}"))
    return written


def _release(path: Path) -> ReleaseView:
    try:
        doc = read_release(path)
    except FednipypeError as err:
        return ReleaseView(path=path, error=str(err))
    return ReleaseView(path=path, doc=doc, content_sha256=content_hash(doc))


def _budget(policy: SitePolicy, figures: Path, page: Page) -> list[Path]:
    view = BudgetView(
        policy_source=str(policy.source or "(built in code)"),
        dataset=policy.dataset_id,
        ledger_path=str(policy.ledger_path),
        total=(policy.epsilon, policy.delta),
        min_cohort=policy.min_cohort,
    )
    page.budget = view
    if not policy.ledger_path.is_file():
        # Opening a missing ledger could create it: a report must never start a budget.
        view.error = (
            f"{policy.ledger_path}: no privacy ledger yet; the data owner creates it with "
            f"fednipype-budget init --policy {policy.source or 'POLICY'}"
        )
        return []
    try:
        ledger = PrivacyLedger.from_policy(policy)
        spent, remaining, trail = ledger.spent(), ledger.remaining(), ledger.audit_trail()
        view.total = tuple(ledger.total)
    except FednipypeError as err:
        view.error = str(err)
        return []
    view.spent, view.remaining, view.trail = tuple(spent), tuple(remaining), trail
    if not trail:
        return []
    png = budget_figure(
        [r.time for r in trail],
        [r.epsilon for r in trail],
        total_epsilon=view.total[0],
        spent_epsilon=spent.epsilon,
        out_png=figures / _BUDGET_FIGURE,
    )
    view.figure = f"{FIGURES_DIR}/{_BUDGET_FIGURE}"
    return [png]


def write_site_report(
    output_dir: str | os.PathLike[str],
    *,
    bids_dir: str | os.PathLike[str],
    policy: SitePolicy | str | os.PathLike[str] | None = None,
    releases: Iterable[str | os.PathLike[str]] = (),
    failures: Iterable[Any] = (),
    plan: Mapping[str, float] | None = None,
) -> Path:
    """Write the site's private HTML report into ``output_dir``.

    Parameters
    ----------
    output_dir : path-like
        The participant level's output folder (its feature tables are the subjects
        processed). The page is ``<output_dir>/fednipype_report.html``, its figures are in
        ``<output_dir>/figures/``.
    bids_dir : path-like
        The BIDS dataset (its ``participants.tsv`` gives the ages of the QC figure).
    policy : SitePolicy or path-like, optional
        The site policy: its budget, and the spent/remaining budget and audit trail of its
        ledger if that exists. An unreadable policy or ledger is shown as its error message.
    releases : iterable of path-like
        Release files to describe (privacy parameters and what was released).
    failures : iterable
        Subjects/sessions that failed: mappings or objects with ``subject``, ``session`` and
        ``error`` (and optionally ``node``), e.g. :class:`fednipype.cli.participant.Failure`.
    plan : mapping of str to float, optional
        The planner's predicted standard error per model term.

    Returns
    -------
    pathlib.Path
        The page.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> page = write_site_report(out, bids_dir="bids_examples/siteC",
    ...                          failures=[{"subject": "07", "session": None, "error": "x < y"}])
    >>> "x &lt; y" in page.read_text()
    True
    """
    out = Path(output_dir)
    bids = Path(bids_dir)
    figures = out / FIGURES_DIR
    page = Page(
        bids_dir=bids,
        output_dir=out,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        dataset_name=_dataset_name(bids),
        failures=[_failure_row(f) for f in failures],
        plan=dict(plan) if plan is not None else None,
    )
    drawn = _features(out, bids, figures, page)
    page.releases = [_release(Path(p)) for p in releases]
    if policy is not None:
        try:
            policy = policy if isinstance(policy, SitePolicy) else SitePolicy.from_toml(policy)
        except FednipypeError as err:
            page.policy_error = str(err)
        else:
            drawn += _budget(policy, figures, page)
    # Figures of an earlier report that this one did not draw would be stale: remove ours.
    if figures.is_dir():
        for old in figures.glob("fednipype_report_*.png"):
            if old not in drawn:
                old.unlink(missing_ok=True)
    path = atomic_write_text(out / REPORT_NAME, render(page), durable=False)
    LOGGER.info("site report: %s (%d figure(s))", path, len(drawn))
    return path
