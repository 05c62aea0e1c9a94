"""BIDS queries over pybids: subjects, sessions, images, the participants table, derivatives.

Everything that parses a BIDS tree goes through :class:`bids.BIDSLayout`; this module adds the
checks and conventions fednipype needs (clear errors naming the file and field, label filters
that accept ``01`` and ``sub-01``, explicit typing of ``participants.tsv``) and the discovery
of the participant level's work (:func:`collect_probseg_maps`, the one query of a whole site).
Writing derivatives (paths, ``dataset_description.json``) is :mod:`fednipype.derivatives`.

Enumeration never opens an image: zero-byte or non-NIfTI files are listed like any other, and
fail later, per file, when a step reads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fednipype.derivatives import FEATURES_DESC, FEATURES_SUFFIX
from fednipype.exceptions import BIDSError

if TYPE_CHECKING:
    from bids import BIDSLayout

LOGGER = logging.getLogger(__name__)

IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
DEFAULT_SPACE = "MNI152NLin2009cAsym"

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


def _read_description(root: Path) -> dict:
    path = root / "dataset_description.json"
    if not path.is_file():
        raise BIDSError(
            f"{path}: missing dataset_description.json; expected a BIDS dataset at {root}"
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BIDSError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(description, dict):
        raise BIDSError(f"{path}: expected a JSON object, got {type(description).__name__}")
    return description


def load_layout(
    bids_dir: str | Path, *, derivatives: bool | Sequence[str | Path] = True
) -> BIDSLayout:
    """Index a BIDS dataset (raw or derivative) with pybids.

    Parameters
    ----------
    bids_dir : path-like
        Root of the dataset; must hold a ``dataset_description.json``.
    derivatives : bool or sequence of path-like
        ``True`` indexes every pipeline under ``bids_dir/derivatives``; a list indexes those
        folders; ``False`` none.  A dataset whose own description says
        ``"DatasetType": "derivative"`` is indexed as a derivative.

    Returns
    -------
    bids.BIDSLayout

    Raises
    ------
    BIDSError
        The folder or its ``dataset_description.json`` is missing or invalid.

    Examples
    --------
    >>> layout = load_layout("bids_examples/siteA")
    >>> layout.get_subjects()[:3]
    ['01', '02', '03']
    """
    from bids import BIDSLayout  # pybids takes ~0.4 s to import: only when a dataset is read

    root = Path(bids_dir).expanduser().resolve()
    if not root.is_dir():
        raise BIDSError(f"{root}: not a folder; expected the root of a BIDS dataset")
    description = _read_description(root)
    is_derivative = description.get("DatasetType") == "derivative"
    deriv: bool | list[str] = derivatives if isinstance(derivatives, bool) else []
    if not isinstance(derivatives, bool):
        deriv = [str(Path(d).resolve()) for d in derivatives]
    if deriv is True and not (root / "derivatives").is_dir():
        deriv = False
    try:
        return BIDSLayout(
            str(root), validate=False, derivatives=deriv, is_derivative=is_derivative
        )
    except Exception as err:  # pybids raises several unrelated types for bad trees
        raise BIDSError(f"{root}: pybids could not index the dataset: {err}") from err


def get_subjects(layout: BIDSLayout, participant_label: Iterable[str] | None = None) -> list[str]:
    """Subject labels (without ``sub-``), optionally filtered.

    Parameters
    ----------
    layout : bids.BIDSLayout
        The dataset.
    participant_label : iterable of str, optional
        Labels to keep, with or without the ``sub-`` prefix.  ``None`` keeps all.

    Returns
    -------
    list of str
        Sorted labels.

    Raises
    ------
    BIDSError
        The dataset has no subjects, or a requested label matches none.

    Examples
    --------
    >>> layout = load_layout("bids_examples/siteA")
    >>> get_subjects(layout, ["sub-02", "03"])
    ['02', '03']
    """
    available = sorted(layout.get_subjects())
    if not available:
        raise BIDSError(f"{layout.root}: no subjects found (no sub-<label> folders with data)")
    if participant_label is None:
        return available
    wanted = [_normalise_label(lab) for lab in participant_label]
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise BIDSError(
            f"{layout.root}: participant label(s) {', '.join('sub-' + m for m in missing)} "
            f"match no subject; available: {', '.join(available[:20])}"
            + (" …" if len(available) > 20 else "")
        )
    return sorted(set(wanted))


def get_sessions(layout: BIDSLayout, subject: str) -> list[str]:
    """Session labels of one subject (empty when the dataset has no sessions)."""
    return sorted(layout.get_sessions(subject=_normalise_label(subject)))


def _session_filter(session: str | None) -> dict:
    from bids.layout import Query  # pybids, slow to import (loaded by then: a layout exists)

    return {"session": Query.NONE if session is None else session}


def get_t1w(layout: BIDSLayout, subject: str, session: str | None = None) -> list[str]:
    """Raw T1-weighted images of a subject (one session, or all when the dataset has none).

    ``session=None`` selects images that have no session entity.
    """
    return sorted(
        layout.get(
            subject=_normalise_label(subject),
            suffix="T1w",
            datatype="anat",
            extension=IMAGE_EXTENSIONS,
            scope="raw" if not _is_derivative(layout) else "all",
            return_type="filename",
            **_session_filter(session),
        )
    )


def _is_derivative(layout: BIDSLayout) -> bool:
    return layout.get_dataset_description().get("DatasetType") == "derivative"


def get_probseg(
    layout: BIDSLayout,
    subject: str,
    session: str | None = None,
    *,
    label: str = "GM",
    space: str = DEFAULT_SPACE,
    res: str | None = None,
) -> list[str]:
    """Tissue probability maps from the derivatives (``…_space-S[_res-R]_label-L_probseg``).

    Parameters
    ----------
    layout : bids.BIDSLayout
        A layout indexing the derivatives (see :func:`load_layout`).
    subject, session : str
        Entities; ``session=None`` selects maps without a session entity.
    label : str
        Tissue (``GM``, ``WM``, ``CSF``).
    space : str
        Template space.
    res : str, optional
        Keep only this ``res-`` entity; by default any.

    Returns
    -------
    list of str
        Sorted file names.
    """
    filters = {"res": res} if res is not None else {}
    return sorted(
        layout.get(
            subject=_normalise_label(subject),
            suffix="probseg",
            label=label,
            space=space,
            extension=IMAGE_EXTENSIONS,
            scope="all",
            return_type="filename",
            # a raw-only layout does not know the derivative entity 'label': nothing matches
            invalid_filters="allow",
            **_session_filter(session),
            **filters,
        )
    )


@dataclass(frozen=True, order=True)
class ImageRecord:
    """One image found for a subject/session."""

    subject: str
    session: str | None
    path: str

    @property
    def key(self) -> str:
        """``sub-<subject>[_ses-<session>]``, e.g. for messages and file names.

        >>> ImageRecord("01", "2", "x.nii.gz").key
        'sub-01_ses-2'
        """
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def collect_images(
    layout: BIDSLayout,
    subjects: Sequence[str],
    *,
    kind: str = "probseg",
    label: str = "GM",
    space: str = DEFAULT_SPACE,
) -> list[ImageRecord]:
    """All images of ``kind`` (``probseg`` or ``T1w``) for the given subjects, in one query.

    Subjects without an image are logged; the caller decides whether an empty result is an
    error.

    Examples
    --------
    >>> layout = load_layout("bids_examples/siteA")
    >>> records = collect_images(layout, ["01"])
    >>> [(r.subject, r.session) for r in records]
    [('01', '1'), ('01', '2')]
    """
    if kind == "probseg":
        filters = {"suffix": "probseg", "label": label, "space": space, "scope": "all"}
        filters["invalid_filters"] = "allow"
    elif kind == "T1w":
        filters = {"suffix": "T1w", "datatype": "anat"}
        filters["scope"] = "all" if _is_derivative(layout) else "raw"
    else:
        raise ValueError(f"kind: expected 'probseg' or 'T1w', got {kind!r}")
    wanted = [_normalise_label(s) for s in subjects]
    found = layout.get(subject=wanted, extension=IMAGE_EXTENSIONS, return_type="object", **filters)
    records = sorted(
        ImageRecord(f.entities["subject"], f.entities.get("session"), f.path) for f in found
    )
    with_images = {r.subject for r in records}
    for subject in wanted:
        if subject not in with_images:
            LOGGER.warning("sub-%s: no %s image found in %s", subject, kind, layout.root)
    return records


def collect_probseg_maps(
    bids_dir: str | Path,
    *,
    participant_label: Iterable[str] | None = None,
    space: str = DEFAULT_SPACE,
    label: str = "GM",
) -> list[ImageRecord]:
    """The probability maps the participant level processes: exactly one per subject/session.

    One pybids query for the whole dataset (per-subject queries cost seconds on a site of 30).

    Parameters
    ----------
    bids_dir : path-like
        BIDS dataset whose ``derivatives/`` hold ``…_space-<space>_label-<label>_probseg``.
    participant_label : iterable of str, optional
        Subjects to keep (with or without ``sub-``); all by default.
    space, label : str
        Entities of the probability maps.

    Returns
    -------
    list of ImageRecord
        Sorted by subject and session.

    Raises
    ------
    BIDSError
        If the dataset cannot be read, a requested subject does not exist, no map is found at
        all, or a subject/session has more than one.

    Examples
    --------
    >>> maps = collect_probseg_maps("bids_examples/siteA", participant_label=["02"])
    >>> [m.key for m in maps]
    ['sub-02_ses-1', 'sub-02_ses-2']
    """
    layout = load_layout(bids_dir, derivatives=True)
    subjects = get_subjects(layout, participant_label)
    records = collect_images(layout, subjects, kind="probseg", label=label, space=space)
    by_key: dict[tuple[str, str | None], list[ImageRecord]] = {}
    for record in records:
        by_key.setdefault((record.subject, record.session), []).append(record)
    maps = []
    for (subject, session), found in sorted(
        by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        if len(found) > 1:
            where = f"sub-{subject}" + (f" ses-{session}" if session else "")
            raise BIDSError(
                f"{where}: {len(found)} space-{space} label-{label} probseg images match "
                f"({', '.join(Path(r.path).name for r in found)}); expected one"
            )
        maps.append(found[0])
    if not maps:
        raise BIDSError(
            f"{bids_dir}: no space-{space} label-{label} probseg image found in its derivatives"
        )
    return maps


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
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise BIDSError(f"{path}: cannot be read as a tab-separated table ({err})") from err
    raw.columns = [str(c).strip() for c in raw.columns]
    raw = raw.apply(lambda col: col.str.strip())
    if "participant_id" not in raw.columns:
        raise BIDSError(
            f"{path}: no 'participant_id' column; columns are {', '.join(raw.columns)}"
        )
    ids = raw["participant_id"]
    bad = ids[~ids.str.match(r"^sub-[A-Za-z0-9]+$")]
    if len(bad):
        raise BIDSError(
            f"{path}: participant_id must look like 'sub-<label>'; "
            f"row {int(bad.index[0]) + 2} has {bad.iloc[0]!r}"
        )
    dupes = sorted(ids[ids.duplicated()].unique())
    if dupes:
        raise BIDSError(f"{path}: duplicate participant_id: {', '.join(dupes)}")

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
            f"{path}: column '{column}' expects numbers or n/a; {ids[row]} has {values[row]!r}"
        )
    return numbers.astype(float)


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


def summarize(bids_dir: str | Path, participant_label: Iterable[str] | None = None) -> dict:
    """Counts of one dataset for a summary table: subjects, sessions, images, phenotypes.

    Parameters
    ----------
    bids_dir : path-like
        Dataset root.
    participant_label : iterable of str, optional
        Restrict to these subjects.

    Returns
    -------
    dict
        ``dataset, subjects, sessions, t1w, gm_probseg, participants_rows, age_missing,
        phenotypes`` (column names), ``without_phenotypes`` (subjects without a row).

    Examples
    --------
    >>> summarize("bids_examples/siteA")["gm_probseg"]
    48
    """
    layout = load_layout(bids_dir)
    subjects = get_subjects(layout, participant_label)
    n_sessions = sum(max(len(get_sessions(layout, s)), 1) for s in subjects)
    t1w = len(collect_images(layout, subjects, kind="T1w"))
    probseg = len(collect_images(layout, subjects, kind="probseg"))
    row = {
        "dataset": layout.get_dataset_description().get("Name", Path(layout.root).name),
        "subjects": len(subjects),
        "sessions": n_sessions,
        "t1w": t1w,
        "gm_probseg": probseg,
        "participants_rows": 0,
        "age_missing": 0,
        "phenotypes": [],
        "without_phenotypes": [],
    }
    participants = Path(layout.root) / "participants.tsv"
    if participants.is_file():
        table = read_participants(participants)
        row["participants_rows"] = len(table)
        if "age" in table.columns:
            row["age_missing"] = int(np.sum(table["age"].isna()))
        row["phenotypes"] = list(table.columns)
        row["without_phenotypes"] = match_participants(subjects, table)
    return row


def find_feature_files(
    derivatives_dir: str | Path, participant_label: Iterable[str] | None = None
) -> list[Path]:
    """Regional-feature tables of a fednipype derivative dataset (one per subject/session).

    Parameters
    ----------
    derivatives_dir : path-like
        Output folder of the participant level (holds fednipype's
        ``dataset_description.json``).
    participant_label : iterable of str, optional
        Subjects to keep, with or without ``sub-``.

    Returns
    -------
    list of pathlib.Path
        Sorted ``sub-X[_ses-Y]_desc-regional_features.tsv`` files.

    Raises
    ------
    BIDSError
        The folder is not a derivative dataset, or holds no feature table.
    """
    layout = load_layout(derivatives_dir, derivatives=False)
    subjects = get_subjects(layout, participant_label)
    files = layout.get(
        subject=subjects,
        desc=FEATURES_DESC,
        suffix=FEATURES_SUFFIX,
        extension=".tsv",
        return_type="filename",
        invalid_filters="allow",
    )
    if not files:
        raise BIDSError(f"{derivatives_dir}: no *_desc-regional_features.tsv files found")
    return sorted(Path(f) for f in files)
