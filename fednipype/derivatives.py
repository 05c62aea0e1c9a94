"""Writing fednipype's BIDS derivatives: output paths, entities of source files, the description.

The reading side (pybids queries of raw and derivative datasets) is :mod:`fednipype.bids`.
Derivatives can be recomputed, so they are written atomically (a rename keeps them whole) but
without an ``fsync``, and only when their content changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from fednipype import __version__
from fednipype.exceptions import BIDSError
from fednipype.io import atomic_write_bytes

PIPELINE_NAME = "fednipype"
BIDS_VERSION = "1.9.0"
#: ``desc-`` entity and suffix of the regional-feature tables (``…_desc-regional_features``).
FEATURES_DESC = "regional"
FEATURES_SUFFIX = "features"


def _normalise_label(label: str) -> str:
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


def atlas_entity(name: str) -> str:
    """The ``atlas-`` entity value of an atlas name (letters and digits only).

    >>> atlas_entity("fednipype"), atlas_entity("Schaefer2018_100Parcels"), atlas_entity("_")
    ('fednipype', 'Schaefer2018100Parcels', 'custom')
    """
    return "".join(c for c in str(name) if c.isascii() and c.isalnum()) or "custom"


def derivative_path(
    subject: str,
    session: str | None = None,
    *,
    desc: str,
    suffix: str,
    extension: str,
    datatype: str = "anat",
    space: str | None = None,
    atlas: str | None = None,
    res: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """BIDS-derivative path of an output, built with pybids' path patterns.

    Entities go in BIDS order (``sub``, ``ses``, ``space``, ``atlas``, ``res``, ``desc``).
    The path is relative unless ``output_dir`` is given, in which case it is joined to it.

    Examples
    --------
    >>> str(derivative_path("01", "2", desc="regional", suffix="features", extension=".tsv"))
    'sub-01/ses-2/anat/sub-01_ses-2_desc-regional_features.tsv'
    >>> str(derivative_path("sub-03", desc="regional", suffix="features", extension=".json",
    ...                     space="MNI152NLin2009cAsym", atlas="fednipype", res="2"))
    'sub-03/anat/sub-03_space-MNI152NLin2009cAsym_atlas-fednipype_res-2_desc-regional_features.json'
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
    for key, value in (("space", space), ("atlas", atlas), ("res", res)):
        if value is not None:
            entities[key] = value
    pattern = (
        "sub-{subject}[/ses-{session}]/{datatype}/sub-{subject}[_ses-{session}]"
        "[_space-{space}][_atlas-{atlas}][_res-{res}]_desc-{desc}_{suffix}{extension}"
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


#: Files of the derivative dataset that BIDS has no place for (``.bidsignore``).
BIDSIGNORE = """\
# Written by fednipype. BIDS has no suffix for region-wise feature tables yet:
*_features.tsv
*_features.json
# The site report (HTML and its figures):
*.html
figures
"""

README = """\
# fednipype regional features

A BIDS derivative dataset written by fednipype's participant level: for each subject (and
session), the regional features of a tissue probability map over a label atlas,

    sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_space-<space>_atlas-<atlas>
        [_res-<res>]_desc-regional_features.tsv (+ .json sidecar)

one row per atlas region (voxel count, volume in mm3, mean and SD of the map), with the
atlas's provenance (name, SHA-256) and whole-brain totals in the sidecar. BIDS has no suffix
for such tables yet, so `.bidsignore` lists them.

These features are private: they stay at the site. What leaves a site is a differentially
private release made by the group level, written outside this dataset.
"""


def container_info() -> dict[str, str]:
    """``GeneratedBy.Container`` when running in a container, else ``{}``.

    Docker is recognised by ``/.dockerenv``, Apptainer/Singularity by their environment;
    ``FEDNIPYPE_CONTAINER_TAG`` (e.g. set by the image) gives the tag.  No machine path is
    recorded.
    """
    kind = None
    if os.environ.get("APPTAINER_CONTAINER"):
        kind = "apptainer"
    elif os.environ.get("SINGULARITY_CONTAINER"):
        kind = "singularity"
    elif Path("/.dockerenv").exists():
        kind = "docker"
    if kind is None:
        return {}
    info = {"Type": kind}
    if os.environ.get("FEDNIPYPE_CONTAINER_TAG"):
        info["Tag"] = os.environ["FEDNIPYPE_CONTAINER_TAG"]
    return info


def code_url() -> str | None:
    """The project's URL from the installed package's metadata, if it declares one."""
    try:
        meta = metadata.metadata(PIPELINE_NAME)
    except metadata.PackageNotFoundError:
        return None
    for entry in meta.get_all("Project-URL") or []:
        url = entry.split(",", 1)[-1].strip()
        if url.startswith(("https://", "http://")):
            return url
    home = meta.get("Home-page")
    return home if home and home.startswith(("https://", "http://")) else None


def describe_source(
    bids_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], name: str = "raw"
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """``SourceDatasets`` and ``DatasetLinks`` for a derivative of ``bids_dir``, no machine path.

    The input's DOI (its ``DatasetDOI``) when it declares one; otherwise the BIDS URI
    ``bids:<name>:`` with ``DatasetLinks.<name>`` the input's path relative to ``output_dir``
    (which survives moving both folders together) when the two are siblings or nested; far
    apart, no link (it would spell out a machine path).

    Examples
    --------
    >>> describe_source("/data/siteA", "/data/siteA-fednipype")
    ([{'URL': 'bids:raw:'}], {'raw': '../siteA'})
    >>> describe_source("/data/siteA", "/scratch/out/siteA")
    ([{'URL': 'bids:raw:'}], {})
    """
    bids_dir, output_dir = Path(bids_dir).absolute(), Path(output_dir).absolute()
    doi = None
    try:
        description = json.loads(
            (bids_dir / "dataset_description.json").read_text(encoding="utf-8-sig")
        )
        if isinstance(description, dict) and isinstance(description.get("DatasetDOI"), str):
            doi = description["DatasetDOI"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    if doi:
        return [{"DOI": doi}], {}
    relative = Path(os.path.relpath(bids_dir, output_dir)).as_posix()
    if relative.startswith("../../"):  # far apart: the link would spell out a machine path
        return [{"URL": f"bids:{name}:"}], {}
    return [{"URL": f"bids:{name}:"}], {name: relative}


def write_derivative_description(
    output_dir: str | os.PathLike[str],
    source_datasets: Sequence[str | Mapping[str, str]] = (),
    *,
    dataset_links: Mapping[str, str] | None = None,
) -> Path:
    """Write the root files of fednipype's derivative dataset (atomically, when changed).

    ``dataset_description.json`` (``DatasetType: derivative``; ``GeneratedBy`` with the
    version, and ``CodeURL``/``Container`` where known), a ``README.md`` and a
    ``.bidsignore`` for the files BIDS has no place for (:data:`BIDSIGNORE`).

    Parameters
    ----------
    output_dir : path-like
        Root of the derivative dataset.
    source_datasets : sequence of str or mapping
        ``SourceDatasets``: a string is a URL (or a BIDS URI), a mapping is written as is
        (``DOI``, ``URL``, ``Version``); see :func:`describe_source`.
    dataset_links : mapping, optional
        ``DatasetLinks`` (names used in BIDS URIs → locations).

    Returns
    -------
    pathlib.Path
        The ``dataset_description.json`` written.

    Raises
    ------
    BIDSError
        ``output_dir`` already holds another pipeline's derivative dataset.
    """
    root = Path(output_dir)
    path = root / "dataset_description.json"
    if path.exists():
        names = _pipelines_of(path)
        if PIPELINE_NAME not in names:
            raise BIDSError(
                f"{path}: output folder already belongs to another dataset "
                f"(GeneratedBy {names or 'absent'}); choose an empty output folder"
            )
    generated: dict[str, object] = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "Description": "Regional features of tissue probability maps over a label atlas",
    }
    url = code_url()
    if url:
        generated["CodeURL"] = url
    container = container_info()
    if container:
        generated["Container"] = container
    description: dict[str, object] = {
        "Name": "fednipype regional features",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": s} if isinstance(s, str) else dict(s) for s in source_datasets],
    }
    if dataset_links:
        description["DatasetLinks"] = dict(dataset_links)
    text = json.dumps(description, indent=2) + "\n"
    write_if_changed(path, text.encode("utf-8"))
    write_if_changed(root / "README.md", README.encode("utf-8"))
    write_if_changed(root / ".bidsignore", BIDSIGNORE.encode("utf-8"))
    return path
