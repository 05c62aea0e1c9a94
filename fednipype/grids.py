"""A label atlas (or a brain mask) on an image's grid: read once, resampled, cached per grid.

A label atlas is an integer NIfTI image plus a BIDS-style ``dseg.tsv`` with at least the
columns ``index`` and ``name`` (:func:`read_label_table`).

Grids and spaces
----------------
The image must already be in the atlas's template space (:func:`resolve_space`).  On the same
grid the atlas is used as is; on a different grid of the same space it is resampled to the
image's grid by nearest neighbour (:func:`nibabel.processing.resample_from_to` with
``order=0``), once per grid: the result is cached for the life of the process
(:func:`warm_atlas_cache` fills the cache before worker processes fork).  Grids whose axes
differ only by permutations and flips (e.g. LAS vs RAS storage) are compatible, since
resampling works in world coordinates.  An oblique grid relative to the atlas (a native-space
image) or an explicit space mismatch (the image's ``space-`` entity or argument vs the atlas's
``tpl-``/``space-`` entity or argument) raise :class:`~fednipype.exceptions.ImageError`;
:func:`fednipype.features.extract_features` also refuses grids that do not overlap (no atlas
region in the image's field of view).  A brain mask is put on the image's grid the same way
(:func:`mask_on_grid`), without caching.

What is cached
--------------
Per atlas file (keyed by path, mtime and size, so an edited file is read again): its labels,
affine and the labels present; per atlas file and image grid: the labelled voxels as an
:class:`AtlasGrid`, ascending Fortran-order positions (int32 when the grid allows it) and their
labels in the atlas's integer type, about 5 bytes per labelled voxel for a uint8 atlas; per
label table file: the parsed table.

A region's largest possible volume on a grid
--------------------------------------------
:func:`atlas_max_volumes`: the region's voxels on the grid (the atlas as put on that grid)
× the voxel volume.  It bounds any volume summed from probabilities (≤ 1) over the region on
that grid, and depends on the atlas and the grid's geometry only: a public bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from fednipype.exceptions import ImageError
from fednipype.images import bids_entities, check_file, file_key, fortran_flat, load_image

#: Largest deviation of the two grids' relative direction cosines from a signed permutation.
ORIENTATION_TOLERANCE = 1e-3
#: Largest difference (mm) between two affines' entries for the grids to count as the same.
AFFINE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class AtlasGrid:
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


@dataclass(frozen=True)
class _AtlasImage:
    """An atlas image read once: labels, affine, labelled voxels and the labels present."""

    labels: np.ndarray
    affine: np.ndarray
    grid: AtlasGrid
    present: np.ndarray  # sorted label values > 0 found in the image


# ---------------------------------------------------------------------------------------------
# The label table
# ---------------------------------------------------------------------------------------------


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
    return _read_label_table_cached(*file_key(path)).copy()


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


# ---------------------------------------------------------------------------------------------
# Spaces and grids
# ---------------------------------------------------------------------------------------------


def resolve_space(
    in_file: Path, atlas_file: Path, image_space: str | None, atlas_space: str | None
) -> str | None:
    """The template space of an image and an atlas; refuses two different known spaces.

    Parameters
    ----------
    in_file, atlas_file : pathlib.Path
        The image and the atlas image; their ``space-`` (image) and ``tpl-``/``space-``
        (atlas) entities are used when the arguments are None.
    image_space, atlas_space : str or None
        Explicit spaces.

    Returns
    -------
    str or None
        The atlas's space if known, else the image's, else None.

    Raises
    ------
    ImageError
        If both spaces are known and differ.
    """
    image_space = image_space or bids_entities(in_file).get("space")
    atlas_entities = bids_entities(atlas_file)
    atlas_space = atlas_space or atlas_entities.get("tpl") or atlas_entities.get("space")
    if image_space and atlas_space and image_space != atlas_space:
        raise ImageError(
            f"{in_file}: the image is in space '{image_space}' but the atlas {atlas_file} is in "
            f"space '{atlas_space}'; resample the image to the atlas's space first"
        )
    return atlas_space or image_space


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


def _resample_nearest(
    data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray
) -> np.ndarray:
    # Imported here: nibabel.processing imports scipy.ndimage (~0.6 s), needed only when an
    # atlas or a mask is on another grid than the image.
    from nibabel.processing import resample_from_to

    source = nb.Nifti1Image(data, affine)
    # order=0: nearest neighbour keeps labels intact; outside the source's field of view is 0.
    out = resample_from_to(source, (shape, target_affine), order=0, mode="constant", cval=0)
    return np.asarray(out.dataobj)


# ---------------------------------------------------------------------------------------------
# The atlas image, read once and put on each grid once
# ---------------------------------------------------------------------------------------------


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


def _labelled_voxels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat (Fortran-order) positions of the labelled voxels, ascending, and their labels.

    Positions are int32 when the grid allows it and labels keep the atlas's (small) integer
    type: the cache costs 5 bytes per labelled voxel for a uint8 atlas, not 16.
    """
    flat = fortran_flat(labels)
    index = np.flatnonzero(flat > 0)  # nonzero() on a bool array is ~4x faster than on ints
    if flat.size < np.iinfo(np.int32).max:
        index = index.astype(np.int32)
    return index, flat[index]


