"""Feature quality control for the site report: total grey matter per scan, robust outliers.

Private and site-local: these numbers are per participant and never leave the site.

The outlier rule
----------------
For each atlas, the total grey-matter volume of every subject/session (the sum of its regional
``volume_mm3``) is regressed on age with the Theil–Sen estimator (median of pairwise slopes,
robust to up to ~29 % of outlying points). Each scan's residual ``r`` gets a robust z-score

``z = (r − median(r)) / (1.4826 · MAD(r))``,  ``MAD(r) = median(|r − median(r)|)``

(the factor makes the MAD estimate the SD of normal data), and a scan is flagged when
``|z| >`` :data:`ROBUST_Z_LIMIT` (3.5, the modified z-score cut-off of Iglewicz and Hoaglin,
1993). With fewer than three scans with an age, or a single distinct age, no line is fitted
(slope 0: the rule applies to the totals themselves); when the MAD is 0 no scan is flagged.
Scans without an age are listed, not scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from fednipype.exceptions import FednipypeError
from fednipype.features import read_features, read_sidecar
from fednipype.images import bids_entities

__all__ = ["MAD_TO_SD", "ROBUST_Z_LIMIT", "QCResult", "Scan", "read_scans", "robust_outliers"]

#: |robust z| above which a scan is flagged.
ROBUST_Z_LIMIT = 3.5
#: 1 / Φ⁻¹(3/4): scales the MAD of normal data to its SD.
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class Scan:
    """One participant-level feature table and what the report shows of it.

    Attributes
    ----------
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``.
    atlas : str
        Atlas name from the table's sidecar.
    total_gm_mm3 : float
        Sum of the regional ``volume_mm3`` (NaN regions left out).
    age : float
        From ``participants.tsv``; NaN when missing.
    robust_z : float
        See the module's rule; NaN when not scored.
    outlier : bool
        ``|robust_z| >`` :data:`ROBUST_Z_LIMIT`.
    """

    subject: str
    session: str | None
    atlas: str
    total_gm_mm3: float
    age: float = math.nan
    robust_z: float = math.nan
    outlier: bool = False


@dataclass(frozen=True)
class QCResult:
    """The robust fit of one atlas's scans: the line drawn and the scans, scored."""

    atlas: str
    scans: tuple[Scan, ...]
    slope: float
    intercept: float
    scale: float


def read_scans(tables: Sequence[Path]) -> tuple[list[Scan], list[tuple[Path, str]]]:
    """Read feature tables into :class:`Scan` rows (age not yet attached).

    Parameters
    ----------
    tables : sequence of Path
        ``*_desc-regional_features.tsv`` files.

    Returns
    -------
    scans : list of Scan
    unreadable : list of (Path, str)
        Tables that could not be read, with the reason.
    """
    scans, unreadable = [], []
    for tsv in tables:
        try:
            table = read_features(tsv)
            atlas = (read_sidecar(tsv).get("Atlas") or {}).get("Name")
        except FednipypeError as err:
            unreadable.append((tsv, str(err)))
            continue
        entities = bids_entities(tsv)
        scans.append(
            Scan(
                subject=entities.get("sub", ""),
                session=entities.get("ses"),
                atlas=str(atlas or entities.get("atlas") or "unknown atlas"),
                total_gm_mm3=float(np.nansum(table["volume_mm3"].to_numpy(dtype=float))),
            )
        )
    return scans, unreadable


def robust_outliers(scans: Sequence[Scan], atlas: str, ages: pd.Series) -> QCResult:
    """Score one atlas's scans with the module's rule.

    Parameters
    ----------
    scans : sequence of Scan
        The scans of this atlas.
    atlas : str
        Its name.
    ages : pandas.Series
        Age by ``participant_id`` (``sub-…``); absent or NaN means unknown.

    Returns
    -------
    QCResult
    """
    with_age = [replace(s, age=float(ages.get(f"sub-{s.subject}", math.nan))) for s in scans]
    x = np.array([s.age for s in with_age], dtype=float)
    y = np.array([s.total_gm_mm3 for s in with_age], dtype=float)
    scored = np.isfinite(x) & np.isfinite(y)
    slope = intercept = 0.0
    if scored.sum() >= 3 and np.unique(x[scored]).size >= 2:
        fit = stats.theilslopes(y[scored], x[scored], method="joint")
        slope, intercept = float(fit.slope), float(fit.intercept)
    elif scored.any():
        intercept = float(np.median(y[scored]))
    residual = y - (intercept + slope * x)
    z = np.full(len(with_age), math.nan)
    scale = math.nan
    if scored.any():
        centre = np.median(residual[scored])
        scale = MAD_TO_SD * float(np.median(np.abs(residual[scored] - centre)))
        if scale > 0:
            z[scored] = (residual[scored] - centre) / scale
    out = tuple(
        replace(s, robust_z=float(zi), outlier=bool(abs(zi) > ROBUST_Z_LIMIT))
        for s, zi in zip(with_age, z, strict=True)
    )
    return QCResult(atlas=atlas, scans=out, slope=slope, intercept=intercept, scale=scale)
