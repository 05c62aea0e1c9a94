"""Generate the bundled multi-site example BIDS datasets with planted, known effects.

Run from the repository root::

    python bids_examples/generate.py            # rewrites bids_examples/
    python bids_examples/generate.py --out DIR  # writes elsewhere (used by the tests)

Everything is deterministic (fixed seeds, gzip without time stamps): running the script again
reproduces the committed files byte for byte.

Model
-----
Each site is a BIDS dataset (``siteA``, ``siteB``, ``siteC``) with raw T1w images and a
``derivatives/segmentation`` folder holding one grey-matter probability map per subject and
session, ``space-MNI152NLin2009cAsym_label-GM_probseg``, as a segmentation pipeline would leave
it.  Both start from the ICBM 2009 templates that nilearn ships (T1 and grey matter).

The grey-matter probability of voxel v, in region r of fednipype's default atlas, for subject i
at site s is::

    p = clip(GM_template(v) * BASE * (1 + a_r (age_i - 50) + g_r patient_i + SEX male_i
                                        + site_s + u_ir) * (1 + e_v), 0, 1)

with a per-region age slope a_r (faster loss in frontal parcels), a patient effect g_r in a few
named regions, one sex effect, a per-site offset, a subject-and-region random effect
u_ir ~ N(0, SD_SUBJECT) and voxel noise e_v ~ N(0, noise_s) whose level differs by site.  The
regional grey-matter volume (sum of probabilities x voxel volume) is therefore linear in age,
group and sex, with coefficients in mm3 written to ``ground_truth.json`` (outside the BIDS
trees).  Sites also differ in T1w intensity scale, noise level and age range.

Images are stored at reduced resolution to keep the folder small: grey-matter maps on a 3 mm
grid (uint8 with scaling 1/255), T1w images on a 4 mm grid (int16).  Both grids are the MNI
template's grid subsampled, so they are in the atlas's space on a different grid.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to

SEED = 20261128
BASE = 0.7
SEX_EFFECT = 0.03
SD_SUBJECT = 0.02
CENTER_AGE = 50.0
SPACE = "MNI152NLin2009cAsym"
PATIENT_REGIONS = {"L_P12": -0.08, "R_P12": -0.08, "L_P27": -0.06, "R_P33": -0.05}
GM_RES_MM = 3
T1_RES_MM = 4
VERSION = "1.0"

SITES = [
    {
        "name": "siteA",
        "n": 24,
        "sessions": ["1", "2"],
        "age_range": (20.0, 45.0),
        "t1_scale": 800.0,
        "noise": 0.03,
        "offset": 0.0,
        "scanner": "Siemens Prisma",
    },
    {
        "name": "siteB",
        "n": 30,
        "sessions": [],
        "age_range": (45.0, 80.0),
        "t1_scale": 1200.0,
        "noise": 0.05,
        "offset": 0.02,
        "scanner": "GE Discovery MR750",
        "extra_column": "handedness",
    },
    {
        "name": "siteC",
        "n": 45,
        "sessions": [],
        "age_range": (25.0, 85.0),
        "t1_scale": 600.0,
        "noise": 0.08,
        "offset": -0.03,
        "scanner": "Philips Achieva",
        "missing_age": 7,  # this subject's age is n/a in participants.tsv
    },
]


def _grid(resolution: int, ref: nb.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid with the template's origin and ``resolution`` mm voxels covering its field."""
    shape = tuple(int(np.ceil(s / resolution)) for s in ref.shape[:3])
    affine = ref.affine.copy()
    affine[:3, :3] = np.diag([float(resolution)] * 3)
    return shape, affine


def _save(img: nb.Nifti1Image, path: Path) -> None:
    """Write a .nii.gz deterministically (maximum compression, no time stamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _templates():
    from nilearn import datasets

    from fednipype.atlas import default_atlas

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    gm_shape, gm_affine = _grid(GM_RES_MM, gm)
    t1_shape, t1_affine = _grid(T1_RES_MM, t1)
    gm_img = resample_from_to(gm, (gm_shape, gm_affine), order=1)
    t1_img = resample_from_to(t1, (t1_shape, t1_affine), order=1)
    atlas = default_atlas(2)
    atlas_img = resample_from_to(nb.load(atlas.image), (gm_shape, gm_affine), order=0)
    table = pd.read_csv(atlas.labels, sep="\t")
    gm_data = np.clip(np.asarray(gm_img.dataobj, dtype=np.float64), 0.0, 1.0)
    gm_data[gm_data < 0.05] = 0.0  # segmentations leave no haze outside the brain
    t1_data = np.clip(np.asarray(t1_img.dataobj, dtype=np.float64), 0.0, None)
    labels = np.asarray(atlas_img.dataobj).astype(np.int64)
    return gm_data, gm_affine, t1_data, t1_affine, labels, table


def _region_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Per-region fractional effects: age slope by y position, patient effect by name."""
    y = table["y_mm"].to_numpy()
    frac = (y - y.min()) / (y.max() - y.min())  # 0 posterior … 1 anterior
    effects = pd.DataFrame(
        {
            "index": table["index"],
            "name": table["name"],
            "age_slope": np.round(-0.002 - 0.003 * frac, 6),
            "patient": [PATIENT_REGIONS.get(n, 0.0) for n in table["name"]],
        }
    )
    return effects


