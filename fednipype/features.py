"""Regional features of a 3-D image over a label atlas: voxel counts, volumes, means, SDs.

The participant-level computation of fednipype, as a pure library (no Nipype).  Given a 3-D
image (a tissue probability map such as a segmentation's ``label-GM_probseg`` or a T1w
intensity image) and a label atlas (an integer NIfTI image plus a BIDS-style ``dseg.tsv`` with
at least the columns ``index`` and ``name``), :func:`extract_features` computes for every atlas
region

``voxel_count``
    voxels of the region (inside the optional brain mask) whose value is finite;
``nan_count``
    voxels of the region whose value is NaN or ±inf: they are excluded from everything else;
``volume_mm3``
    for a probability map, the sum of the probabilities × the voxel volume; for an intensity
    image, ``voxel_count`` × the voxel volume;
``mean``, ``std``
    mean and population standard deviation (``ddof=0``) of the image values over the region's
    finite voxels.

A region with ``voxel_count`` 0 (absent from the image's field of view, masked out, or all
NaN) has ``n/a`` volume, mean and SD.  Whole-brain totals (the union of the atlas regions, and
the whole image) and provenance (atlas name and SHA-256, space, image kind, units) go into
the JSON sidecar written next to the TSV by :func:`write_features`; :func:`read_features` and
:func:`read_sidecar` read them back, validated.

The sidecar also records each region's largest possible ``volume_mm3`` on the grid the features
were computed on, ``Atlas.RegionMaxVolumeMm3``: the region's voxel count on that grid (the atlas
as resampled to it) × the voxel volume.  A probability is at most 1, so no image on that grid
can give a larger volume; the number depends on the atlas and the grid's geometry only, never
on the image's values, so it is public and can bound a DP release
(:func:`~fednipype.grids.atlas_max_volumes` computes it from an atlas and a grid alone,
:func:`read_atlas_max_volumes` reads it back; ``[bounds.features] default = "atlas"`` in the
site policy).

Images are read and checked by :mod:`fednipype.images`; the atlas is put on the image's grid
(resampled by nearest neighbour, cached per grid) by :mod:`fednipype.grids`, whose
:func:`~fednipype.grids.warm_atlas_cache` is importable from here too; the per-region
statistics are bincounts over the labelled voxels only (:mod:`fednipype.reductions`, which
describes the memory model).

Validation
----------
Every problem is an :class:`~fednipype.exceptions.ImageError` naming the file: the image
checks of :mod:`fednipype.images` (missing, zero-byte, truncated or non-NIfTI files, images
that are not 3-D, all-NaN images, probabilities outside [0, 1]), the grid and space checks of
:mod:`fednipype.grids`, an atlas without any label, grids that do not overlap (no atlas
region in the image's field of view), and atlas labels absent from the ``dseg.tsv``.  The
reverse, rows of the ``dseg.tsv`` whose label the atlas image lacks, is only logged as a
warning: those regions get ``voxel_count`` 0 and ``n/a`` values, so tables keep one row per
``dseg.tsv`` row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fednipype import __version__
from fednipype.atlas import Atlas, default_atlas
from fednipype.bids import collect_images, get_subjects, load_layout
from fednipype.derivatives import derivative_path, write_derivative_description
from fednipype.exceptions import BIDSError, ImageError
from fednipype.grids import (
    atlas_grid,
    atlas_label_values,
    mask_on_grid,
    read_label_table,
    region_max_volumes,
    resolve_space,
    warm_atlas_cache,
)
from fednipype.images import (
    bids_entities,
    check_values,
    file_sha256,
    fortran_flat,
    open_image,
    read_voxels,
)
from fednipype.io import atomic_write_json, atomic_write_text
from fednipype.reductions import gather_values, regional_statistics

__all__ = [
    "ATLAS_MAX_VOLUME",
    "FEATURE_COLUMNS",
    "IMAGE_KINDS",
    "FeatureResult",
    "extract_dataset_features",
    "extract_features",
    "read_atlas_max_volumes",
    "read_features",
    "read_sidecar",
    "warm_atlas_cache",
    "write_features",
]

LOGGER = logging.getLogger(__name__)

#: Columns of a regional features TSV, in order.
FEATURE_COLUMNS: tuple[str, ...] = (
    "index",
    "name",
    "voxel_count",
    "nan_count",
    "volume_mm3",
    "mean",
    "std",
)
#: Kinds of images :func:`extract_features` accepts.
IMAGE_KINDS: tuple[str, ...] = ("probseg", "intensity")

_VALUE_UNITS = {"probseg": "probability", "intensity": "arbitrary"}
#: Key of the sidecar's ``Atlas`` block: region name → largest possible ``volume_mm3`` on the
#: features' grid (the region's voxels on that grid × the voxel volume).
ATLAS_MAX_VOLUME = "RegionMaxVolumeMm3"


@dataclass
class FeatureResult:
    """Regional features of one image.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per atlas region with the columns :data:`FEATURE_COLUMNS`.
    sidecar : dict
        JSON sidecar content: column descriptions, whole-brain totals and provenance.
    """

    table: pd.DataFrame
    sidecar: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The computation
# ---------------------------------------------------------------------------------------------


def extract_features(
    in_file: str | os.PathLike[str],
    atlas_file: str | os.PathLike[str],
    atlas_labels: str | os.PathLike[str],
    *,
    image_kind: str = "probseg",
    mask_file: str | os.PathLike[str] | None = None,
    atlas_name: str | None = None,
    atlas_space: str | None = None,
    image_space: str | None = None,
) -> FeatureResult:
    """Compute regional features of a 3-D image over a label atlas.

    Parameters
    ----------
    in_file : path-like
        3-D NIfTI image (a 4-D image with a single volume is squeezed to 3-D).
    atlas_file : path-like
        Integer label NIfTI image in the same space (0 is background).
    atlas_labels : path-like
        BIDS-style ``dseg.tsv`` with the columns ``index`` and ``name``.  Every label of the
        atlas image must have a row; rows whose label is absent from the atlas image (or from
        the image's field of view) give ``voxel_count`` 0 and ``n/a`` values, with a warning.
    image_kind : {"probseg", "intensity"}
        ``probseg``: values are probabilities in [0, 1] (±
        :data:`~fednipype.images.PROBABILITY_TOLERANCE`); the volume is the sum of
        probabilities × voxel volume.  ``intensity``: the volume is the voxel count × voxel
        volume.
    mask_file : path-like, optional
        Brain mask (nonzero = inside) on the image's grid or on another grid of the same space
        (resampled by nearest neighbour).  Voxels outside it are ignored.
    atlas_name : str, optional
        Name recorded in the provenance; defaults to the ``atlas-`` entity of ``atlas_file``
        (or its file name).
    atlas_space, image_space : str, optional
        Template spaces; default to the ``tpl-``/``space-`` entity of ``atlas_file`` and the
        ``space-`` entity of ``in_file``.  When both are known they must agree.

    Returns
    -------
    FeatureResult
        ``table`` with one row per ``dseg.tsv`` row and the columns :data:`FEATURE_COLUMNS`;
        ``sidecar`` with column descriptions, ``Totals`` and provenance.

    Raises
    ------
    ImageError
        For unreadable, empty, truncated or non-NIfTI files, images that are not 3-D, all-NaN
        images, probabilities outside [0, 1], atlas labels missing from the table, spaces that
        differ, or grids that are oblique or do not overlap; the message names the file.
    """
    in_file, atlas_file, atlas_labels = Path(in_file), Path(atlas_file), Path(atlas_labels)
    if image_kind not in IMAGE_KINDS:
        raise ValueError(f"image_kind: expected one of {IMAGE_KINDS}, got {image_kind!r}")
    space = resolve_space(in_file, atlas_file, image_space, atlas_space)
    table = read_label_table(atlas_labels)

    img = open_image(in_file, "image")
    shape, affine = tuple(img.shape[:3]), img.affine
    # The atlas first (cached after the first image): its one-off transients do not add to
    # the image's array in memory.
    grid = atlas_grid(atlas_file, shape, affine, image_name=str(in_file))
    raw, slope, inter = read_voxels(img, in_file, "image")
    check_values(in_file, raw, slope, inter, probabilities=image_kind == "probseg")

    present = atlas_label_values(atlas_file)
    if present.size == 0:
        raise ImageError(f"{atlas_file}: the atlas image has no label > 0")
    if grid.labels.size == 0:
        raise ImageError(
            f"{in_file} and {atlas_file}: no atlas region lies inside the image's field of "
            "view; the grids do not overlap (is the image in the atlas's space?)"
        )
    unknown = np.setdiff1d(present, table["index"].to_numpy())
    if unknown.size:
        raise ImageError(
            f"{atlas_file}: atlas image has labels {unknown.tolist()[:20]} absent from the "
            f"label table {atlas_labels}"
        )
    n_labels = max(int(present.max()), int(table["index"].max())) + 1
    missing = np.setdiff1d(table["index"].to_numpy(), present)
    if missing.size:
        LOGGER.warning(
            "%s: %d label(s) of the table are absent from the atlas image %s (voxel_count 0, "
            "n/a values): %s",
            atlas_labels,
            missing.size,
            atlas_file,
            missing.tolist()[:20],
        )

    index, region_labels = grid.index, grid.labels
    mask = None
    if mask_file is not None:
        mask = mask_on_grid(Path(mask_file), shape, affine, str(in_file))
        keep = fortran_flat(mask)[index]
        index, region_labels = index[keep], region_labels[keep]
    values = gather_values(raw, index, slope, inter)
    counts = grid.counts if mask is None else None
    stats = regional_statistics(values, region_labels, n_labels, label_counts=counts)

    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    index = table["index"].to_numpy()
    count = stats["count"][index]
    if image_kind == "probseg":
        volume = stats["sum"][index] * voxel_mm3
    else:
        volume = count * voxel_mm3
    empty = count == 0
    out = pd.DataFrame(
        {
            "index": index,
            "name": table["name"].to_numpy(),
            "voxel_count": count,
            "nan_count": stats["nan_count"][index],
            "volume_mm3": np.where(empty, np.nan, volume),
            "mean": np.where(empty, np.nan, stats["mean"][index]),
            "std": np.where(empty, np.nan, stats["std"][index]),
        },
        columns=list(FEATURE_COLUMNS),
    )
    if empty.any():
        absent = out.loc[empty, "name"].tolist()
        LOGGER.warning(
            "%s: %d atlas region(s) have no valid voxel on the image grid (voxel_count 0, "
            "n/a values): %s",
            in_file,
            len(absent),
            ", ".join(absent[:10]) + (" …" if len(absent) > 10 else ""),
        )

    totals = _totals(stats, raw, mask, slope, inter, voxel_mm3, image_kind)
    sidecar = _sidecar(
        in_file=in_file,
        atlas_file=atlas_file,
        atlas_labels=atlas_labels,
        atlas_name=atlas_name,
        space=space,
        image_kind=image_kind,
        mask_file=mask_file,
        voxel_mm3=voxel_mm3,
        zooms=np.linalg.norm(affine[:3, :3], axis=0),
        resampled=grid.resampled,
        totals=totals,
        max_volumes=region_max_volumes(table, grid.counts, voxel_mm3),
    )
    return FeatureResult(table=out, sidecar=sidecar)


def _totals(
    stats: dict[str, np.ndarray],
    raw: np.ndarray,
    mask: np.ndarray | None,
    slope: float,
    inter: float,
    voxel_mm3: float,
    image_kind: str,
) -> dict[str, Any]:
    """Whole-brain totals: over the union of the atlas regions, and over the whole image."""
    count = int(stats["count"][1:].sum())
    nan_count = int(stats["nan_count"][1:].sum())
    total = float(stats["sum"][1:].sum())
    mean = total / count if count else None
    std = None
    if count:
        # Pooled SD from the per-region ones: SS = sum_r [SS_r + n_r (mean_r - mean)^2].
        n_r = stats["count"][1:]
        has = n_r > 0
        between = n_r[has] * (stats["mean"][1:][has] - mean) ** 2
        std = float(np.sqrt((stats["sum_sq_dev"][1:][has].sum() + between.sum()) / count))
    brain = {
        "voxel_count": count,
        "nan_count": nan_count,
        "volume_mm3": (total if image_kind == "probseg" else count) * voxel_mm3,
        "mean": mean,
        "std": std,
    }
    # Whole image (inside the mask if any): reductions in the stored dtype, buffered casts to
    # float64, no full-size float64 copy.  Fast path: a finite sum means no NaN/inf voxel.
    raw_sum = float(np.sum(raw, dtype=np.float64, where=mask if mask is not None else True))
    total_voxels = int(np.count_nonzero(mask)) if mask is not None else int(raw.size)
    image_count = total_voxels
    if raw.dtype.kind == "f" and not np.isfinite(raw_sum):
        finite = np.isfinite(raw)
        if mask is not None:
            finite &= mask
        image_count = int(np.count_nonzero(finite))
        raw_sum = float(np.sum(raw, dtype=np.float64, where=finite))
        del finite
    image_sum = raw_sum * slope + inter * image_count
    image = {
        "voxel_count": image_count,
        "nan_count": total_voxels - image_count,
        "volume_mm3": (image_sum if image_kind == "probseg" else image_count) * voxel_mm3,
        "mean": image_sum / image_count if image_count else None,
    }
    return {"AtlasRegions": brain, "Image": image}


def _sidecar(
    *,
    in_file: Path,
    atlas_file: Path,
    atlas_labels: Path,
    atlas_name: str | None,
    space: str | None,
    image_kind: str,
    mask_file: str | os.PathLike[str] | None,
    voxel_mm3: float,
    zooms: np.ndarray,
    resampled: bool,
    totals: dict[str, Any],
    max_volumes: dict[str, float],
) -> dict[str, Any]:
    value_units = _VALUE_UNITS[image_kind]
    name = atlas_name or bids_entities(atlas_file).get("atlas") or atlas_file.name.split(".")[0]
    return {
        "Description": "Regional features of an image over a label atlas (fednipype).",
        "index": {"Description": "Atlas label value (dseg.tsv 'index')"},
        "name": {"Description": "Atlas region name (dseg.tsv 'name')"},
        "voxel_count": {
            "Description": "Voxels of the region with a finite value (inside the mask if any)"
        },
        "nan_count": {
            "Description": "Voxels of the region whose value is NaN or infinite (excluded)"
        },
        "volume_mm3": {
            "Description": (
                "Sum of probabilities x voxel volume"
                if image_kind == "probseg"
                else "Voxel count x voxel volume"
            ),
            "Units": "mm3",
        },
        "mean": {"Description": "Mean of the image values over the region", "Units": value_units},
        "std": {
            "Description": "Population standard deviation (ddof=0) of the image values",
            "Units": value_units,
        },
        "Units": "mm3",
        "ValueUnits": value_units,
        "StdDdof": 0,
        "ImageKind": image_kind,
        "Space": space,
        "Source": in_file.name,
        "Mask": Path(mask_file).name if mask_file is not None else None,
        "VoxelSizeMm": [round(float(z), 6) for z in zooms],
        "VoxelVolumeMm3": voxel_mm3,
        "Atlas": {
            "Name": name,
            "Image": atlas_file.name,
            "ImageSha256": file_sha256(atlas_file),
            "Labels": atlas_labels.name,
            "LabelsSha256": file_sha256(atlas_labels),
            "Space": space,
            "ResampledToImageGrid": resampled,
            "Interpolation": "nearest" if resampled else None,
            ATLAS_MAX_VOLUME: max_volumes,
        },
        "Totals": totals,
        "GeneratedBy": [{"Name": "fednipype", "Version": __version__}],
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_features(
    result: FeatureResult,
    out_tsv: str | os.PathLike[str],
    out_json: str | os.PathLike[str] | None = None,
    *,
    durable: bool = False,
) -> tuple[Path, Path]:
    """Write the features TSV (``n/a`` for missing) and its JSON sidecar, atomically.

    Parameters
    ----------
    result : FeatureResult
        Output of :func:`extract_features`.
    out_tsv : path-like
        Destination of the table.
    out_json : path-like, optional
        Destination of the sidecar; defaults to ``out_tsv`` with the ``.json`` extension.
    durable : bool
        Also ``fsync`` the files (see :func:`fednipype.io.atomic_write`).  Off by default:
        features can be recomputed, and the temporary-file-and-rename already keeps them
        whole when a process dies; the two flushes per file were a third of a small subject's
        cost.

    Returns
    -------
    tuple of pathlib.Path
        The TSV and JSON paths.
    """
    out_tsv = Path(out_tsv)
    if out_json is None:
        out_json = out_tsv.with_name(out_tsv.name.removesuffix(".tsv") + ".json")
    text = result.table.to_csv(
        sep="\t", index=False, na_rep="n/a", float_format="%.12g", lineterminator="\n"
    )
    atomic_write_text(out_tsv, text, durable=durable)
    atomic_write_json(out_json, result.sidecar, durable=durable)
    return out_tsv, Path(out_json)


def read_features(tsv: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a regional features TSV written by :func:`write_features`.

    Parameters
    ----------
    tsv : path-like
        Table with exactly the columns :data:`FEATURE_COLUMNS` (in any order); ``n/a`` is
        missing.

    Returns
    -------
    pandas.DataFrame
        Columns in :data:`FEATURE_COLUMNS` order: ``index``, ``voxel_count``, ``nan_count``
        as int64, ``name`` as str, ``volume_mm3``, ``mean``, ``std`` as float64 (NaN for
        ``n/a``).

    Raises
    ------
    BIDSError
        If the file is missing or empty, a column is missing or unexpected, or a value has the
        wrong type; the message names the file and the column.
    """
    tsv = Path(tsv)
    if not tsv.is_file() or tsv.stat().st_size == 0:
        raise BIDSError(f"{tsv}: features table does not exist or is empty")
    try:
        df = pd.read_csv(
            tsv, sep="\t", dtype={"name": str}, na_values=["n/a"], keep_default_na=False
        )
    except Exception as exc:
        raise BIDSError(f"{tsv}: cannot read the features table ({exc})") from exc
    missing = [c for c in FEATURE_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in FEATURE_COLUMNS]
    if missing or extra:
        raise BIDSError(
            f"{tsv}: features table columns: missing {missing}, unexpected {extra}; expected "
            f"{list(FEATURE_COLUMNS)}"
        )
    df = df[list(FEATURE_COLUMNS)].copy()
    for column in ("index", "voxel_count", "nan_count"):
        values = pd.to_numeric(df[column], errors="coerce")
        if values.isna().any() or (values != np.round(values)).any() or (values < 0).any():
            raise BIDSError(f"{tsv}: column '{column}' must hold non-negative integers")
        df[column] = values.astype(np.int64)
    if df["index"].duplicated().any():
        raise BIDSError(f"{tsv}: column 'index' has duplicated values")
    for column in ("volume_mm3", "mean", "std"):
        values = pd.to_numeric(df[column], errors="coerce")
        if (values.isna() & df[column].notna()).any():
            raise BIDSError(f"{tsv}: column '{column}' must hold numbers or n/a")
        df[column] = values.astype(np.float64)
    if df["name"].isna().any():
        raise BIDSError(f"{tsv}: column 'name' has empty values")
    df["name"] = df["name"].astype(str)
    return df


def read_sidecar(tsv: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the JSON sidecar of a features TSV (same name with ``.json``)."""
    tsv = Path(tsv)
    path = tsv.with_name(tsv.name.removesuffix(".tsv") + ".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BIDSError(f"{path}: cannot read the features sidecar ({exc})") from exc


def read_atlas_max_volumes(tsvs: Sequence[str | os.PathLike[str]]) -> dict[str, float]:
    """The largest possible ``volume_mm3`` of each region over several features' sidecars.

    When the files were computed on different grids their maxima differ; the largest per
    region bounds every file (each maximum is public, so is the largest).

    Parameters
    ----------
    tsvs : sequence of path-like
        Features TSVs; their sidecars' ``Atlas.RegionMaxVolumeMm3`` is read.

    Returns
    -------
    dict
        Region name → largest maximum, for the regions every sidecar records; empty when a
        sidecar lacks the field (features written before it was recorded): no atlas bound is
        then known.

    Raises
    ------
    BIDSError
        If a sidecar cannot be read or its field is not a table of non-negative numbers.
    """
    largest: dict[str, float] | None = None
    for tsv in tsvs:
        recorded = (read_sidecar(tsv).get("Atlas") or {}).get(ATLAS_MAX_VOLUME)
        if recorded is None:
            return {}
        if not isinstance(recorded, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < np.inf
            for v in recorded.values()
        ):
            raise BIDSError(
                f"{tsv}: sidecar field Atlas.{ATLAS_MAX_VOLUME}: expected region name → "
                "non-negative number (mm3)"
            )
        if largest is None:
            largest = {str(k): float(v) for k, v in recorded.items()}
        else:
            largest = {k: max(v, float(recorded[k])) for k, v in largest.items() if k in recorded}
    return largest or {}


def extract_dataset_features(
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    atlas: Atlas | None = None,
    participant_label: list[str] | None = None,
    space: str = "MNI152NLin2009cAsym",
    label: str = "GM",
) -> list[Path]:
    """The participant level without Nipype: features of every probability map of a dataset.

    A plain loop for scripts, benchmarks and tests; pipelines use
    :func:`fednipype.workflows.participant.init_participant_wf`, which writes the same files
    (and keeps going when one subject fails, which this loop does not).

    Parameters
    ----------
    bids_dir : path-like
        BIDS dataset with ``…_space-<space>_label-<label>_probseg`` maps in its derivatives.
    output_dir : path-like
        Root of the derivative dataset to write.
    atlas : fednipype.atlas.Atlas, optional
        Label atlas (default: fednipype's 2 mm default atlas).
    participant_label : list of str, optional
        Subjects to process (default: all).
    space, label : str
        Entities of the probability maps.

    Returns
    -------
    list of pathlib.Path
        The ``sub-X[_ses-Y]_desc-regional_features.tsv`` files written.
    """
    atlas = atlas or default_atlas(2)
    layout = load_layout(bids_dir)
    records = collect_images(
        layout, get_subjects(layout, participant_label), kind="probseg", label=label, space=space
    )
    written = []
    for record in records:
        result = extract_features(
            record.path,
            atlas.image,
            atlas.labels,
            atlas_name=atlas.name,
            atlas_space=atlas.space,
            image_space=space,
        )
        tsv = derivative_path(
            record.subject,
            record.session,
            desc="regional",
            suffix="features",
            extension=".tsv",
            output_dir=output_dir,
        )
        written.append(write_features(result, tsv)[0])
    write_derivative_description(output_dir, [Path(bids_dir).absolute().as_uri()])
    return written
