"""The bundled example sites: reproducible byte for byte, small, with the promised structure."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pandas as pd
from support import BUNDLED, SITES


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", BUNDLED / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.name == "ground_truth.json" or p.parts[len(root.parts)] in SITES)
    }


def test_generator_reproduces_committed_files_byte_for_byte(tmp_path):
    _load_generator().generate(tmp_path)
    regenerated = _digests(tmp_path)
    committed = _digests(BUNDLED)
    assert len(committed) > 200
    assert sorted(regenerated) == sorted(committed)
    changed = [name for name in committed if committed[name] != regenerated[name]]
    assert changed == []


def test_bundled_examples_stay_small():
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total < 25 * 1024**2


def test_sites_have_the_promised_structure():
    sizes = []
    sessions = []
    for site in SITES:
        root = BUNDLED / site
        assert json.loads((root / "dataset_description.json").read_text())["DatasetType"] == "raw"
        deriv = root / "derivatives" / "segmentation" / "dataset_description.json"
        assert json.loads(deriv.read_text())["DatasetType"] == "derivative"
        table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
        assert {"participant_id", "age", "sex", "group"} <= set(table.columns)
        assert set(table["group"]) == {"patient", "control"}
        meta = json.loads((root / "participants.json").read_text())
        assert {"age", "sex", "group"} <= set(meta)
        sizes.append(len(table))
        sessions.append(len({p.name for p in root.glob("sub-*/ses-*")}))
        maps = list(
            root.glob(
                "derivatives/segmentation/sub-*/**/*_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
            )
        )
        assert len(maps) == len(list(root.glob("sub-*/**/anat/*_T1w.nii.gz"))) > 0
    assert len(set(sizes)) == len(SITES)  # sites differ in size
    assert max(sessions) >= 2
    na_rows = sum(
        (
            pd.read_csv(
                BUNDLED / s / "participants.tsv", sep="\t", dtype=str, keep_default_na=False
            )
            == "n/a"
        ).any(axis=None)
        for s in SITES
    )
    assert na_rows >= 1


def test_images_have_content():
    import nibabel as nb
    import numpy as np

    for path in [
        next(BUNDLED.glob("siteA/sub-01/ses-1/anat/*_T1w.nii.gz")),
        next(BUNDLED.glob("siteA/derivatives/segmentation/sub-01/ses-1/anat/*probseg.nii.gz")),
    ]:
        data = np.asarray(nb.load(path).dataobj, dtype=float)
        assert data.ndim == 3 and np.isfinite(data).all()
        assert data.std() > 0 and (data > 0).mean() > 0.05


def test_ground_truth_is_outside_the_bids_trees_and_complete():
    truth = json.loads((BUNDLED / "ground_truth.json").read_text())
    assert len(truth["regions"]) == 100
    assert set(truth["sites"]) == set(SITES)
    assert all(r["age_slope_mm3_per_year"] < 0 for r in truth["regions"])
    patient = [r["name"] for r in truth["regions"] if r["patient_mm3"] != 0]
    assert sorted(patient) == truth["patient_regions"]
    offsets = {tuple(r["site_offset_mm3"].values()) for r in truth["regions"][:1]}
    assert len(set(next(iter(offsets)))) == len(SITES)  # sites differ
