"""Writing fednipype's BIDS derivatives: output paths, entities of source files, the description.

The reading side (pybids queries of raw and derivative datasets) is :mod:`fednipype.bids`.
Derivatives can be recomputed, so they are written atomically (a rename keeps them whole) but
without an ``fsync``, and only when their content changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from fednipype import __version__
from fednipype.exceptions import BIDSError
from fednipype.io import atomic_write_bytes, atomic_write_json

PIPELINE_NAME = "fednipype"
BIDS_VERSION = "1.9.0"
#: ``desc-`` entity and suffix of the regional-feature tables (``…_desc-regional_features``).
FEATURES_DESC = "regional"
FEATURES_SUFFIX = "features"


def _normalise_label(label: str) -> str:
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


def derivative_path(
    subject: str,
    session: str | None = None,
    *,
    desc: str,
    suffix: str,
    extension: str,
    datatype: str = "anat",
    space: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """BIDS-derivative path of an output, built with pybids' path patterns.

    The path is relative unless ``output_dir`` is given, in which case it is joined to it.

    Examples
    --------
    >>> str(derivative_path("01", "2", desc="regional", suffix="features", extension=".tsv"))
    'sub-01/ses-2/anat/sub-01_ses-2_desc-regional_features.tsv'
    >>> str(derivative_path("sub-03", desc="regional", suffix="features", extension=".json"))
    'sub-03/anat/sub-03_desc-regional_features.json'
    """
    from bids.layout.writing import build_path  # pybids takes ~0.4 s to import

    entities = {
        "subject": _normalise_label(subject),
        "desc": desc,
        "suffix": suffix,
        "extension": extension,
        "datatype": datatype,
    }
    if session is not None:
        entities["session"] = session
    if space is not None:
        entities["space"] = space
    pattern = (
        "sub-{subject}[/ses-{session}]/{datatype}/sub-{subject}[_ses-{session}]"
        "[_space-{space}]_desc-{desc}_{suffix}{extension}"
    )
    built = build_path(entities, [pattern], strict=True)
    if built is None:
        raise BIDSError(f"cannot build a derivative path from entities {entities}")
    return Path(output_dir) / built if output_dir is not None else Path(built)


def source_entities(source_file: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Subject and session of a source file, read from its BIDS path (file name and folders).

    Parameters
    ----------
    source_file : path-like
        The input an output derives from, e.g. ``sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz``.

    Returns
    -------
    tuple of (str, str or None)
        Subject label without ``sub-``; session label, or ``None`` when there is none.

    Raises
    ------
    BIDSError
        If the path holds no ``sub-<label>`` entity.

    Examples
    --------
    >>> source_entities("sub-01_ses-2_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz")
    ('01', '2')
    >>> source_entities("derivatives/sub-03/anat/sub-03_T1w.nii.gz")
    ('03', None)
    """
    from bids.layout import parse_file_entities  # pybids takes ~0.4 s to import

    # pybids finds ``sub-`` after a path separator: a bare file name needs one in front.
    entities = parse_file_entities(str(Path(os.sep) / Path(source_file)))
    subject = entities.get("subject")
    if not subject:
        raise BIDSError(
            f"{source_file}: no 'sub-<label>' entity in the source file's name; the derivative "
            "is named after the source file (a BIDS file of the subject)"
        )
    return str(subject), (str(entities["session"]) if entities.get("session") else None)


def write_if_changed(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` atomically unless ``path`` already holds exactly it (keeps its mtime).

    Derivatives can be recomputed: the rename keeps them whole without an ``fsync``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    return atomic_write_bytes(path, data, durable=False)


def _pipelines_of(path: Path) -> list:
    """Names in the ``GeneratedBy`` of an existing ``dataset_description.json``."""
    try:
        existing = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BIDSError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(existing, dict):
        raise BIDSError(f"{path}: expected a JSON object, got {type(existing).__name__}")
    return [g.get("Name") for g in existing.get("GeneratedBy", []) if isinstance(g, dict)]


def write_derivative_description(
    output_dir: str | os.PathLike[str], source_datasets: Sequence[str] = ()
) -> Path:
    """Write (atomically) the ``dataset_description.json`` of fednipype's derivatives.

    Parameters
    ----------
    output_dir : path-like
        Root of the derivative dataset.
    source_datasets : sequence of str
        URLs or DOIs of the input datasets (``SourceDatasets``).

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    BIDSError
        ``output_dir`` already holds another pipeline's derivative dataset.
    """
    path = Path(output_dir) / "dataset_description.json"
    if path.exists():
        names = _pipelines_of(path)
        if PIPELINE_NAME not in names:
            raise BIDSError(
                f"{path}: output folder already belongs to another dataset "
                f"(GeneratedBy {names or 'absent'}); choose an empty output folder"
            )
    description = {
        "Name": "fednipype regional features",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": PIPELINE_NAME,
                "Version": __version__,
            }
        ],
        "SourceDatasets": [{"URL": s} for s in source_datasets],
    }
    return atomic_write_json(path, description)
