"""The example pipelines in workflows/ run, and write what the library computes."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from support import BUNDLED, REPO

from fednipype.atlas import default_atlas
from fednipype.features import extract_features


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("site", "expected"),
    [
        ("siteA", [f"sub-{s}_ses-{k}" for s in ("01", "02") for k in ("1", "2")]),
        ("siteB", ["sub-01", "sub-02"]),  # no sessions
    ],
)
def test_features_after_segmentation_example(site, expected, tmp_path):
    example = _load("features_after_segmentation")
    out = tmp_path / "out"
    code = example.main(
        [
            str(BUNDLED / site),
            str(out),
            "--participant-label",
            "01",
            "sub-02",
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    written = sorted(out.rglob("*_desc-regional_features.tsv"))
    names = "_space-MNI152NLin2009cAsym_atlas-fednipype_desc-regional_features.tsv"
    assert [p.name for p in written] == [f"{e}{names}" for e in expected]
    atlas = default_atlas(2)
    for tsv, prefix in zip(written, expected, strict=True):
        source = next((BUNDLED / site / "derivatives").rglob(f"{prefix}_*_probseg.nii.gz"))
        expected_table = extract_features(source, atlas.image, atlas.labels).table
        pd.testing.assert_series_equal(
            pd.read_csv(tsv, sep="\t")["volume_mm3"], expected_table["volume_mm3"], rtol=1e-9
        )
        assert tsv.with_suffix(".json").is_file()