@lru_cache(maxsize=8)
def _load_atlas_cached(path_str: str, _mtime: int, _size: int) -> _AtlasImage:
    path = Path(path_str)
    img, raw, slope, inter = load_image(path, "atlas image")
    labels = _labels_from_raw(path, raw, slope, inter)
    labels.setflags(write=False)
    index, region_labels = _labelled_voxels(labels)
    counts = np.bincount(region_labels)
    present = np.flatnonzero(counts)
    grid = AtlasGrid(labels.shape, index, region_labels, counts, resampled=False)
    return _AtlasImage(labels, img.affine.copy(), grid, present[present > 0])


@lru_cache(maxsize=16)
def _atlas_on_grid_cached(
    path_str: str, mtime: int, size: int, shape: tuple[int, ...], affine_bytes: bytes
) -> AtlasGrid:
    """The atlas's labelled voxels on a grid (shape, affine); cached per atlas file and grid."""
    atlas = _load_atlas_cached(path_str, mtime, size)
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    if _same_grid(atlas.labels.shape, atlas.affine, shape, affine):
        return atlas.grid
    resampled = _resample_nearest(atlas.labels, atlas.affine, shape, affine)
    index, region_labels = _labelled_voxels(resampled)
    return AtlasGrid(
        tuple(shape), index, region_labels, np.bincount(region_labels), resampled=True
    )


