"""The participant workflow: every bundled site, Nipype's cache, and failures kept per subject."""

from __future__ import annotations

import json
import logging
import re

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from _features_fixtures import (
    BUNDLED,
    copy_site,
    probseg_path,
    save_nifti,
    truncate_gzip,
    write_html,
)

from fednipype.atlas import default_atlas
from fednipype.cli.participant import run_participant_wf
from fednipype.features import extract_features, read_features, read_sidecar

SITES = ("siteA", "siteB", "siteC")
#: Entities after subject and session in the name of a feature table of the default atlas.
NAME = "_space-MNI152NLin2009cAsym_atlas-fednipype_desc-regional_features"
PROBSEG = re.compile(
    r"^(?P<prefix>sub-[^_]+(_ses-[^_]+)?)_space-MNI152NLin2009cAsym_label-GM_probseg\.nii\.gz$"
)


def expected_outputs(site_dir) -> set[str]:
    """Relative paths the derivatives should have, derived from the inputs' names alone."""
    expected = set()
    for path in (site_dir / "derivatives" / "segmentation").rglob("*_probseg.nii.gz"):
        match = PROBSEG.match(path.name)
        if match:
            rel = path.parent.relative_to(site_dir / "derivatives" / "segmentation")
            expected.add(f"{rel}/{match['prefix']}{NAME}.tsv")
    return expected


@pytest.fixture(scope="module")
def site_runs(tmp_path_factory):
    """Run the workflow once on each bundled site (MultiProc, 2 processes)."""
    root = tmp_path_factory.mktemp("participant")
    runs = {}
    for site in SITES:
        result = run_participant_wf(
            bids_dir=BUNDLED / site,
            output_dir=root / site / "fednipype",
            work_dir=root / site / "work",
            plugin="MultiProc",
            plugin_args={"n_procs": 2},
        )
        runs[site] = (result, root / site)
    return runs


@pytest.mark.parametrize("site", SITES)
def test_every_subject_session_gets_a_bids_derivative(site, site_runs):
    result, root = site_runs[site]
    out = root / "fednipype"
    expected = expected_outputs(BUNDLED / site)
    assert len(expected) == {"siteA": 48, "siteB": 30, "siteC": 45}[site]
    written = {
        str(p.relative_to(out)) for p in out.rglob("*_features.tsv") if not p.name.startswith(".")
    }
    assert written == expected
    assert result.ok and result.n_jobs == len(expected) == len(result.outputs)
    for rel in expected:
        table = read_features(out / rel)
        assert len(table) == 100 and (table["voxel_count"] > 0).all()
        assert (out / rel).with_suffix(".json").is_file()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "fednipype"


def test_workflow_outputs_equal_the_library(site_runs):
    result, root = site_runs["siteA"]
    atlas = default_atlas(2)
    tsv = root / "fednipype" / "sub-11" / "ses-2" / "anat" / f"sub-11_ses-2{NAME}.tsv"
    direct = extract_features(
        probseg_path(BUNDLED / "siteA", "11", "2"), atlas.image, atlas.labels
    )
    pd.testing.assert_frame_equal(read_features(tsv), direct.table, check_dtype=False, rtol=1e-10)
    assert read_sidecar(tsv)["Atlas"]["ImageSha256"] == direct.sidecar["Atlas"]["ImageSha256"]


def test_rerun_uses_nipype_cache(site_runs):
    """Second run, same work_dir: no feature node re-executes and no output is rewritten."""
    result, root = site_runs["siteB"]
    work = root / "work"
    node_results = sorted(work.rglob("result_features.pklz"))
    assert len(node_results) == 30
    outputs = sorted((root / "fednipype").rglob("*_features.*"))
    before = {p: p.stat().st_mtime_ns for p in node_results + outputs}
    again = run_participant_wf(
        bids_dir=BUNDLED / "siteB",
        output_dir=root / "fednipype",
        work_dir=work,
        plugin="MultiProc",
        plugin_args={"n_procs": 2},
    )
    assert again.ok and len(again.outputs) == 30
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _break(site_dir):
    """Break six subjects' maps, each differently; return subject -> expected message."""
    rng = np.random.default_rng(0)
    affine = nb.load(probseg_path(site_dir, "08")).affine
    shape = nb.load(probseg_path(site_dir, "08")).shape
    probseg_path(site_dir, "01").write_bytes(b"")
    truncate_gzip(probseg_path(site_dir, "02"))
    write_html(probseg_path(site_dir, "03"))
    save_nifti(probseg_path(site_dir, "04"), rng.uniform(0, 1, (*shape, 2)), affine)
    save_nifti(probseg_path(site_dir, "05"), np.full(shape, np.nan, dtype=np.float32), affine)
    negative = rng.uniform(0, 1, shape)
    negative[30, 30, 30] = -0.3
    save_nifti(probseg_path(site_dir, "06"), negative, affine)
    return {
        "01": "empty (zero-byte)",
        "02": "truncated or corrupt",
        "03": "cannot read the image as a NIfTI image",
        "04": "expected a 3-D image",
        "05": "every voxel of the image is NaN",
        "06": "probability map has values in [-0.3",
    }


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_broken_subjects_fail_alone_with_their_reason(plugin, tmp_path, caplog):
    subjects = [f"{i:02d}" for i in range(1, 10)]
    site = copy_site("siteB", tmp_path, subjects)
    reasons = _break(site)
    with caplog.at_level(logging.INFO, logger="fednipype.cli.participant"):
        result = run_participant_wf(
            bids_dir=site,
            output_dir=tmp_path / "out" / "fednipype",
            work_dir=tmp_path / "work",
            plugin=plugin,
            plugin_args={"n_procs": 2} if plugin == "MultiProc" else None,
        )
    assert not result.ok and result.n_jobs == 9
    done = sorted(o["subject"] for o in result.outputs)
    assert done == ["07", "08", "09"]
    for subject in done:
        tsv = tmp_path / "out" / "fednipype" / f"sub-{subject}" / "anat"
        assert len(read_features(tsv / f"sub-{subject}{NAME}.tsv")) == 100
    failures = {f.subject: f for f in result.failures}
    assert sorted(failures) == sorted(reasons)
    for subject, reason in reasons.items():
        failure = failures[subject]
        path = str(probseg_path(site, subject))
        assert failure.in_file == path and failure.session is None
        assert reason in failure.error and path in failure.error
        assert "ImageError" in failure.error
        assert f"sub-{subject}" in str(failure)
        assert reason in caplog.text
    assert not list((tmp_path / "out" / "fednipype").glob("sub-0[1-6]/anat/*.tsv"))
