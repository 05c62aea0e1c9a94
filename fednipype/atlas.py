"""The default atlas: a reproducible grey-matter parcellation built from nilearn's MNI templates.

nilearn ships the ICBM 2009 grey-matter probability template offline but no labelled atlas
(its atlas fetchers need the network), so fednipype builds its default atlas from that template
with a deterministic rule and ships the result as package data:

1. grey-matter mask: the 1 mm ICBM 2009 grey-matter probability > ``GM_THRESHOLD``;
2. hemispheres: world x < 0 is left, x > 0 right; the midline plane x = 0 stays unlabelled;
3. each hemisphere's mask is split by recursive coordinate bisection into ``N_PER_HEMISPHERE``
   parcels of (almost) equal voxel count: a set of voxels destined for k parcels is sorted
   along its longest axis (ties broken by the other axes) and cut at the voxel count that gives
   ⌊k/2⌋ and ⌈k/2⌉ parcels to the two halves.  Only integer sorting is involved, so the result
   is the same on every machine;
4. the template is exactly left–right symmetric, so the right hemisphere is the mirror image of
   the left; right labels are the left labels + ``N_PER_HEMISPHERE``.

Parcels are geometric, not anatomical: they are named ``L_P01`` … ``R_P50`` and the ``dseg.tsv``
records each parcel's centroid (mm) and volume.  The 2 mm version samples the 1 mm labels on
the 2 mm template grid (nearest neighbour; the grids share their origin).  Labs pass their own
atlas (Schaefer, Harvard-Oxford, …) whenever they want anatomical regions.

Rebuild the shipped files with ``python -m fednipype.atlas``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np

ATLAS_NAME = "fednipype"
SPACE = "MNI152NLin2009cAsym"
GM_THRESHOLD = 0.3
N_PER_HEMISPHERE = 50
RESOLUTIONS = (1, 2)


@dataclass(frozen=True)
class Atlas:
    """A label atlas: an integer image and its ``dseg.tsv`` of ``index``/``name``.

    Parameters
    ----------
    image : pathlib.Path
        Integer NIfTI image; 0 is background.
    labels : pathlib.Path
        BIDS-style ``dseg.tsv`` with at least the columns ``index`` and ``name``.
    name : str
        Short name recorded in outputs' provenance.
    space : str or None
        Template space the atlas is defined in, if known.
    """

    image: Path
    labels: Path
    name: str
    space: str | None = None


def _data_dir() -> Path:
    return Path(str(resources.files("fednipype") / "data"))


def atlas_filenames(resolution: int) -> tuple[str, str]:
    """BIDS-style file names of the default atlas image and its label table.

    >>> atlas_filenames(2)[0]
    'tpl-MNI152NLin2009cAsym_res-02_atlas-fednipype_dseg.nii.gz'
    """
    stem = f"tpl-{SPACE}_res-{resolution:02d}_atlas-{ATLAS_NAME}_dseg"
    return f"{stem}.nii.gz", f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.tsv"


def default_atlas(resolution: int = 2) -> Atlas:
    """Return the shipped default atlas at 1 or 2 mm.

    Parameters
    ----------
    resolution : {1, 2}
        Voxel size in mm.

    Returns
    -------
    Atlas
        Paths of the image and the ``dseg.tsv`` inside the installed package.

    >>> atlas = default_atlas(2)
    >>> atlas.image.is_file() and atlas.labels.is_file()
    True
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution: expected one of {RESOLUTIONS}, got {resolution!r}")
    image_name, labels_name = atlas_filenames(resolution)
    data = _data_dir()
    return Atlas(data / image_name, data / labels_name, ATLAS_NAME, SPACE)


def _bisect(coords: np.ndarray, order: np.ndarray, n_parcels: int, out: np.ndarray, first: int):
    """Assign labels ``first … first + n_parcels - 1`` to the voxels ``order`` (recursively)."""
    if n_parcels == 1:
        out[order] = first
        return
    sub = coords[order]
    axis = int(np.argmax(sub.max(axis=0) - sub.min(axis=0)))
    others = [a for a in range(3) if a != axis]
    # lexsort: last key is primary; integer keys make the order exact and stable.
    ranked = order[np.lexsort((sub[:, others[1]], sub[:, others[0]], sub[:, axis]))]
    k_low = n_parcels // 2
    cut = (len(ranked) * k_low) // n_parcels
    _bisect(coords, ranked[:cut], k_low, out, first)
    _bisect(coords, ranked[cut:], n_parcels - k_low, out, first + k_low)


