"""Helpers for the regional-feature tests: small hand-built images and atlases, site copies."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "bids_examples"
SPACE = "MNI152NLin2009cAsym"


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write ``data`` as NIfTI (gzipped if the name ends in .gz) with sform/qform = affine."""
    img = nb.Nifti1Image(np.asarray(data), affine)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(path)
    return path


def write_dseg_tsv(path: Path, index, names, *, fmriprep_style: bool = False) -> Path:
    """A dseg.tsv; fMRIPrep style quotes names and adds a ``color`` column."""
    lines = ["index\tname\tcolor" if fmriprep_style else "index\tname"]
    for i, name in zip((int(i) for i in index), names, strict=True):
        if fmriprep_style:
            lines.append(f'{i}\t"{name}"\t#{(i * 2654435761) % 0xFFFFFF:06x}')
        else:
            lines.append(f"{i}\t{name}")
    path.write_text("\n".join(lines) + "\n")
    return path


def block_atlas(shape=(12, 14, 10), n_regions: int = 5, seed: int = 0) -> np.ndarray:
    """Integer labels 1…n_regions in irregular blobs (random Voronoi cells), 0 elsewhere."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (n_regions, 3)) * np.array(shape)
    grid = np.indices(shape).reshape(3, -1).T
    dist = ((grid[:, None, :] - centres[None]) ** 2).sum(-1)
    labels = (np.argmin(dist, axis=1) + 1).reshape(shape).astype(np.uint8)
    labels[rng.uniform(size=shape) < 0.2] = 0  # background holes
    labels[0, :, :] = 0
    return labels


def reference_features(data: np.ndarray, labels: np.ndarray, index, voxel_mm3, kind, mask=None):
    """Straightforward per-region numpy computation (a loop over regions, on purpose)."""
    rows = []
    for i in index:
        in_region = labels == i
        if mask is not None:
            in_region &= mask
        vals = data[in_region]
        good = vals[np.isfinite(vals)]
        n = good.size
        rows.append(
            {
                "index": i,
                "voxel_count": n,
                "nan_count": int(vals.size - n),
                "volume_mm3": (good.sum() if kind == "probseg" else n) * voxel_mm3
                if n
                else np.nan,
                "mean": good.mean() if n else np.nan,
                "std": good.std(ddof=0) if n else np.nan,
            }
        )
    return rows


def copy_site(site: str, dst: Path, subjects: list[str] | None = None) -> Path:
    """Copy a bundled site (optionally only some subjects) to ``dst/site``."""
    src = BUNDLED / site
    out = dst / site
    if subjects is None:
        shutil.copytree(src, out)
        return out
    out.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    seg = src / "derivatives" / "segmentation"
    (out / "derivatives" / "segmentation").mkdir(parents=True)
    shutil.copy2(seg / "dataset_description.json", out / "derivatives" / "segmentation")
    for sub in subjects:
        shutil.copytree(src / f"sub-{sub}", out / f"sub-{sub}")
        shutil.copytree(seg / f"sub-{sub}", out / "derivatives" / "segmentation" / f"sub-{sub}")
    return out


def probseg_path(site_dir: Path, subject: str, session: str | None = None) -> Path:
    """Path of a bundled-style GM probability map."""
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    anat = Path(f"sub-{subject}", *([f"ses-{session}"] if session else []), "anat")
    return (
        site_dir
        / "derivatives"
        / "segmentation"
        / anat
        / f"{stem}_space-{SPACE}_label-GM_probseg.nii.gz"
    )


def truncate_gzip(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a .nii.gz in the middle of its compressed stream (header still readable)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def write_html(path: Path) -> None:
    """An HTML error page saved under a NIfTI name (a failed download), gzipped or not."""
    html = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n" * 10
    path.write_bytes(html)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)
