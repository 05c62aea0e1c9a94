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
the JSON sidecar written next to the TSV by :func:`write_features`.

Grids and spaces
----------------
The image must already be in the atlas's template space.  On the same grid the atlas is used
as is; on a different grid of the same space it is resampled to the image's grid by nearest
neighbour (:func:`nibabel.processing.resample_from_to` with ``order=0``), once per grid: the
result is cached for the life of the process.  Grids whose axes differ only by permutations
and flips (e.g. LAS vs RAS storage) are compatible, since resampling works in world
coordinates.  An oblique grid relative to the atlas (a native-space image), grids that do not
overlap, or an explicit space mismatch (the image's ``space-`` entity or argument vs the
atlas's ``tpl-``/``space-`` entity or argument) raise :class:`~fednipype.exceptions.ImageError`.

Validation
----------
Every problem is an :class:`~fednipype.exceptions.ImageError` naming the file: a missing,
zero-byte, truncated or non-NIfTI file (e.g. an HTML page saved as ``.nii.gz``); an image that
is not 3-D (a 4-D image whose 4th dimension is 1 is squeezed to 3-D and accepted); an image
whose every voxel is NaN; a probability map with values outside [0, 1] by more than
:data:`PROBABILITY_TOLERANCE`; atlas labels absent from the ``dseg.tsv``.  The reverse, rows of
the ``dseg.tsv`` whose label the atlas image lacks, is only logged as a warning: those regions
get ``voxel_count`` 0 and ``n/a`` values, so tables keep one row per ``dseg.tsv`` row.

Memory and speed
----------------
The image is read in its stored dtype; only the voxels inside an atlas region are gathered
(at cached, ascending Fortran-order positions) and converted to float64 with the file's
scaling; every per-region statistic is an ``np.bincount`` over them, in chunks of
:data:`CHUNK_VOXELS` that bound the temporaries.  No Python loop runs over regions or voxels,
and no full-size float64 copy of the image is made.  Peak traced memory is about 1.2x the
image's float64 array for an atlas covering 15 % of the grid (bench/features.py) and stays
below 3x for a float32 image whose every voxel is labelled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
import pandas as pd

from fednipype.exceptions import BIDSError, ImageError
from fednipype.io import atomic_write_json, atomic_write_text

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
#: Probabilities may stray this far outside [0, 1] (interpolation round-off) before an error.
PROBABILITY_TOLERANCE = 1e-4
#: Largest deviation of the two grids' relative direction cosines from a signed permutation.
ORIENTATION_TOLERANCE = 1e-3
#: Voxels per chunk in the per-region reductions (bounds their temporaries to ~2 MB each).
CHUNK_VOXELS = 1 << 18
#: Largest difference (mm) between two affines' entries for the grids to count as the same.
AFFINE_TOLERANCE = 1e-4

_ENTITY = re.compile(r"(?:^|_)(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)")
_VALUE_UNITS = {"probseg": "probability", "intensity": "arbitrary"}


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


@dataclass(frozen=True)
class _Grid:
    """An atlas's labelled voxels on an image grid, as flat Fortran-order positions.

    NIfTI arrays are stored in Fortran order and nibabel returns them so; gathering the
    labelled voxels at ascending Fortran-order positions reads the image's memory
    sequentially (boolean indexing in C order would stride through it, ~10x slower).
    """

    shape: tuple[int, ...]
    index: np.ndarray  # ascending flat positions (order="F") of voxels with a label > 0
    labels: np.ndarray  # their labels, in the atlas's integer type
    counts: np.ndarray  # np.bincount(labels): voxels per label on this grid
    resampled: bool


# ---------------------------------------------------------------------------------------------
# Reading and validating images
# ---------------------------------------------------------------------------------------------


def bids_entities(path: str | os.PathLike[str]) -> dict[str, str]:
    """BIDS ``key-value`` entities of a file name (``tpl`` included, the suffix excluded).

    >>> bids_entities("sub-01_ses-1_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz")["space"]
    'MNI152NLin2009cAsym'
    """
    name = Path(path).name.split(".")[0]
    return {m["key"]: m["value"] for m in _ENTITY.finditer(name)}


def _file_key(path: Path) -> tuple[str, int, int]:
    """Identity of a file's current content for caches: resolved path, mtime, size."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _check_file(path: Path, role: str) -> None:
    if not path.is_file():
        raise ImageError(f"{path}: {role} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: {role} is an empty (zero-byte) file; expected a NIfTI image")


def _open(path: Path, role: str) -> nb.Nifti1Image:
    """Open a NIfTI image (header only) and check it is a 3-D image of numbers.

    A 4-D (5-D …) image whose extra dimensions are all 1 counts as 3-D.  Every failure is an
    ImageError naming the file.
    """
    _check_file(path, role)
    try:
        img = nb.load(path)
    except Exception as exc:  # nibabel raises many types for non-NIfTI or corrupt headers
        raise ImageError(
            f"{path}: cannot read the {role} as a NIfTI image ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(img, nb.Nifti1Image | nb.Nifti2Image):
        raise ImageError(
            f"{path}: the {role} is a {type(img).__name__}; expected a NIfTI-1/2 image"
        )
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise ImageError(
            f"{path}: the {role} has shape {shape}; expected a 3-D image (a 4-D image is "
            "accepted only with a single volume)"
        )
    if img.get_data_dtype().kind not in "buif":
        raise ImageError(
            f"{path}: the {role} has voxel type {img.get_data_dtype()}; expected integer or "
            "real values"
        )
    return img


def _read(img: nb.Nifti1Image, path: Path, role: str) -> tuple[np.ndarray, float, float]:
    """The voxel array in its stored dtype (squeezed to 3-D), and the file's slope and inter."""
    try:
        if nb.is_proxy(img.dataobj):
            raw = np.asarray(img.dataobj.get_unscaled())
            slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        else:  # in-memory images (not produced by nb.load, kept for completeness)
            raw, slope, inter = np.asarray(img.dataobj), 1.0, 0.0
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on truncated data
        raise ImageError(
            f"{path}: the {role}'s voxel data cannot be read; the file is truncated or "
            f"corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if raw.ndim > 3:
        raw = raw.reshape(raw.shape[:3])  # singleton 4th (5th…) dimensions: a view, no copy
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        raise ImageError(f"{path}: the {role} has invalid scaling slope={slope}, inter={inter}")
    return raw, slope, inter


def _load(path: Path, role: str) -> tuple[nb.Nifti1Image, np.ndarray, float, float]:
    """Open and read an image: ``(img, raw, slope, inter)``; see :func:`_open`, :func:`_read`."""
    img = _open(path, role)
    return (img, *_read(img, path, role))


def read_label_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a BIDS-style ``dseg.tsv`` label table.

    Parameters
    ----------
    path : path-like
        Tab-separated table with at least the columns ``index`` (positive integers, unique)
        and ``name``; other columns (``color``, ``hemisphere`` …) are ignored.  Quoted names
        are unquoted.

    Returns
    -------
    pandas.DataFrame
        Columns ``index`` (int64) and ``name`` (str), sorted by ``index``.

    Raises
    ------
    ImageError
        If the file is missing or malformed, naming the file and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: atlas label table does not exist")
    return _read_label_table_cached(*_file_key(path)).copy()


@lru_cache(maxsize=32)
def _read_label_table_cached(path_str: str, _mtime: int, _size: int) -> pd.DataFrame:
    path = Path(path_str)
    try:
        table = pd.read_csv(
            path, sep="\t", dtype={"name": str}, na_values=["n/a"], keep_default_na=False
        )
    except Exception as exc:  # EmptyDataError, ParserError, UnicodeDecodeError
        raise ImageError(f"{path}: cannot read the atlas label table ({exc})") from exc
    table.columns = [str(c).strip().lstrip("\ufeff") for c in table.columns]
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise ImageError(
            f"{path}: atlas label table lacks the column(s) {missing}; expected 'index' and "
            f"'name' (found {list(table.columns)})"
        )
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or (index != np.round(index)).any() or (index < 1).any():
        raise ImageError(f"{path}: column 'index' must hold positive integers")
    if index.duplicated().any():
        dup = sorted(index[index.duplicated()].astype(int).unique().tolist())
        raise ImageError(f"{path}: column 'index' has duplicated values {dup}")
    if table["name"].isna().any():
        raise ImageError(f"{path}: column 'name' has empty values")
    out = pd.DataFrame({"index": index.astype(np.int64), "name": table["name"].astype(str)})
    return out.sort_values("index", kind="stable").reset_index(drop=True)


@lru_cache(maxsize=32)
def _sha256_cached(path_str: str, _mtime: int, _size: int) -> str:
    digest = hashlib.sha256()
    with open(path_str, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (cached while the file's mtime and size are unchanged)."""
    return _sha256_cached(*_file_key(Path(path)))


# ---------------------------------------------------------------------------------------------
# Putting an atlas or a mask on the image's grid
# ---------------------------------------------------------------------------------------------


def _direction_cosines(affine: np.ndarray) -> np.ndarray:
    rzs = affine[:3, :3]
    return rzs / np.linalg.norm(rzs, axis=0)


def check_grids_compatible(
    image_affine: np.ndarray, other_affine: np.ndarray, *, image: str, other: str
) -> None:
    """Refuse grids whose axes are oblique to each other (different spaces).

    Two grids of the same template space differ by voxel size, field of view, and at most a
    permutation and flips of their axes.  A rotation beyond :data:`ORIENTATION_TOLERANCE`
    means the image is not in the atlas's space (e.g. a native-space image).

    Parameters
    ----------
    image_affine, other_affine : numpy.ndarray
        4 × 4 voxel-to-world affines.
    image, other : str
        File names used in the error message.

    Raises
    ------
    ImageError
        If the affines are singular or oblique to each other.
    """
    for aff, name in ((image_affine, image), (other_affine, other)):
        if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ImageError(f"{name}: the affine is singular or not finite:\n{aff}")
    relative = _direction_cosines(other_affine).T @ _direction_cosines(image_affine)
    nearest = np.round(relative)
    is_signed_permutation = np.array_equal(
        np.abs(nearest).sum(axis=0), np.ones(3)
    ) and np.array_equal(np.abs(nearest).sum(axis=1), np.ones(3))
    deviation = float(np.abs(relative - nearest).max())
    if not is_signed_permutation or deviation > ORIENTATION_TOLERANCE:
        raise ImageError(
            f"{image} and {other}: the grids are oblique to each other (direction cosines "
            f"differ by {deviation:.3g} from an axis permutation/flip; tolerance "
            f"{ORIENTATION_TOLERANCE}); the image is not in the atlas's space"
        )


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(
        affine_a, affine_b, rtol=0.0, atol=AFFINE_TOLERANCE
    )


def _labels_from_raw(path: Path, raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Integer labels from an atlas's stored array (float-stored labels must be integral)."""
    if raw.dtype.kind in "biu" and slope == 1.0 and inter == 0.0:
        labels = raw
    else:
        # Labels stored as floats or with scaling: rebuild the integers, then check them.
        values = raw.astype(np.float64) * slope + inter
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ImageError(f"{path}: atlas image values must be integers (labels)")
        labels = values.astype(np.int64)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ImageError(f"{path}: atlas image has negative labels")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    return labels


def _flat(array: np.ndarray) -> np.ndarray:
    """Flatten in Fortran order (NIfTI's on-disk order): a view of what nibabel returns."""
    return array.reshape(-1, order="F")


def _labelled_voxels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat (Fortran-order) positions of the labelled voxels, ascending, and their labels.

    Positions are int32 when the grid allows it and labels keep the atlas's (small) integer
    type: the cache costs 5 bytes per labelled voxel for a uint8 atlas, not 16.
    """
    flat = _flat(labels)
    index = np.flatnonzero(flat > 0)  # nonzero() on a bool array is ~4x faster than on ints
    if flat.size < np.iinfo(np.int32).max:
        index = index.astype(np.int32)
    return index, flat[index]


@dataclass(frozen=True)
class _AtlasImage:
    """An atlas image read once: labels, affine, labelled voxels and the labels present."""

    labels: np.ndarray
    affine: np.ndarray
    grid: _Grid
    present: np.ndarray  # sorted label values > 0 found in the image


@lru_cache(maxsize=8)
def _load_atlas_cached(path_str: str, _mtime: int, _size: int) -> _AtlasImage:
    path = Path(path_str)
    img, raw, slope, inter = _load(path, "atlas image")
    labels = _labels_from_raw(path, raw, slope, inter)
    labels.setflags(write=False)
    index, region_labels = _labelled_voxels(labels)
    counts = np.bincount(region_labels)
    present = np.flatnonzero(counts)
    grid = _Grid(labels.shape, index, region_labels, counts, resampled=False)
    return _AtlasImage(labels, img.affine.copy(), grid, present[present > 0])


@lru_cache(maxsize=16)
def _atlas_on_grid_cached(
    path_str: str, mtime: int, size: int, shape: tuple[int, ...], affine_bytes: bytes
) -> _Grid:
    """The atlas's labelled voxels on a grid (shape, affine); cached per atlas file and grid."""
    atlas = _load_atlas_cached(path_str, mtime, size)
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    if _same_grid(atlas.labels.shape, atlas.affine, shape, affine):
        return atlas.grid
    resampled = _resample_nearest(atlas.labels, atlas.affine, shape, affine)
    index, region_labels = _labelled_voxels(resampled)
    return _Grid(tuple(shape), index, region_labels, np.bincount(region_labels), resampled=True)


def _resample_nearest(
    data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray
) -> np.ndarray:
    from nibabel.processing import resample_from_to

    source = nb.Nifti1Image(data, affine)
    # order=0: nearest neighbour keeps labels intact; outside the source's field of view is 0.
    out = resample_from_to(source, (shape, target_affine), order=0, mode="constant", cval=0)
    return np.asarray(out.dataobj)


def atlas_on_grid(
    atlas_file: str | os.PathLike[str],
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    image_name: str = "image",
) -> tuple[np.ndarray, bool]:
    """Return the atlas's labels sampled on an image grid (nearest neighbour if needed).

    Parameters
    ----------
    atlas_file : path-like
        Integer label image (0 is background).
    shape : tuple of int
        The image grid's 3-D shape.
    affine : numpy.ndarray
        The image grid's 4 × 4 affine.
    image_name : str
        Name of the image, used in error messages.

    Returns
    -------
    labels : numpy.ndarray
        Integer array of ``shape`` (0 outside every region).
    resampled : bool
        Whether the atlas had to be resampled.

    Raises
    ------
    ImageError
        If the atlas cannot be read, is not an integer 3-D image, its grid is oblique to the
        image's, or it does not overlap the image's field of view.
    """
    grid = _atlas_grid(atlas_file, shape, affine, image_name=image_name)
    dtype = np.min_scalar_type(int(grid.labels.max())) if grid.labels.size else np.uint8
    labels = np.zeros(grid.shape, dtype=dtype, order="F")
    _flat(labels)[grid.index] = grid.labels
    return labels, grid.resampled


def _atlas_grid(
    atlas_file: str | os.PathLike[str],
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    image_name: str,
) -> _Grid:
    path = Path(atlas_file)
    _check_file(path, "atlas image")
    key = _file_key(path)
    atlas = _load_atlas_cached(*key)
    affine = np.ascontiguousarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape[:3])
    check_grids_compatible(affine, atlas.affine, image=image_name, other=str(path))
    return _atlas_on_grid_cached(*key, shape, affine.tobytes())


def warm_atlas_cache(
    atlas_file: str | os.PathLike[str], reference_image: str | os.PathLike[str] | None = None
) -> None:
    """Read an atlas into this process's cache, and put it on a reference image's grid.

    Call it before forking worker processes (Nipype's MultiProc) so that they inherit the
    cached atlas and the resampling code instead of each loading them.

    Parameters
    ----------
    atlas_file : path-like
        Integer label image.
    reference_image : path-like, optional
        An image whose grid (read from its header only) the atlas is resampled to.
    """
    import nibabel.processing  # noqa: F401  (imports scipy.ndimage: ~0.6 s, once)

    path = Path(atlas_file)
    _check_file(path, "atlas image")
    _load_atlas_cached(*_file_key(path))
    if reference_image is not None:
        header = nb.load(reference_image).header
        shape = tuple(int(s) for s in header.get_data_shape()[:3])
        _atlas_grid(path, shape, header.get_best_affine(), image_name=str(reference_image))


def atlas_label_values(atlas_file: str | os.PathLike[str]) -> np.ndarray:
    """Sorted label values (> 0) present in an atlas image (cached per file)."""
    path = Path(atlas_file)
    _check_file(path, "atlas image")
    return _load_atlas_cached(*_file_key(path)).present.copy()


def _mask_on_grid(
    mask_file: Path, shape: tuple[int, ...], affine: np.ndarray, image_name: str
) -> np.ndarray:
    img, raw, slope, inter = _load(mask_file, "brain mask")
    check_grids_compatible(affine, img.affine, image=image_name, other=str(mask_file))
    # Positive is in the mask; NaN is out.  A positive slope without intercept keeps the sign
    # of the stored values, so the (usual) integer mask is compared without conversion.
    mask = (raw * slope + inter) > 0 if (inter != 0.0 or slope < 0) else raw > 0
    if _same_grid(mask.shape, img.affine, shape, affine):
        return mask
    return _resample_nearest(mask.astype(np.uint8), img.affine, shape, affine) > 0


# ---------------------------------------------------------------------------------------------
# The computation
# ---------------------------------------------------------------------------------------------


def regional_statistics(
    values: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    label_counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-label count, NaN count, sum, mean and SD (ddof=0) of values, by ``np.bincount``.

    Parameters
    ----------
    values : numpy.ndarray
        1-D float64 values (NaN and ±inf are excluded and counted).
    labels : numpy.ndarray
        1-D non-negative integer labels (any integer dtype), same length.
    n_labels : int
        Length of the outputs (labels ≥ ``n_labels`` are not allowed).
    label_counts : numpy.ndarray, optional
        ``np.bincount(labels)`` if already known (saves a pass).

    Returns
    -------
    dict of numpy.ndarray
        ``count``, ``nan_count``, ``sum``, ``mean``, ``std`` and ``sum_sq_dev`` (sum of squared
        deviations from the label's mean) indexed by label; mean and SD are NaN where
        ``count`` is 0.

    Examples
    --------
    >>> stats = regional_statistics(np.array([1.0, 3.0, np.nan, 5.0]), np.array([1, 1, 1, 2]), 3)
    >>> stats["count"].tolist(), stats["nan_count"].tolist(), stats["mean"].tolist()[1:]
    ([0, 2, 1], [0, 1, 0], [2.0, 5.0])
    """
    # Chunks bound the temporaries (label casts to intp, deviations) to CHUNK_VOXELS each,
    # whatever the fraction of the grid the atlas covers.
    chunks = [slice(start, start + CHUNK_VOXELS) for start in range(0, values.size, CHUNK_VOXELS)]
    nan_count = np.zeros(n_labels, dtype=np.int64)
    total = np.zeros(n_labels)
    count = np.zeros(n_labels, dtype=np.int64)
    all_finite = True
    for part in chunks:
        v, lab = values[part], labels[part]
        finite = np.isfinite(v)
        if finite.all():
            total += np.bincount(lab, weights=v, minlength=n_labels)
            if label_counts is None:
                count += np.bincount(lab, minlength=n_labels)
        else:
            all_finite = False
            nan_count += np.bincount(lab[~finite], minlength=n_labels)
            total += np.bincount(lab[finite], weights=v[finite], minlength=n_labels)
            if label_counts is None:
                count += np.bincount(lab[finite], minlength=n_labels)
    if label_counts is not None:  # every labelled voxel, minus the non-finite ones
        count[: min(n_labels, len(label_counts))] = label_counts[:n_labels]
        count -= nan_count
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    # Second pass, deviations from the region mean: keeps the SD accurate when mean >> SD.
    sum_sq = np.zeros(n_labels)
    for part in chunks:
        v, lab = values[part], labels[part]
        deviation = mean[lab]
        deviation -= v
        deviation *= deviation
        if not all_finite:
            finite = np.isfinite(v)
            deviation, lab = deviation[finite], lab[finite]
        sum_sq += np.bincount(lab, weights=deviation, minlength=n_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(sum_sq / count)
    return {
        "count": count,
        "nan_count": nan_count,
        "sum": total,
        "mean": mean,
        "std": std,
        "sum_sq_dev": sum_sq,
    }


def _resolve_space(
    in_file: Path, atlas_file: Path, image_space: str | None, atlas_space: str | None
) -> str | None:
    image_space = image_space or bids_entities(in_file).get("space")
    atlas_entities = bids_entities(atlas_file)
    atlas_space = atlas_space or atlas_entities.get("tpl") or atlas_entities.get("space")
    if image_space and atlas_space and image_space != atlas_space:
        raise ImageError(
            f"{in_file}: the image is in space '{image_space}' but the atlas {atlas_file} is in "
            f"space '{atlas_space}'; resample the image to the atlas's space first"
        )
    return atlas_space or image_space


def _value_range(raw: np.ndarray, slope: float, inter: float) -> tuple[float, float] | None:
    """Min and max of the finite real values (None if there is none), without a float copy."""
    lo, hi = raw.min(), raw.max()
    if raw.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        # Slow path, only for images holding NaN or ±inf: reduce over the finite voxels.
        finite = np.isfinite(raw)
        if not finite.any():
            return None
        lo = raw.min(where=finite, initial=np.inf)
        hi = raw.max(where=finite, initial=-np.inf)
    ends = sorted((float(lo) * slope + inter, float(hi) * slope + inter))
    return ends[0], ends[1]


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
        ``probseg``: values are probabilities in [0, 1] (± :data:`PROBABILITY_TOLERANCE`);
        the volume is the sum of probabilities × voxel volume.  ``intensity``: the volume is
        the voxel count × voxel volume.
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
    space = _resolve_space(in_file, atlas_file, image_space, atlas_space)
    table = read_label_table(atlas_labels)

    img = _open(in_file, "image")
    shape, affine = tuple(img.shape[:3]), img.affine
    # The atlas first (cached after the first image): its one-off transients do not add to
    # the image's array in memory.
    grid = _atlas_grid(atlas_file, shape, affine, image_name=str(in_file))
    raw, slope, inter = _read(img, in_file, "image")
    value_range = _value_range(raw, slope, inter)
    if value_range is None:
        raise ImageError(f"{in_file}: every voxel of the image is NaN or infinite")
    if image_kind == "probseg" and (
        value_range[0] < -PROBABILITY_TOLERANCE or value_range[1] > 1 + PROBABILITY_TOLERANCE
    ):
        raise ImageError(
            f"{in_file}: probability map has values in [{value_range[0]:.6g}, "
            f"{value_range[1]:.6g}]; expected probabilities in [0, 1] (tolerance "
            f"{PROBABILITY_TOLERANCE}); use image_kind='intensity' for other images"
        )

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
        mask = _mask_on_grid(Path(mask_file), shape, affine, str(in_file))
        keep = _flat(mask)[index]
        index, region_labels = index[keep], region_labels[keep]
    # The only float64 array: the labelled voxels, gathered in the image's memory order (in
    # chunks, so no stored-dtype copy of them exists alongside).
    values = np.empty(index.size, dtype=np.float64)
    flat_raw = _flat(raw)
    for start in range(0, index.size, CHUNK_VOXELS):
        part = slice(start, start + CHUNK_VOXELS)
        values[part] = flat_raw[index[part]]
    if slope != 1.0:
        values *= slope
    if inter != 0.0:
        values += inter
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
) -> dict[str, Any]:
    from fednipype import __version__

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


def extract_dataset_features(
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    atlas=None,
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
    from fednipype.atlas import default_atlas
    from fednipype.bids import (
        collect_images,
        derivative_path,
        get_subjects,
        load_layout,
        write_derivative_description,
    )

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
