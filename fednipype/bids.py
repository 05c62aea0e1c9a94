"""BIDS queries over pybids: subjects, sessions, images, derivatives, feature tables.

Everything that parses a BIDS tree goes through :class:`bids.BIDSLayout`; this module adds the
checks and conventions fednipype needs (clear errors naming the file and field, label filters
that accept ``01`` and ``sub-01``, a broken unrelated derivative skipped with a warning naming
it, fMRIPrep's BIDS filter files, a choice among resolutions) and the discovery of the
participant level's work (:func:`collect_probseg_maps`, the one query of a whole site).
The participants table is :mod:`fednipype.participants` (its readers are importable from here
too); writing derivatives is :mod:`fednipype.derivatives`.

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

from fednipype.bids_filters import choose_resolution, read_bids_filters, user_filters
from fednipype.derivatives import FEATURES_DESC, FEATURES_SUFFIX
from fednipype.exceptions import BIDSError
from fednipype.images import bids_entities
from fednipype.participants import match_participants, read_participants

__all__ = [
    "DEFAULT_SPACE",
    "ImageRecord",
    "collect_images",
    "collect_probseg_maps",
    "find_feature_files",
    "get_probseg",
    "get_sessions",
    "get_subjects",
    "get_t1w",
    "load_layout",
    "match_participants",
    "read_bids_filters",
    "read_participants",
    "summarize",
]

if TYPE_CHECKING:
    from bids import BIDSLayout

LOGGER = logging.getLogger(__name__)

IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
DEFAULT_SPACE = "MNI152NLin2009cAsym"
#: ``sub-`` labels that are not participants (MEG empty-room recordings).
NOT_PARTICIPANTS = frozenset({"emptyroom"})


def _normalise_label(label: str) -> str:
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


def read_description(root: Path) -> dict:
    """A dataset's ``dataset_description.json`` as a dict (BIDSError naming it otherwise)."""
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


def _resolve_root(bids_dir: str | Path, what: str = "the root of a BIDS dataset") -> Path:
    """The resolved folder, or a BIDSError naming it (missing, a file, a symbolic-link loop)."""
    try:
        root = Path(bids_dir).expanduser().resolve(strict=True)
    except RuntimeError as err:  # Python < 3.13: "Symlink loop from ..."
        raise BIDSError(f"{bids_dir}: a symbolic-link loop; expected {what}") from err
    except OSError as err:
        reason = "a symbolic-link loop" if "loop" in str(err).lower() else "does not exist"
        raise BIDSError(f"{bids_dir}: {reason}; expected {what}") from err
    if not root.is_dir():
        raise BIDSError(f"{bids_dir}: not a folder; expected {what}")
    return root


def check_derivative_dataset(root: Path) -> None:
    """Refuse a derivative folder pybids cannot index: no or invalid description, no pipeline.

    Raises
    ------
    BIDSError
        Naming the folder's ``dataset_description.json`` and what is wrong with it.
    """
    description = read_description(root)
    generated = description.get("GeneratedBy")
    legacy = description.get("PipelineDescription")
    if not (
        (isinstance(generated, list) and generated and isinstance(generated[0], dict)
         and generated[0].get("Name"))
        or (isinstance(legacy, dict) and legacy.get("Name"))
    ):  # fmt: skip
        raise BIDSError(
            f"{root / 'dataset_description.json'}: a derivative dataset needs "
            "'GeneratedBy': [{'Name': ...}]"
        )


def usable_derivatives(root: Path) -> list[Path]:
    """The derivative datasets under ``root/derivatives`` that pybids can index.

    A broken unrelated one (no, empty or invalid ``dataset_description.json``) is skipped with
    a warning naming it, instead of stopping the enumeration of the whole dataset.
    """
    folder = root / "derivatives"
    if not folder.is_dir():
        return []
    usable = []
    for candidate in sorted(p for p in folder.iterdir() if p.is_dir()):
        if candidate.name.startswith("."):
            continue
        try:
            check_derivative_dataset(candidate)
        except BIDSError as err:
            LOGGER.warning("skipping the derivative dataset %s: %s", candidate, err)
            continue
        usable.append(candidate)
    return usable


