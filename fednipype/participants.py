"""The participants table (``participants.tsv`` + ``participants.json``), read with explicit types.

Column names seen in the wild are mapped to fednipype's (``Age`` → ``age``, ``Gender`` →
``sex`` …), ``n/a`` and empty cells are missing values, a byte-order mark and CRLF line ends
are accepted, and every problem is a :class:`~fednipype.exceptions.BIDSError` naming the file,
the column and the participant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fednipype.exceptions import BIDSError

LOGGER = logging.getLogger(__name__)

#: Column names seen in the wild, mapped to fednipype's names (exact, case-sensitive match
#: first, then case-insensitive).  ``Gender`` is taken as ``sex`` only when no ``sex`` exists.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "age": ("age", "Age", "AGE", "age_years", "age_at_scan", "age_at_first_scan_years"),
    "sex": ("sex", "Sex", "SEX", "gender", "Gender", "GENDER"),
    "group": ("group", "Group", "GROUP", "diagnosis", "Diagnosis", "dx", "DX"),
}

#: Values of ``sex`` mapped to BIDS's recommended ``M`` / ``F`` (case-insensitive).
SEX_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
MISSING_VALUES = {"n/a", "", "na", "nan", "NaN", "N/A"}


def _normalise_label(label: str) -> str:
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


def _find_column(columns: Sequence[str], canonical: str) -> str | None:
    aliases = COLUMN_ALIASES[canonical]
    for alias in aliases:
        if alias in columns:
            return alias
    lowered = {c.lower(): c for c in columns}
    for alias in aliases:
        if alias.lower() in lowered:
            return lowered[alias.lower()]
    return None


def read_participants(bids_dir: str | Path) -> pd.DataFrame:
    """Read ``participants.tsv`` with explicit types.

    ``participant_id`` is required and unique.  ``n/a`` (and empty cells) are missing values.
    Common column variants are mapped to fednipype's names: ``Age`` → ``age`` (float, years),
    ``Gender``/``Sex`` → ``sex`` (``M``/``F``/``O``), ``Group``/``diagnosis`` → ``group``
    (string).  A byte-order mark and CRLF line ends are accepted.  Other columns are kept:
    numeric when ``participants.json`` gives them ``Units``, strings otherwise.

    Parameters
    ----------
    bids_dir : path-like
        Dataset root (or the ``participants.tsv`` path itself).

    Returns
    -------
    pandas.DataFrame
        Indexed by ``participant_id``; ``attrs["source"]`` is the file and
        ``attrs["renamed"]`` the column mapping applied.

    Raises
    ------
    BIDSError
        Missing or unreadable file, no ``participant_id`` column, duplicate or malformed IDs,
        or a non-numeric value in a numeric column (naming the row and the value).

    Examples
    --------
    >>> table = read_participants("bids_examples/siteC")
    >>> row = table.loc["sub-01"]
    >>> float(row["age"]), row["sex"], row["group"]
    (26.5, 'F', 'patient')
    >>> int(table["age"].isna().sum())  # one 'n/a'
    1
    """
    path = Path(bids_dir)
    if path.is_dir():
        path = path / "participants.tsv"
    if not path.is_file():
        raise BIDSError(f"{path}: participants.tsv not found")
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as err:
        raise BIDSError(
            f"{path}: the table is empty; expected a header row with 'participant_id'"
        ) from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise BIDSError(f"{path}: cannot be read as a tab-separated table ({err})") from err
    raw.columns = [str(c).strip() for c in raw.columns]
    raw = raw.apply(lambda col: col.str.strip())
    if "participant_id" not in raw.columns:
        raise BIDSError(
            f"{path}: no 'participant_id' column; columns are {_short(', '.join(raw.columns))}"
        )
    ids = raw["participant_id"]
    bad = ids[~ids.str.match(r"^sub-[A-Za-z0-9]+$")]
    if len(bad):
        raise BIDSError(
            f"{path}: participant_id must look like 'sub-<label>'; "
            f"row {int(bad.index[0]) + 2} has {_short(bad.iloc[0])!r}"
        )
    dupes = sorted(ids[ids.duplicated()].unique())
    if dupes:
        raise BIDSError(f"{path}: duplicate participant_id: {_short(', '.join(dupes))}")

    sidecar = _read_sidecar(path.with_suffix(".json"))
    renamed: dict[str, str] = {}
    for canonical in COLUMN_ALIASES:
        if canonical in raw.columns:
            continue
        found = _find_column([c for c in raw.columns if c not in renamed], canonical)
        if found is not None:
            renamed[found] = canonical
    table = raw.rename(columns=renamed)
    if renamed:
        LOGGER.info("%s: renamed columns %s", path, renamed)
    missing = table.isin(MISSING_VALUES)
    table = table.mask(missing)
    for column in table.columns:
        if column == "participant_id":
            continue
        original = next((k for k, v in renamed.items() if v == column), column)
        if column == "age" or "Units" in sidecar.get(original, {}):
            table[column] = _to_float(table[column], path, column, ids)
        elif column == "sex":
            table[column] = table[column].map(
                lambda v: v if pd.isna(v) else SEX_VALUES.get(v.lower(), v)
            )
    table = table.set_index("participant_id")
    table.attrs["source"] = str(path)
    table.attrs["renamed"] = renamed
    return table


def _read_sidecar(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BIDSError(f"{path}: not valid JSON ({err})") from err
    return {k: v for k, v in meta.items() if isinstance(v, dict)} if isinstance(meta, dict) else {}


def _to_float(values: pd.Series, path: Path, column: str, ids: pd.Series) -> pd.Series:
    # BIDS recommends top-coding ages of 89 and over as "89+": read as the lower bound.
    top_coded = values.str.fullmatch(r"\d+(\.\d+)?\+", na=False)
    if top_coded.any():
        LOGGER.warning(
            "%s: column '%s' has top-coded values (%s) read as their lower bound",
            path,
            column,
            ", ".join(sorted(set(values[top_coded]))),
        )
        values = values.where(~top_coded, values.str.rstrip("+"))
    numbers = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & numbers.isna()
    if bad.any():
        row = bad.idxmax()
        raise BIDSError(
            f"{path}: column '{column}' expects numbers or n/a; {_short(ids[row])} has "
            f"{_short(values[row])!r}"
        )
    numbers = numbers.astype(float)
    infinite = numbers.notna() & ~np.isfinite(numbers.to_numpy(dtype=float))
    if infinite.any():
        row = infinite.idxmax()
        raise BIDSError(
            f"{path}: column '{column}' expects finite numbers or n/a; {_short(ids[row])} has "
            f"{_short(values[row])!r} (infinite as a number)"
        )
    return numbers


def _short(value: object, limit: int = 60) -> str:
    """A value for an error message, cut to ``limit`` characters.

    >>> _short("x" * 100).endswith("x… (100 chars)")
    True
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def match_participants(subjects: Sequence[str], table: pd.DataFrame) -> list[str]:
    """Subjects (labels without ``sub-``) that have no row in the participants table.

    A subject with images but no phenotype row is not an error: participant-level feature
    extraction needs no phenotype, and group-level statistics leave such subjects out.  Each
    one is logged as a warning naming the table, and returned so callers can report them.
    """
    known = set(table.index)
    missing = [s for s in subjects if f"sub-{_normalise_label(s)}" not in known]
    for subject in missing:
        LOGGER.warning(
            "sub-%s has images but no row in %s: left out of group-level statistics",
            subject,
            table.attrs.get("source", "participants.tsv"),
        )
    return missing
