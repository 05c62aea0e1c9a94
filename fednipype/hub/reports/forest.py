"""Forest plots of one region and term: each site's estimate and the pooled results.

Drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no display needed) and
written atomically (:func:`fednipype.io.atomic_write_bytes`).
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fednipype.exceptions import FednipypeError
from fednipype.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)

__all__ = ["forest_figure", "forest_plot"]

#: Method labels of the pooled rows, in the order they are drawn below the sites.
POOLED_ORDER = ("fixed_effect", "random_effects", "pooled_regression")

_SITE_COLOUR = "#1f4e79"
_POOLED_STYLE = {
    "fixed_effect": {"face": "#7f7f7f", "label": "Fixed effect (inverse variance)"},
    "random_effects": {"face": "#c0392b", "label": "Random effects"},
    "pooled_regression": {"face": "white", "label": "Pooled regression (mega-analysis)"},
}


def _method_key(method: str) -> str:
    return "random_effects" if method.startswith("random_effects") else method


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude != 0.0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}" if magnitude < 10 else f"{value:.1f}"


def _select(table: pd.DataFrame, region: str, term: str, what: str) -> pd.DataFrame:
    rows = table[(table["region"] == region) & (table["term"] == term)]
    if rows.empty:
        raise FednipypeError(f"forest plot: no {what} rows for region {region!r}, term {term!r}")
    return rows


def forest_figure(
    site_table: pd.DataFrame,
    pooled_rows: pd.DataFrame,
    region: str,
    term: str,
    *,
    level: float = 0.95,
    feature: str | None = None,
) -> Figure:
    """Build the forest plot of one region and term as a matplotlib Figure.

    Parameters
    ----------
    site_table : pandas.DataFrame
        Per-site estimates (:attr:`fednipype.hub.pooling.PoolResult.sites`): ``site``,
        ``region``, ``term``, ``estimate``, ``ci_low``, ``ci_high`` and optionally
        ``weight_re`` (percent; sizes the squares).
    pooled_rows : pandas.DataFrame
        Pooled results (:attr:`fednipype.hub.pooling.PoolResult.results`): rows with
        ``method`` ``fixed_effect``, ``random_effects_*`` and ``pooled_regression``.
    region, term : str
        The cell to draw.
    level : float
        Confidence level of the intervals (for the labels).
    feature : str, optional
        Name of the modelled feature, for the axis label.

    Returns
    -------
    matplotlib.figure.Figure
        One row per site (top to bottom in table order, labelled with the site), then the
        fixed-effect and random-effects diamonds and the pooled-regression estimate. The site
        row labels are the y tick labels of ``fig.axes[0]``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon

    sites = _select(site_table, region, term, "site")
    pooled = _select(pooled_rows, region, term, "pooled")
    pooled = pooled.assign(_key=[_method_key(m) for m in pooled["method"]])
    pooled = pooled.set_index("_key")

    k_sites = len(sites)
    n_rows = k_sites + 1 + len(POOLED_ORDER)
    bottom, top = 1.0, 0.55  # inches: x label and caption below, title above
    height = bottom + top + 0.34 * n_rows
    fig = Figure(figsize=(9.0, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.27, bottom / height, 0.45, 0.34 * n_rows / height))

    labels, positions, right_text = [], [], []
    weights = (
        sites["weight_re"].to_numpy(dtype=float)
        if "weight_re" in sites
        else np.full(k_sites, np.nan)
    )
    finite_w = weights[np.isfinite(weights)]
    w_max = finite_w.max() if finite_w.size else 1.0
    for i, row in enumerate(sites.itertuples(index=False)):
        y = n_rows - 1 - i
        labels.append(str(row.site))
        positions.append(y)
        est, lo, hi = float(row.estimate), float(row.ci_low), float(row.ci_high)
        if not math.isfinite(est):
            right_text.append((y, "not estimable"))
            continue
        ax.plot([lo, hi], [y, y], color=_SITE_COLOUR, linewidth=1.2, zorder=2)
        w = weights[i]
        size = 30.0 + 170.0 * (w / w_max if math.isfinite(w) and w_max > 0 else 0.2)
        ax.scatter([est], [y], marker="s", s=size, color=_SITE_COLOUR, zorder=3)
        weight = f"  {w:.1f}%" if math.isfinite(w) else "  (not pooled)"
        right_text.append((y, f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]{weight}"))

    for j, key in enumerate(POOLED_ORDER):
        y = len(POOLED_ORDER) - 1 - j
        style = _POOLED_STYLE[key]
        label = style["label"]
        if key not in pooled.index:
            continue
        row = pooled.loc[key]
        if key == "random_effects":
            label = f"Random effects ({str(row['method']).removeprefix('random_effects_')}"
            label += ", Knapp-Hartung)" if row["test"] == "knha" else ")"
        labels.append(label)
        positions.append(y)
        est, lo, hi = float(row["estimate"]), float(row["ci_low"]), float(row["ci_high"])
        if not math.isfinite(est):
            right_text.append((y, "n/a"))
            continue
        if math.isfinite(lo) and math.isfinite(hi):
            diamond = Polygon(
                [(lo, y), (est, y + 0.3), (hi, y), (est, y - 0.3)],
                closed=True,
                facecolor=style["face"],
                edgecolor="black",
                linewidth=1.0,
                zorder=3,
            )
            ax.add_patch(diamond)
            ax.update_datalim([(lo, y), (hi, y)])
            right_text.append((y, f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]"))
        else:
            ax.scatter([est], [y], marker="D", s=40, color=style["face"], edgecolor="black")
            right_text.append((y, f"{_fmt(est)} [n/a]"))

    ax.autoscale_view()
    ax.set_yticks(positions, labels)
    ax.set_ylim(-0.7, n_rows - 0.3)
    ax.axhline(len(POOLED_ORDER), color="#bbbbbb", linewidth=0.6, zorder=1)  # the empty row
    xmin, xmax = ax.get_xlim()
    if term != "intercept" or xmin <= 0.0 <= xmax:
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--", zorder=1)
    for y, text in right_text:
        ax.annotate(
            text,
            xy=(1.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.annotate(
        f"estimate [{level:.0%} CI]  RE weight",
        xy=(1.0, n_rows - 0.3),
        xycoords=("axes fraction", "data"),
        xytext=(8, 4),
        textcoords="offset points",
        va="bottom",
        fontsize=8,
        fontweight="bold",
    )
    unit = f"{feature}, original units" if feature else "original units"
    what = "expected value at the covariate centers" if term == "intercept" else "effect"
    ax.set_xlabel(f"{term}: {what} ({unit})", fontsize=9)
    ax.tick_params(axis="both", labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{region} — {term}", fontsize=11)
    fig.text(0.02, 0.12 / height, _caption(pooled, k_sites, level), fontsize=7.5, va="bottom")
    return fig


def _caption(pooled: pd.DataFrame, k_sites: int, level: float) -> str:
    parts = []
    if "random_effects" in pooled.index:
        re = pooled.loc["random_effects"]
        k = int(re["k"]) if math.isfinite(float(re["k"])) else 0
        parts.append(
            f"Random effects: I² = {_fmt(float(re['i2']))}%, τ² = {_fmt(float(re['tau2']))}, "
            f"Q = {_fmt(float(re['q']))} (p = {_fmt(float(re['q_p']))}), k = {k} of "
            f"{k_sites} sites"
        )
    if "pooled_regression" in pooled.index:
        pr = pooled.loc["pooled_regression"]
        parts.append(
            f"pooled regression (site intercepts, common slopes), n ≈ {float(pr['n']):.0f}"
        )
    parts.append(f"{level:.0%} intervals include the DP noise variance")
    second = "; ".join(parts[1:])
    return "; ".join(parts[:1]) + ".\n" + second[:1].upper() + second[1:] + "."


def forest_plot(
    site_table: pd.DataFrame,
    pooled_rows: pd.DataFrame,
    region: str,
    term: str,
    out_png: str | os.PathLike[str],
    *,
    level: float = 0.95,
    feature: str | None = None,
) -> Path:
    """Draw the forest plot of one region and term and write it as a PNG, atomically.

    Parameters
    ----------
    site_table, pooled_rows, region, term, level, feature
        As for :func:`forest_figure`.
    out_png : path-like
        Destination.

    Returns
    -------
    pathlib.Path
        ``out_png``. The PNG's ``Title`` text chunk holds ``"<region> <term>"`` and its
        ``Description`` the sites drawn, one per row (``sites: A, B, C``).
    """
    fig = forest_figure(site_table, pooled_rows, region, term, level=level, feature=feature)
    sites = _select(site_table, region, term, "site")["site"].astype(str)
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        metadata={
            "Title": f"{region} {term}",
            "Description": "sites: " + ", ".join(sites),
            "Software": "fednipype",
        },
    )
    LOGGER.debug("forest plot of %s %s: %d sites", region, term, len(sites))
    return atomic_write_bytes(out_png, buffer.getvalue())