def _participants(site: dict, site_index: int) -> pd.DataFrame:
    rng = np.random.default_rng([SEED, site_index])
    n = site["n"]
    lo, hi = site["age_range"]
    age = np.round(rng.uniform(lo, hi, n), 1)
    sex = rng.choice(["F", "M"], n)
    group = np.array(["patient"] * (n // 2) + ["control"] * (n - n // 2))
    rng.shuffle(group)
    df = pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:02d}" for i in range(n)],
            "age": age,
            "sex": sex,
            "group": group,
        }
    )
    if site.get("extra_column"):
        df[site["extra_column"]] = rng.choice(["R", "L"], n, p=[0.9, 0.1])
    return df


def _participants_json(site: dict) -> dict:
    meta = {
        "participant_id": {"Description": "Participant label"},
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
        "group": {
            "Description": "Diagnostic group",
            "Levels": {"patient": "patient", "control": "healthy control"},
        },
    }
    if site.get("extra_column"):
        meta[site["extra_column"]] = {
            "Description": "Handedness",
            "Levels": {"R": "right", "L": "left"},
        }
    return meta


def generate(out_dir: Path) -> list[Path]:
    """Write the example sites and ``ground_truth.json`` below ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Destination folder (``bids_examples`` in the repository).

    Returns
    -------
    list of pathlib.Path
        Every file written, sorted.
    """
    out_dir = Path(out_dir)
    gm, gm_affine, t1, t1_affine, labels, table = _templates()
    effects = _region_effects(table)
    n_regions = len(effects)
    # Per-voxel lookup of region effects; index 0 (outside the atlas) has none.
    age_lut = np.zeros(n_regions + 1)
    patient_lut = np.zeros(n_regions + 1)
    age_lut[effects["index"]] = effects["age_slope"]
    patient_lut[effects["index"]] = effects["patient"]
    voxel_mm3 = float(GM_RES_MM**3)
    base_volume = np.bincount(labels.ravel(), weights=gm.ravel(), minlength=n_regions + 1)
    base_volume = base_volume[effects["index"]] * voxel_mm3 * BASE

    written: list[Path] = []
    for s_idx, site in enumerate(SITES):
        root = out_dir / site["name"]
        parts = _participants(site, s_idx)
        tsv = parts.copy()
        if "missing_age" in site:
            tsv["age"] = tsv["age"].astype(object)
            tsv.loc[site["missing_age"], "age"] = "n/a"
        (root).mkdir(parents=True, exist_ok=True)
        tsv.to_csv(root / "participants.tsv", sep="\t", index=False, lineterminator="\n")
        _write_json(root / "participants.json", _participants_json(site))
        _write_json(
            root / "dataset_description.json",
            {
                "Name": f"fednipype example {site['name']}",
                "BIDSVersion": "1.9.0",
                "DatasetType": "raw",
                "License": "CC0",
                "Authors": ["fednipype developers"],
                "HowToAcknowledge": "Synthetic data; see ground_truth.json and generate.py.",
            },
        )
        (root / "README").write_text(
            f"Synthetic example site {site['name']} of fednipype: {site['n']} participants, "
            "T1w images and grey-matter probability maps with planted age, group, sex and site "
            "effects. Made by bids_examples/generate.py; not real participants.\n"
        )
        _write_json(
            root / "T1w.json",
            {"MagneticFieldStrength": 3, "ManufacturersModelName": site["scanner"]},
        )
        deriv = root / "derivatives" / "segmentation"
        _write_json(
            deriv / "dataset_description.json",
            {
                "Name": f"Grey-matter segmentation of {site['name']}",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [
                    {
                        "Name": "fednipype-example-generator",
                        "Version": VERSION,
                        "Description": "bids_examples/generate.py",
                    }
                ],
                "SourceDatasets": [{"URL": f"file://../../{site['name']}"}],
            },
        )
        sessions = site["sessions"] or [None]
        male = (parts["sex"] == "M").to_numpy(float)
        patient = (parts["group"] == "patient").to_numpy(float)
        for i, row in parts.iterrows():
            sub = row["participant_id"]
            rng_subject = np.random.default_rng([SEED, s_idx, int(i), 99])
            u = rng_subject.normal(0.0, SD_SUBJECT, n_regions + 1)
            u[0] = 0.0
            factor_lut = (
                1.0
                + age_lut * (row["age"] - CENTER_AGE)
                + patient_lut * patient[i]
                + SEX_EFFECT * male[i]
                + site["offset"]
                + u
            )
            global_scale = 1.0 + rng_subject.normal(0.0, 0.02)
            for k, ses in enumerate(sessions):
                rng = np.random.default_rng([SEED, s_idx, int(i), k])
                prefix = f"{sub}_ses-{ses}" if ses else sub
                anat = Path(sub, f"ses-{ses}", "anat") if ses else Path(sub, "anat")
                p = (
                    gm
                    * BASE
                    * factor_lut[labels]
                    * (1.0 + rng.normal(0.0, site["noise"], gm.shape))
                )
                q = np.round(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
                img = nb.Nifti1Image(q, gm_affine)
                img.header.set_slope_inter(1.0 / 255.0, 0.0)
                img.header.set_xyzt_units("mm")
                img.header.set_sform(gm_affine, code=4)
                img.header.set_qform(gm_affine, code=4)
                path = deriv / anat / f"{prefix}_space-{SPACE}_label-GM_probseg.nii.gz"
                _save(img, path)
                t1_noise = rng.normal(0.0, site["noise"], t1.shape)
                t1_vals = site["t1_scale"] * global_scale * t1 * (1.0 + t1_noise)
                t1_vals[t1 <= 0.01] = 0.0
                img = nb.Nifti1Image(np.round(t1_vals).astype(np.int16), t1_affine)
                img.header.set_xyzt_units("mm")
                img.header.set_sform(t1_affine, code=1)
                img.header.set_qform(t1_affine, code=1)
                _save(img, root / anat / f"{prefix}_T1w.nii.gz")

    truth = {
        "description": (
            "Planted effects of bids_examples/generate.py. Regional grey-matter volume (mm3, "
            "sum of probabilities x voxel volume of the label-GM_probseg maps over the default "
            "atlas's regions resampled to the maps' grid) = intercept + age_slope * age + "
            "patient * [group == patient] + male * [sex == M] + site offset, plus noise."
        ),
        "generator_version": VERSION,
        "seed": SEED,
        "atlas": "fednipype default atlas (fednipype.atlas.default_atlas)",
        "center_age": CENTER_AGE,
        "base_fraction": BASE,
        "sd_subject_fraction": SD_SUBJECT,
        "sites": {
            site["name"]: {
                "n_participants": site["n"],
                "sessions": site["sessions"],
                "age_range": list(site["age_range"]),
                "t1w_intensity_scale": site["t1_scale"],
                "voxel_noise_sd_fraction": site["noise"],
                "offset_fraction": site["offset"],
            }
            for site in SITES
        },
        "patient_regions": sorted(PATIENT_REGIONS),
        "regions": [
            {
                "index": int(r["index"]),
                "name": r["name"],
                "baseline_volume_mm3": round(float(v), 3),
                "age_slope_fraction_per_year": float(r["age_slope"]),
                "age_slope_mm3_per_year": round(float(v * r["age_slope"]), 4),
                "patient_fraction": float(r["patient"]),
                "patient_mm3": round(float(v * r["patient"]), 4),
                "male_fraction": SEX_EFFECT,
                "male_mm3": round(float(v * SEX_EFFECT), 4),
                "site_offset_mm3": {
                    site["name"]: round(float(v * site["offset"]), 4) for site in SITES
                },
            }
            for (_, r), v in zip(effects.iterrows(), base_volume, strict=True)
        ],
    }
    _write_json(out_dir / "ground_truth.json", truth)
    written = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.suffix != ".py")
    return written


def digest(paths: list[Path], root: Path) -> dict[str, str]:
    """SHA-256 of each file, keyed by its path relative to ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python bids_examples/generate.py [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    files = generate(args.out)
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1e6:.1f} MB, under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