def load_layout(
    bids_dir: str | Path, *, derivatives: bool | Sequence[str | Path] = True
) -> BIDSLayout:
    """Index a BIDS dataset (raw or derivative) with pybids.

    Parameters
    ----------
    bids_dir : path-like
        Root of the dataset; must hold a ``dataset_description.json``.
    derivatives : bool or sequence of path-like
        ``True`` indexes every usable pipeline under ``bids_dir/derivatives`` (a broken one is
        skipped with a warning, :func:`usable_derivatives`); a list indexes those derivative
        datasets (each must be valid: e.g. fMRIPrep's or sMRIPrep's output elsewhere);
        ``False`` none.  A dataset whose own description says ``"DatasetType": "derivative"``
        is indexed as a derivative.

    Returns
    -------
    bids.BIDSLayout

    Raises
    ------
    BIDSError
        The folder (a symbolic-link loop included) or its ``dataset_description.json`` is
        missing or invalid, or a derivative dataset given in the list is.

    Examples
    --------
    >>> layout = load_layout("bids_examples/siteA")
    >>> layout.get_subjects()[:3]
    ['01', '02', '03']
    """
    from bids import BIDSLayout  # pybids takes ~0.4 s to import: only when a dataset is read

    root = _resolve_root(bids_dir)
    description = read_description(root)
    is_derivative = description.get("DatasetType") == "derivative"
    if isinstance(derivatives, bool):
        deriv = [str(p) for p in usable_derivatives(root)] if derivatives else []
    else:
        deriv = []
        for folder in derivatives:
            path = _resolve_root(folder, "a derivative dataset (--derivatives)")
            check_derivative_dataset(path)
            deriv.append(str(path))
    try:
        return BIDSLayout(
            str(root), validate=False, derivatives=deriv or False, is_derivative=is_derivative
        )
    except Exception as err:  # pybids raises several unrelated types for bad trees
        raise BIDSError(f"{root}: pybids could not index the dataset: {err}") from err


def get_subjects(layout: BIDSLayout, participant_label: Iterable[str] | None = None) -> list[str]:
    """Subject labels (without ``sub-``), optionally filtered; ``sub-emptyroom`` is not one.

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
    available = sorted(s for s in layout.get_subjects() if s not in NOT_PARTICIPANTS)
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

    ``session=None`` selects images that have no session entity.  Preprocessed T1w images
    (a derivative's, with ``space-`` or ``desc-``) are not raw and never counted.
    """
    return sorted(
        layout.get(
            subject=_normalise_label(subject),
            extension=IMAGE_EXTENSIONS,
            return_type="filename",
            **_raw_t1w_filters(),
            **_session_filter(session),
        )
    )


