"""Figures of the site report: feature QC (total grey matter against age) and budget over time.

Drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no display) and
written atomically as PNG files.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fednipype.io import atomic_write_bytes
from fednipype.site.report.qc import ROBUST_Z_LIMIT, QCResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["budget_figure", "qc_figure"]

_POINT = "#1f4e79"
_FLAG = "#c0392b"


def _new_figure(width: float, height: float) -> Figure:
    # matplotlib takes ~0.3 s to import: only a report that draws pays for it, so importing
    # the report module (and the CLI that calls it) stays fast.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | os.PathLike[str], title: str) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Title": title, "Software": "fednipype"})
    return atomic_write_bytes(out_png, buffer.getvalue(), durable=False)


def _scan_label(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f" ses-{session}" if session else "")


def qc_figure(result: QCResult, out_png: str | os.PathLike[str]) -> Path:
    """Total grey matter against age, the robust line, flagged scans in red and labelled.

    Parameters
    ----------
    result : QCResult
        One atlas's scored scans (:func:`fednipype.site.report.qc.robust_outliers`).
    out_png : path-like
        Destination.

    Returns
    -------
    pathlib.Path
    """
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    scans = [s for s in result.scans if math.isfinite(s.age)]
    normal = [s for s in scans if not s.outlier]
    flagged = [s for s in scans if s.outlier]
    ax.scatter(
        [s.age for s in normal],
        [s.total_gm_mm3 / 1000.0 for s in normal],
        s=22,
        color=_POINT,
        alpha=0.8,
        label=f"scans (|robust z| ≤ {ROBUST_Z_LIMIT:g})",
    )
    if flagged:
        ax.scatter(
            [s.age for s in flagged],
            [s.total_gm_mm3 / 1000.0 for s in flagged],
            s=60,
            marker="X",
            color=_FLAG,
            label=f"flagged (|robust z| > {ROBUST_Z_LIMIT:g})",
        )
        for s in flagged:
            ax.annotate(
                _scan_label(s.subject, s.session),
                (s.age, s.total_gm_mm3 / 1000.0),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=8,
                color=_FLAG,
            )
    if scans:
        ages = np.array([s.age for s in scans])
        grid = np.linspace(ages.min(), ages.max(), 50)
        ax.plot(
            grid,
            (result.intercept + result.slope * grid) / 1000.0,
            color="black",
            linewidth=1.0,
            label="Theil–Sen line",
        )
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no scan with a known age", ha="center", transform=ax.transAxes)
    ax.set_xlabel("age (years, participants.tsv)")
    ax.set_ylabel("total grey matter (cm³)")
    ax.set_title(f"Total grey matter against age — atlas {result.atlas}", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, out_png, f"feature QC {result.atlas}")


def budget_figure(
    times: Sequence[str],
    epsilons: Sequence[float],
    *,
    total_epsilon: float,
    spent_epsilon: float,
    out_png: str | os.PathLike[str],
) -> Path:
    """ε charged over time (cumulative, basic composition), the ledger's spent ε and total.

    Parameters
    ----------
    times : sequence of str
        Charge times (ISO 8601), oldest first.
    epsilons : sequence of float
        ε of each charge.
    total_epsilon : float
        The dataset's total ε (drawn as a dashed line).
    spent_epsilon : float
        What the ledger reports as spent (its own composition; at most the cumulative sum).
    out_png : path-like
        Destination.

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # see _new_figure

    when = [datetime.fromisoformat(t) for t in times]
    cumulative = np.cumsum(np.asarray(epsilons, dtype=float))
    fig = _new_figure(7.5, 3.8)
    ax = fig.add_subplot()
    xs = [when[0], *when]
    ys = [0.0, *cumulative]
    ax.step(xs, ys, where="post", color=_POINT, linewidth=1.5, label="Σ ε charged")
    ax.scatter(when, cumulative, s=18, color=_POINT, zorder=3)
    ax.scatter(
        [when[-1]],
        [spent_epsilon],
        s=70,
        marker="D",
        facecolor="white",
        edgecolor=_FLAG,
        zorder=4,
        label="spent ε (ledger's composition)",
    )
    ax.axhline(total_epsilon, color="black", linestyle="--", linewidth=1.0, label="total ε")
    start, end = min(when), max(when)
    pad = max((end - start) * 0.05, timedelta(minutes=5))
    ax.set_xlim(start - pad, end + pad)
    ax.set_ylim(0.0, max(total_epsilon, float(cumulative[-1])) * 1.1)
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlabel("time of charge (UTC)")
    ax.set_ylabel("ε")
    ax.set_title("Privacy budget spent over time", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, out_png, "privacy budget over time")