def atlas_grid(
    atlas_file: str | os.PathLike[str],
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    image_name: str,
) -> AtlasGrid:
    """The atlas's labelled voxels on an image grid (cached per atlas file and grid).

    Parameters
    ----------
    atlas_file : path-like
        Integer label image (0 is background).
    shape : tuple of int
        The image grid's shape (only the first three dimensions are used).
    affine : numpy.ndarray
        The image grid's 4 × 4 affine.
    image_name : str
        Name of the image, used in error messages.

    Returns
    -------
    AtlasGrid
        Positions and labels of the labelled voxels on the grid (shared with the cache: do
        not modify).

    Raises
    ------
    ImageError
        If the atlas cannot be read, is not an integer 3-D image, or its grid is oblique to
        the image's.
    """
    path = Path(atlas_file)
    check_file(path, "atlas image")
    key = file_key(path)
    atlas = _load_atlas_cached(*key)
    affine = np.ascontiguousarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape[:3])
    check_grids_compatible(affine, atlas.affine, image=image_name, other=str(path))
    return _atlas_on_grid_cached(*key, shape, affine.tobytes())


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
        If the atlas cannot be read, is not an integer 3-D image, or its grid is oblique to
        the image's.
    """
    grid = atlas_grid(atlas_file, shape, affine, image_name=image_name)
    dtype = np.min_scalar_type(int(grid.labels.max())) if grid.labels.size else np.uint8
    labels = np.zeros(grid.shape, dtype=dtype, order="F")
    fortran_flat(labels)[grid.index] = grid.labels
    return labels, grid.resampled


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
    # Imported here to load scipy.ndimage (~0.6 s) once, before workers fork.
    import nibabel.processing  # noqa: F401

    path = Path(atlas_file)
    check_file(path, "atlas image")
    _load_atlas_cached(*file_key(path))
    if reference_image is not None:
        header = nb.load(reference_image).header
        shape = tuple(int(s) for s in header.get_data_shape()[:3])
        atlas_grid(path, shape, header.get_best_affine(), image_name=str(reference_image))


def atlas_label_values(atlas_file: str | os.PathLike[str]) -> np.ndarray:
    """Sorted label values (> 0) present in an atlas image (cached per file)."""
    path = Path(atlas_file)
    check_file(path, "atlas image")
    return _load_atlas_cached(*file_key(path)).present.copy()


def region_max_volumes(
    table: pd.DataFrame, counts: np.ndarray, voxel_mm3: float
) -> dict[str, float]:
    """Region name → its voxels on a grid × the voxel volume (0 for a region off the grid).

    Parameters
    ----------
    table : pandas.DataFrame
        The label table (:func:`read_label_table`).
    counts : numpy.ndarray
        Voxels per label on the grid (:attr:`AtlasGrid.counts`): all the region's voxels,
        before any mask or NaN, so the result depends on the atlas and the grid only.
    voxel_mm3 : float
        The grid's voxel volume.

    Returns
    -------
    dict
        Region name → largest possible volume (mm³), in the table's order.
    """
    index = table["index"].to_numpy()
    padded = np.zeros(max(int(index.max()) + 1, counts.size), dtype=np.int64)
    padded[: counts.size] = counts
    return {
        str(name): float(padded[i]) * voxel_mm3
        for name, i in zip(table["name"], index, strict=True)
    }


def atlas_max_volumes(
    atlas_file: str | os.PathLike[str],
    atlas_labels: str | os.PathLike[str],
    shape: tuple[int, ...] | None = None,
    affine: np.ndarray | None = None,
) -> dict[str, float]:
    """Each region's largest possible ``volume_mm3`` on a grid, from the atlas alone.

    Parameters
    ----------
    atlas_file, atlas_labels : path-like
        The atlas image and its ``dseg.tsv``.
    shape, affine : optional
        The grid the features are computed on; by default the atlas's own grid.  The atlas
        is put on it as :func:`~fednipype.features.extract_features` does (nearest
        neighbour, cached).

    Returns
    -------
    dict
        Region name → the region's voxel count on the grid × the voxel volume (mm³), in the
        label table's order; what :func:`~fednipype.features.extract_features` records as
        ``Atlas.RegionMaxVolumeMm3``.

    Examples
    --------
    >>> from fednipype.atlas import default_atlas
    >>> atlas = default_atlas(2)  # on its own 2 mm grid
    >>> volumes = atlas_max_volumes(atlas.image, atlas.labels)
    >>> len(volumes), all(v > 0 for v in volumes.values())
    (100, True)
    """
    atlas_file = Path(atlas_file)
    if shape is None or affine is None:
        check_file(atlas_file, "atlas image")
        header = nb.load(atlas_file).header
        shape, affine = header.get_data_shape()[:3], header.get_best_affine()
    grid = atlas_grid(atlas_file, tuple(shape), np.asarray(affine), image_name=str(atlas_file))
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    return region_max_volumes(read_label_table(atlas_labels), grid.counts, voxel_mm3)


# ---------------------------------------------------------------------------------------------
# A brain mask
# ---------------------------------------------------------------------------------------------


def mask_on_grid(
    mask_file: Path, shape: tuple[int, ...], affine: np.ndarray, image_name: str
) -> np.ndarray:
    """A brain mask (positive = inside, NaN = outside) as a boolean array on an image grid.

    Parameters
    ----------
    mask_file : pathlib.Path
        Mask image on the image's grid or on another grid of the same space (resampled by
        nearest neighbour).
    shape : tuple of int
        The image grid's 3-D shape.
    affine : numpy.ndarray
        The image grid's 4 × 4 affine.
    image_name : str
        Name of the image, used in error messages.

    Returns
    -------
    numpy.ndarray
        Boolean array of ``shape``.

    Raises
    ------
    ImageError
        If the mask cannot be read or its grid is oblique to the image's.
    """
    img, raw, slope, inter = load_image(mask_file, "brain mask")
    check_grids_compatible(affine, img.affine, image=image_name, other=str(mask_file))
    # Positive is in the mask; NaN is out.  A positive slope without intercept keeps the sign
    # of the stored values, so the (usual) integer mask is compared without conversion.
    mask = (raw * slope + inter) > 0 if (inter != 0.0 or slope < 0) else raw > 0
    if _same_grid(mask.shape, img.affine, shape, affine):
        return mask
    return _resample_nearest(mask.astype(np.uint8), img.affine, shape, affine) > 0