def build_labels(gm: np.ndarray, threshold: float = GM_THRESHOLD, n_per_hemisphere: int = 50):
    """Parcellate a left–right symmetric grey-matter map (1 mm MNI grid, x axis first).

    Parameters
    ----------
    gm : numpy.ndarray
        3-D grey-matter probability map whose first axis runs left → right and whose
        central plane (index ``shape[0] // 2``) is the midline.
    threshold : float
        Probability above which a voxel is grey matter.
    n_per_hemisphere : int
        Parcels per hemisphere.

    Returns
    -------
    numpy.ndarray
        ``uint8`` label volume, 0 background, ``1 … n`` left, ``n+1 … 2n`` right.
    """
    if gm.shape[0] % 2 != 1 or not np.array_equal(gm, gm[::-1]):
        raise ValueError("the grey-matter map must be exactly symmetric about its middle x plane")
    mid = gm.shape[0] // 2
    mask = gm > threshold
    mask[mid:] = False  # left hemisphere only (x < 0)
    coords = np.argwhere(mask)  # C order: deterministic
    labels_left = np.zeros(len(coords), dtype=np.uint8)
    _bisect(coords, np.arange(len(coords)), n_per_hemisphere, labels_left, 1)
    out = np.zeros(gm.shape, dtype=np.uint8)
    out[tuple(coords.T)] = labels_left
    right = out[::-1].copy()
    right[right > 0] += n_per_hemisphere
    return out + right


def _label_table(labels: np.ndarray, affine: np.ndarray, n_per_hemisphere: int) -> str:
    idx = labels.ravel()
    counts = np.bincount(idx, minlength=2 * n_per_hemisphere + 1)
    ijk = np.indices(labels.shape).reshape(3, -1)
    centroid_vox = np.stack([np.bincount(idx, weights=c, minlength=counts.size) for c in ijk])
    centroid_vox = centroid_vox[:, 1:] / counts[1:]
    centroid_mm = (affine[:3, :3] @ centroid_vox + affine[:3, 3:4]).T
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    rows = ["index\tname\themisphere\tx_mm\ty_mm\tz_mm\tvolume_mm3"]
    for i in range(1, 2 * n_per_hemisphere + 1):
        hemi, number = ("L", i) if i <= n_per_hemisphere else ("R", i - n_per_hemisphere)
        x, y, z = centroid_mm[i - 1]
        rows.append(
            f"{i}\t{hemi}_P{number:02d}\t{hemi}\t{x:.1f}\t{y:.1f}\t{z:.1f}\t"
            f"{counts[i] * voxel_mm3:.0f}"
        )
    return "\n".join(rows) + "\n"


def write_default_atlas(out_dir: Path) -> list[Path]:
    """Build the default atlas from nilearn's templates and write it to ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Destination folder (the package's ``data`` folder for the shipped copy).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from nilearn import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gm1 = datasets.load_mni152_gm_template(resolution=1)
    labels1 = build_labels(np.asarray(gm1.get_fdata(), dtype=np.float64))
    grid2 = datasets.load_mni152_gm_template(resolution=2)
    # The 2 mm grid shares the 1 mm grid's origin: voxel (i, j, k) at 2 mm is (2i, 2j, 2k).
    labels2 = labels1[::2, ::2, ::2]
    if labels2.shape != grid2.shape:
        raise RuntimeError(f"2 mm grid mismatch: {labels2.shape} vs {grid2.shape}")
    written = []
    for res, data, affine in ((1, labels1, gm1.affine), (2, labels2, grid2.affine)):
        img = nb.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(affine, code=4)  # 4 = MNI152
        img.header.set_sform(affine, code=4)
        image_name, _ = atlas_filenames(res)
        img.to_filename(out_dir / image_name)
        written.append(out_dir / image_name)
    _, labels_name = atlas_filenames(1)
    (out_dir / labels_name).write_text(_label_table(labels1, gm1.affine, N_PER_HEMISPHERE))
    written.append(out_dir / labels_name)
    description = {
        "Name": "fednipype default grey-matter parcellation",
        "Space": SPACE,
        "Resolutions": {f"{r:02d}": f"{r} mm isotropic" for r in RESOLUTIONS},
        "Description": (
            "Recursive coordinate bisection of the ICBM 2009 grey-matter probability template "
            f"(threshold {GM_THRESHOLD}) into {N_PER_HEMISPHERE} equal-volume parcels per "
            "hemisphere; right = mirror of left. Geometric parcels, not anatomical regions."
        ),
        "Source": "ICBM 2009 nonlinear grey-matter template as shipped by nilearn",
        "GeneratedBy": "python -m fednipype.atlas",
    }
    desc_path = out_dir / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_description.json"
    desc_path.write_text(json.dumps(description, indent=2) + "\n")
    written.append(desc_path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Rebuild the default atlas files (``python -m fednipype.atlas [--out DIR]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_data_dir(), help="output folder")
    args = parser.parse_args(argv)
    for path in write_default_atlas(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