def _raw_t1w_filters() -> dict:
    """Raw T1w images only: in the raw scope, without ``space-`` or ``desc-`` (preprocessed)."""
    from bids.layout import Query  # pybids, slow to import (loaded by then: a layout exists)

    return {
        "suffix": "T1w",
        "datatype": "anat",
        "scope": "raw",
        "space": Query.NONE,
        "desc": Query.NONE,
        "invalid_filters": "allow",
    }


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
    filters: dict | None = None,
    filter_source: str | Path | None = None,
) -> list[ImageRecord]:
    """All images of ``kind`` (``probseg`` or ``T1w``) for the given subjects, in one query.

    ``T1w`` are raw images only (see :func:`get_t1w`).  Subjects without an image are logged;
    the caller decides whether an empty result is an error.

    Parameters
    ----------
    layout : bids.BIDSLayout
        The dataset (with its derivatives for ``probseg``).
    subjects : sequence of str
        Subject labels.
    kind : {"probseg", "T1w"}
        What to collect.
    label, space : str
        Entities of the probability maps.
    filters : dict, optional
        Extra entity filters (a BIDS filter file's query; ``None`` values: entity absent).
    filter_source : path-like, optional
        Where ``filters`` come from, named in errors.

    Examples
    --------
    >>> layout = load_layout("bids_examples/siteA")
    >>> records = collect_images(layout, ["01"])
    >>> [(r.subject, r.session) for r in records]
    [('01', '1'), ('01', '2')]
    """
    if kind == "probseg":
        query = {"suffix": "probseg", "label": label, "space": space, "scope": "all"}
        query["invalid_filters"] = "allow"
    elif kind == "T1w":
        query = _raw_t1w_filters()
    else:
        raise ValueError(f"kind: expected 'probseg' or 'T1w', got {kind!r}")
    query.update(user_filters(layout, filters, filter_source))
    wanted = [_normalise_label(s) for s in subjects]
    found = layout.get(subject=wanted, extension=IMAGE_EXTENSIONS, return_type="object", **query)
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
    derivatives: bool | Sequence[str | Path] = True,
    res: str | None = None,
    filters: dict | None = None,
    filter_source: str | Path | None = None,
    layout: BIDSLayout | None = None,
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
    derivatives : bool or sequence of path-like
        Where the maps are: ``True`` the dataset's own ``derivatives/``; or derivative
        datasets elsewhere (fMRIPrep's or sMRIPrep's output), see :func:`load_layout`.
    res : str, optional
        ``res-`` entity of the maps to use; by default the native maps (no ``res-``), or the
        one resolution present (:func:`fednipype.bids_filters.choose_resolution`).
    filters : dict, optional
        Extra entity filters of the maps (the ``probseg`` query of a BIDS filter file).
    filter_source : path-like, optional
        The filter file, named in errors.
    layout : bids.BIDSLayout, optional
        An index of the dataset already made with the same ``derivatives``.

    Returns
    -------
    list of ImageRecord
        Sorted by subject and session.

    Raises
    ------
    BIDSError
        If the dataset cannot be read, a requested subject does not exist, no map is found at
        all, or a subject/session has more than one at the chosen resolution.

    Examples
    --------
    >>> maps = collect_probseg_maps("bids_examples/siteA", participant_label=["02"])
    >>> [m.key for m in maps]
    ['sub-02_ses-1', 'sub-02_ses-2']
    """
    layout = layout or load_layout(bids_dir, derivatives=derivatives)
    subjects = get_subjects(layout, participant_label)
    records = collect_images(
        layout,
        subjects,
        kind="probseg",
        label=label,
        space=space,
        filters=filters,
        filter_source=filter_source,
    )
    by_key: dict[tuple[str, str | None], list[ImageRecord]] = {}
    for record in records:
        by_key.setdefault((record.subject, record.session), []).append(record)
    maps = []
    for (subject, session), found in sorted(
        by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        where = f"sub-{subject}" + (f" ses-{session}" if session else "")
        chosen = choose_resolution(found, res, where)
        if len(chosen) > 1:
            raise BIDSError(
                f"{where}: {len(chosen)} space-{space} label-{label} probseg images match "
                f"({', '.join(Path(r.path).name for r in chosen)}); expected one (narrow the "
                "choice with --bids-filter-file)"
            )
        if not chosen:
            LOGGER.warning("%s: no probseg image at res-%s", where, res)
            continue
        maps.append(chosen[0])
    if not maps:
        wanted = f" res-{res}" if res else ""
        raise BIDSError(
            f"{bids_dir}: no space-{space} label-{label}{wanted} probseg image found in its "
            "derivatives"
        )
    return maps


def summarize(
    bids_dir: str | Path,
    participant_label: Iterable[str] | None = None,
    *,
    derivatives: bool | Sequence[str | Path] = True,
    filters: dict[str, dict] | None = None,
    filter_source: str | Path | None = None,
    layout: BIDSLayout | None = None,
) -> dict:
    """Counts of one dataset for a summary table: subjects, sessions, images, phenotypes.

    Parameters
    ----------
    bids_dir : path-like
        Dataset root.
    participant_label : iterable of str, optional
        Restrict to these subjects.
    derivatives : bool or sequence of path-like
        Where the probability maps are (see :func:`load_layout`).
    filters : dict, optional
        A BIDS filter file's queries (``probseg``, ``t1w``).
    filter_source : path-like, optional
        The filter file, named in errors.
    layout : bids.BIDSLayout, optional
        An index of the dataset already made with the same ``derivatives``.

    Returns
    -------
    dict
        ``dataset, subjects, sessions, t1w`` (raw T1w images only), ``gm_probseg,
        participants_rows, age_missing, phenotypes`` (column names), ``without_phenotypes``
        (subjects without a row).

    Examples
    --------
    >>> summarize("bids_examples/siteA")["gm_probseg"]
    48
    """
    filters = filters or {}
    layout = layout or load_layout(bids_dir, derivatives=derivatives)
    subjects = get_subjects(layout, participant_label)
    n_sessions = sum(max(len(get_sessions(layout, s)), 1) for s in subjects)
    t1w = collect_images(
        layout, subjects, kind="T1w", filters=filters.get("t1w"), filter_source=filter_source
    )
    probseg = collect_images(
        layout,
        subjects,
        kind="probseg",
        filters=filters.get("probseg"),
        filter_source=filter_source,
    )
    row = {
        "dataset": layout.get_dataset_description().get("Name", Path(layout.root).name),
        "subjects": len(subjects),
        "sessions": n_sessions,
        "t1w": len(t1w),
        "gm_probseg": len(probseg),
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


def feature_tables(
    derivatives_dir: str | Path, participant_label: Iterable[str] | None = None
) -> dict[tuple[str | None, str | None, str | None], list[Path]]:
    """Regional-feature tables of a fednipype derivative dataset, by (space, atlas, res).

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
    groups: dict[tuple[str | None, str | None, str | None], list[Path]] = {}
    for name in sorted(files):
        entities = bids_entities(name)
        key = (entities.get("space"), entities.get("atlas"), entities.get("res"))
        groups.setdefault(key, []).append(Path(name))
    return groups


