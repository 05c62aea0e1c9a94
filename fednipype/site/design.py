"""From per-subject feature files and the participants table to a model's design matrix.

The privacy unit is the participant, so a release uses one row per participant: with several
sessions, the first session (sorted by label — the baseline in longitudinal designs) stands for
the participant, and the others are left out (counted in the report).  Rows with a missing
covariate or feature value are dropped before any statistic, never imputed (imputation would
need values learnt from the data), and the drop counts are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fednipype.exceptions import BIDSError, FednipypeError
from fednipype.features import read_features
from fednipype.images import bids_entities

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A linear model of one regional feature on covariates, with public categorical coding.

    Parameters
    ----------
    response : str
        Feature column of the regional-features tables (e.g. ``volume_mm3``, ``mean``).
    numeric : tuple of str
        Numeric covariates from ``participants.tsv`` (e.g. ``age``).
    categorical : mapping
        Categorical covariate → its levels, the first being the reference level.  Levels are
        declared, never read from the data.

    Examples
    --------
    >>> ModelSpec().terms
    ('intercept', 'age', 'sex[M]', 'group[patient]')
    """

    response: str = "volume_mm3"
    numeric: tuple[str, ...] = ("age",)
    categorical: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"sex": ("F", "M"), "group": ("control", "patient")}
    )

    @property
    def terms(self) -> tuple[str, ...]:
        """Column names of the design matrix Z."""
        dummies = [f"{name}[{lvl}]" for name, lv in self.categorical.items() for lvl in lv[1:]]
        return ("intercept", *self.numeric, *dummies)

    @property
    def reference_levels(self) -> dict[str, str]:
        """Reference level of each categorical covariate."""
        return {name: levels[0] for name, levels in self.categorical.items()}

    @property
    def covariates(self) -> tuple[str, ...]:
        """Every participants.tsv column the model reads."""
        return (*self.numeric, *self.categorical)


@dataclass(frozen=True)
class Design:
    """Design matrix Z, responses Y (one column per region) and what was left out."""

    z: np.ndarray
    y: np.ndarray
    terms: tuple[str, ...]
    regions: tuple[str, ...]
    groups: np.ndarray
    dropped: dict[str, int]

    @property
    def n(self) -> int:
        """Number of participants (rows)."""
        return int(self.z.shape[0])


def load_feature_table(tsvs: Sequence[str | Path], feature: str = "volume_mm3") -> pd.DataFrame:
    """Stack per-subject regional-feature files into one table (rows: subject × session).

    Parameters
    ----------
    tsvs : sequence of path-like
        ``sub-X[_ses-Y]_desc-regional_features.tsv`` files.
    feature : str
        Column to keep (``volume_mm3``, ``mean``, …).

    Returns
    -------
    pandas.DataFrame
        Index ``(participant_id, session)`` (session ``""`` when absent), one column per
        region, in the atlas's order.

    Raises
    ------
    FednipypeError
        A file is not named as a BIDS derivative, lacks the column, or the files disagree on
        their regions.
    """
    rows, index, regions = [], [], None
    for tsv in tsvs:
        entities = bids_entities(tsv)
        if "sub" not in entities:
            raise BIDSError(f"{tsv}: file name has no sub-<label> entity")
        table = read_features(tsv)
        if feature not in table.columns:
            raise FednipypeError(
                f"{tsv}: no column {feature!r}; columns are {', '.join(table.columns)}"
            )
        names = tuple(table["name"].astype(str))
        if regions is None:
            regions = names
        elif names != regions:
            raise FednipypeError(f"{tsv}: regions differ from {tsvs[0]} (different atlas?)")
        rows.append(table[feature].to_numpy(dtype=float))
        index.append((f"sub-{entities['sub']}", entities.get("ses", "")))
    if not rows:
        raise FednipypeError("no regional-feature files were given")
    if len(set(index)) != len(index):
        dupes = sorted({i for i in index if index.count(i) > 1})
        raise FednipypeError(f"more than one feature file for {dupes[0]}")
    frame = pd.DataFrame(
        np.vstack(rows),
        index=pd.MultiIndex.from_tuples(index, names=["participant_id", "session"]),
        columns=list(regions),
    )
    return frame.sort_index()


def build_design(features: pd.DataFrame, participants: pd.DataFrame, spec: ModelSpec) -> Design:
    """Join features with covariates and code them as the model's design matrix.

    Parameters
    ----------
    features : pandas.DataFrame
        From :func:`load_feature_table`.
    participants : pandas.DataFrame
        From :func:`fednipype.bids.read_participants`.
    spec : ModelSpec
        The model.

    Returns
    -------
    Design
        One row per participant with complete data; ``dropped`` counts rows left out by
        reason (``extra_sessions``, ``no_participants_row``, ``missing_<column>``,
        ``missing_feature``, ``unknown_level_<column>``).
    """
    source = participants.attrs.get("source", "participants.tsv")
    missing_columns = [c for c in spec.covariates if c not in participants.columns]
    if missing_columns:
        raise BIDSError(
            f"{source}: the model needs column(s) {', '.join(missing_columns)}; "
            f"columns are {', '.join(participants.columns)}"
        )
    dropped: dict[str, int] = {}
    first = features.groupby(level="participant_id", sort=True).head(1)
    dropped["extra_sessions"] = len(features) - len(first)
    first = first.droplevel("session")
    known = first.index.isin(participants.index)
    dropped["no_participants_row"] = int((~known).sum())
    first = first[known]
    covariates = participants.loc[first.index, list(spec.covariates)]
    keep = np.ones(len(first), dtype=bool)
    for column in spec.covariates:
        missing = covariates[column].isna().to_numpy()
        dropped[f"missing_{column}"] = int((missing & keep).sum())
        keep &= ~missing
    for column, levels in spec.categorical.items():
        unknown = ~covariates[column].isin(levels).to_numpy() & keep
        dropped[f"unknown_level_{column}"] = int(unknown.sum())
        keep &= ~unknown
    values = first.to_numpy(dtype=float)
    incomplete = ~np.isfinite(values).all(axis=1) & keep
    dropped["missing_feature"] = int(incomplete.sum())
    keep &= ~incomplete
    covariates = covariates[keep]
    columns = [np.ones(int(keep.sum()))]
    columns += [covariates[c].to_numpy(dtype=float) for c in spec.numeric]
    for column, levels in spec.categorical.items():
        columns += [(covariates[column] == level).to_numpy(dtype=float) for level in levels[1:]]
    dropped = {k: v for k, v in dropped.items() if v}
    if dropped:
        LOGGER.info("rows left out of the design: %s", dropped)
    groups = (
        covariates["group"].to_numpy(dtype=object)
        if "group" in spec.categorical
        else np.array([], dtype=object)
    )
    return Design(
        z=np.column_stack(columns),
        y=values[keep],
        terms=spec.terms,
        regions=tuple(features.columns),
        groups=groups,
        dropped=dropped,
    )
