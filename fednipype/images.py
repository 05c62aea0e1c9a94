"""Reading and checking the NIfTI images of feature extraction: files, headers, voxel values.

Every problem is an :class:`~fednipype.exceptions.ImageError` naming the file: a missing,
zero-byte, truncated or non-NIfTI file (e.g. an HTML page saved as ``.nii.gz``); an image that
is not 3-D (a 4-D image whose 4th dimension is 1 is squeezed to 3-D and accepted); voxels that
are not numbers; invalid scaling; an image whose every voxel is NaN; a probability map with
values outside [0, 1] by more than :data:`PROBABILITY_TOLERANCE`.

Images are read in their stored dtype, with the file's scaling (slope, intercept) returned
beside the array instead of applied to it: no full-size float64 copy of an image is made here.
Arrays keep nibabel's Fortran (NIfTI on-disk) order; :func:`fortran_flat` flattens them as a
view.  :func:`file_key` identifies a file's current content for the caches of
:mod:`fednipype.grids` and :func:`file_sha256`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import nibabel as nb
import numpy as np

from fednipype.exceptions import ImageError

#: Probabilities may stray this far outside [0, 1] (interpolation round-off) before an error.
PROBABILITY_TOLERANCE = 1e-4
#: Most voxels an image may have (2**28, e.g. 645^3): a 0.5 mm whole-head grid has ~2**26.
#: A header claiming more is refused before anything is allocated or resampled.
MAX_VOXELS = 2**28
#: Largest expansion of DEFLATE (gzip) data: ~1032:1. A ``.nii.gz`` whose header promises more
#: bytes than its size allows is refused before anything is allocated.
MAX_GZIP_RATIO = 1032

_ENTITY = re.compile(r"(?:^|_)(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)")


def bids_entities(path: str | os.PathLike[str]) -> dict[str, str]:
    """BIDS ``key-value`` entities of a file name (``tpl`` included, the suffix excluded).

    >>> bids_entities("sub-01_ses-1_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz")["space"]
    'MNI152NLin2009cAsym'
    """
    name = Path(path).name.split(".")[0]
    return {m["key"]: m["value"] for m in _ENTITY.finditer(name)}


def file_key(path: Path) -> tuple[str, int, int]:
    """Identity of a file's current content for caches: resolved path, mtime, size."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or ``None`` if it is a regular file.

    Distinguishes a dangling symbolic link (e.g. a DataLad/git-annex file never fetched), a
    symbolic-link loop, a folder and a missing path.

    >>> unreadable_reason(Path("no/such/file.nii.gz"))
    'does not exist'
    """
    try:
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop so
                return "is a symbolic link in a loop"
            except OSError as err:
                if err.errno == errno.ELOOP:
                    return "is a symbolic link in a loop"
                return (
                    "is a symbolic link to a missing file (a DataLad/git-annex file never "
                    "fetched? run 'datalad get' on it)"
                )
        if path.is_file():
            return None
        if path.is_dir():
            return "is a folder, not a file"
        return "does not exist" if not path.exists() else "is not a regular file"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"


def check_file(path: Path, role: str) -> None:
    """Refuse a path that is not a file, or an empty one; ``role`` names it in the error."""
    reason = unreadable_reason(path)
    if reason is not None:
        raise ImageError(f"{path}: the {role} {reason}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: {role} is an empty (zero-byte) file; expected a NIfTI image")


def open_image(path: Path, role: str) -> nb.Nifti1Image:
    """Open a NIfTI image (header only) and check it is a 3-D image of numbers.

    A 4-D (5-D …) image whose extra dimensions are all 1 counts as 3-D.  Every failure is an
    ImageError naming the file.
    """
    check_file(path, role)
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
    check_header_size(img, path, role)
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


def check_header_size(img: nb.Nifti1Image | nb.Nifti2Image, path: Path, role: str) -> None:
    """Refuse a header whose voxel count or data size the file cannot hold.

    Reads nothing beyond the header: the claimed voxel count is capped at
    :data:`MAX_VOXELS`, and the data the header promises (offset + voxels x bytes per voxel)
    must fit in the file (uncompressed) or in what gzip can expand it to
    (:data:`MAX_GZIP_RATIO`).  A 2 KB file claiming 2000^3 float64 voxels fails here, fast,
    instead of making a later step allocate or resample onto its grid.

    Raises
    ------
    ImageError
        Naming the file, the claimed shape and size, and the file's size.
    """
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if any(s < 0 for s in shape):
        raise ImageError(f"{path}: the {role}'s header has a negative dimension {shape}")
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    if voxels > MAX_VOXELS:
        raise ImageError(
            f"{path}: the {role}'s header claims {voxels:,} voxels {shape}; at most "
            f"{MAX_VOXELS:,} are accepted (corrupt header?)"
        )
    itemsize = img.get_data_dtype().itemsize
    offset = int(img.header.get("vox_offset", 0) or 0)
    needed = offset + voxels * itemsize
    size = path.stat().st_size
    compressed = path.name.endswith(".gz")
    capacity = size * MAX_GZIP_RATIO if compressed else size
    if needed > capacity:
        kind = "compressed " if compressed else ""
        raise ImageError(
            f"{path}: the {role}'s header claims {shape} voxels of {img.get_data_dtype()} "
            f"({needed:,} bytes) but the {kind}file has {size:,} bytes; the file is truncated "
            "or its header is corrupt"
        )


def read_voxels(img: nb.Nifti1Image, path: Path, role: str) -> tuple[np.ndarray, float, float]:
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


def load_image(path: Path, role: str) -> tuple[nb.Nifti1Image, np.ndarray, float, float]:
    """Open and read an image: ``(img, raw, slope, inter)``.

    See :func:`open_image` and :func:`read_voxels`.
    """
    img = open_image(path, role)
    return (img, *read_voxels(img, path, role))


def fortran_flat(array: np.ndarray) -> np.ndarray:
    """Flatten in Fortran order (NIfTI's on-disk order): a view of what nibabel returns."""
    return array.reshape(-1, order="F")


def value_range(raw: np.ndarray, slope: float, inter: float) -> tuple[float, float] | None:
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


def check_values(
    path: Path, raw: np.ndarray, slope: float, inter: float, *, probabilities: bool
) -> None:
    """Refuse an image without any finite voxel, or a probability map outside [0, 1].

    Parameters
    ----------
    path : pathlib.Path
        The image's file, named in the error.
    raw : numpy.ndarray
        Voxels in their stored dtype.
    slope, inter : float
        The file's scaling.
    probabilities : bool
        Whether the values must be probabilities (± :data:`PROBABILITY_TOLERANCE`).

    Raises
    ------
    ImageError
        If every voxel is NaN or infinite, or probabilities are out of range.
    """
    ends = value_range(raw, slope, inter)
    if ends is None:
        raise ImageError(f"{path}: every voxel of the image is NaN or infinite")
    if probabilities and (ends[0] < -PROBABILITY_TOLERANCE or ends[1] > 1 + PROBABILITY_TOLERANCE):
        raise ImageError(
            f"{path}: probability map has values in [{ends[0]:.6g}, {ends[1]:.6g}]; expected "
            f"probabilities in [0, 1] (tolerance {PROBABILITY_TOLERANCE}); use "
            "image_kind='intensity' for other images"
        )


@lru_cache(maxsize=32)
def _sha256_cached(path_str: str, _mtime: int, _size: int) -> str:
    digest = hashlib.sha256()
    with open(path_str, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (cached while the file's mtime and size are unchanged)."""
    return _sha256_cached(*file_key(Path(path)))