def find_feature_files(
    derivatives_dir: str | Path,
    participant_label: Iterable[str] | None = None,
    *,
    atlas: str | None = None,
    res: str | None = None,
) -> list[Path]:
    """Regional-feature tables of a fednipype derivative dataset (one per subject/session).

    Parameters
    ----------
    derivatives_dir : path-like
        Output folder of the participant level (holds fednipype's
        ``dataset_description.json``).
    participant_label : iterable of str, optional
        Subjects to keep, with or without ``sub-``.
    atlas, res : str, optional
        Keep the tables of this ``atlas-`` (and ``res-``) entity.  Needed only when the
        folder holds tables of several atlases or resolutions.

    Returns
    -------
    list of pathlib.Path
        Sorted ``sub-X[_ses-Y][_space-S_atlas-A][_res-R]_desc-regional_features.tsv`` files.

    Raises
    ------
    BIDSError
        The folder is not a derivative dataset, holds no feature table (of ``atlas``), or
        holds tables of several atlases/resolutions and none was chosen.
    """
    groups = feature_tables(derivatives_dir, participant_label)
    keys = [
        key
        for key in groups
        if (atlas is None or key[1] == atlas) and (res is None or key[2] == res)
    ]
    if not keys:
        present = ", ".join(_describe_key(k) for k in groups)
        raise BIDSError(
            f"{derivatives_dir}: no feature table of atlas-{atlas or '*'} res-{res or '*'}; "
            f"present: {present}"
        )
    if len(keys) > 1:
        raise BIDSError(
            f"{derivatives_dir}: feature tables of several atlases or resolutions "
            f"({', '.join(_describe_key(k) for k in keys)}); choose one with --atlas/--res"
        )
    return groups[keys[0]]


def _describe_key(key: tuple[str | None, str | None, str | None]) -> str:
    space, atlas, res = key
    parts = [f"space-{space}" if space else "", f"atlas-{atlas}" if atlas else "no atlas"]
    parts.append(f"res-{res}" if res else "")
    return " ".join(p for p in parts if p)
