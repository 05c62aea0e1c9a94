"""Regional feature extraction: correctness against independent references, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import tracemalloc
import warnings

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from _features_fixtures import (
    BUNDLED,
    SPACE,
    block_atlas,
    probseg_path,
    reference_features,
    save_nifti,
    truncate_gzip,
    write_dseg_tsv,
    write_html,
)

from fednipype.atlas import default_atlas
from fednipype.exceptions import BIDSError, ImageError
from fednipype.features import (
    FEATURE_COLUMNS,
    extract_features,
    read_features,
    read_sidecar,
    write_features,
)
from fednipype.grids import read_label_table

AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE_2MM[:3, 3] = [-11.0, -13.0, -9.0]


@pytest.fixture
def small_case(tmp_path):
    """A 12x14x10 probability map with NaNs and a 5-region hand-built atlas on its grid."""
    rng = np.random.default_rng(42)
    labels = block_atlas()
    data = rng.uniform(0.0, 1.0, labels.shape).astype(np.float32)
    data[rng.uniform(size=labels.shape) < 0.03] = np.nan
    image = save_nifti(
        tmp_path / f"sub-01_space-{SPACE}_label-GM_probseg.nii.gz", data, AFFINE_2MM
    )
    atlas = save_nifti(tmp_path / f"tpl-{SPACE}_atlas-blocks_dseg.nii.gz", labels, AFFINE_2MM)
    names = [f"block{i}" for i in range(1, 6)]
    tsv = write_dseg_tsv(tmp_path / f"tpl-{SPACE}_atlas-blocks_dseg.tsv", range(1, 6), names)
    return {"image": image, "atlas": atlas, "tsv": tsv, "data": data, "labels": labels}


def assert_matches_reference(table: pd.DataFrame, expected: list[dict], rtol=1e-10) -> None:
    ref = pd.DataFrame(expected)
    assert table["index"].tolist() == ref["index"].tolist()
    np.testing.assert_array_equal(table["voxel_count"], ref["voxel_count"])
    np.testing.assert_array_equal(table["nan_count"], ref["nan_count"])
    for column in ("volume_mm3", "mean", "std"):
        np.testing.assert_allclose(table[column], ref[column], rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


def test_probseg_matches_per_region_numpy(small_case):
    result = extract_features(small_case["image"], small_case["atlas"], small_case["tsv"])
    data = small_case["data"].astype(np.float64)
    expected = reference_features(data, small_case["labels"], range(1, 6), 8.0, "probseg")
    assert list(result.table.columns) == list(FEATURE_COLUMNS)
    assert result.table["nan_count"].sum() > 0  # the NaNs were in regions, and were counted
    assert_matches_reference(result.table, expected)
    assert result.table["name"].tolist() == [f"block{i}" for i in range(1, 6)]


def test_intensity_volume_is_count_times_anisotropic_voxel_volume(tmp_path):
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    labels = block_atlas(shape=(9, 8, 7), n_regions=4, seed=3)
    data = np.random.default_rng(1).normal(600, 80, labels.shape).round().astype(np.int16)
    image = save_nifti(tmp_path / "sub-01_T1w.nii.gz", data, affine)
    atlas = save_nifti(tmp_path / "atlas.nii.gz", labels, affine)
    tsv = write_dseg_tsv(tmp_path / "atlas.tsv", range(1, 5), list("abcd"))
    table = extract_features(image, atlas, tsv, image_kind="intensity").table
    expected = reference_features(data.astype(float), labels, range(1, 5), 9.0, "intensity")
    assert_matches_reference(table, expected)


def test_scaled_uint8_probseg_uses_the_file_scaling(tmp_path):
    labels = block_atlas(seed=5)
    raw = np.random.default_rng(2).integers(0, 256, labels.shape).astype(np.uint8)
    img = nb.Nifti1Image(raw, AFFINE_2MM)
    img.header.set_slope_inter(1 / 255, 0.0)
    image = tmp_path / "sub-01_label-GM_probseg.nii.gz"
    img.to_filename(image)
    atlas = save_nifti(tmp_path / "atlas.nii.gz", labels, AFFINE_2MM)
    tsv = write_dseg_tsv(tmp_path / "atlas.tsv", range(1, 6), list("abcde"))
    table = extract_features(image, atlas, tsv).table
    expected = reference_features(nb.load(image).get_fdata(), labels, range(1, 6), 8.0, "probseg")
    assert_matches_reference(table, expected)


def test_atlas_on_finer_grid_of_the_same_space_is_resampled_nearest(tmp_path):
    """A 1 mm atlas sampled at 2 mm voxel centres: labels1mm[::2, ::2, ::2] exactly."""
    fine = block_atlas(shape=(24, 28, 20), n_regions=6, seed=7)
    affine_1mm = np.diag([1.0, 1.0, 1.0, 1.0])
    affine_2mm = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.random.default_rng(3).uniform(0, 1, (12, 14, 10))
    image = save_nifti(tmp_path / "img.nii.gz", data, affine_2mm, np.float32)
    atlas = save_nifti(tmp_path / "atlas.nii.gz", fine, affine_1mm)
    tsv = write_dseg_tsv(tmp_path / "atlas.tsv", range(1, 7), list("abcdef"))
    result = extract_features(image, atlas, tsv)
    coarse = fine[::2, ::2, ::2]
    expected = reference_features(
        data.astype(np.float32).astype(float), coarse, range(1, 7), 8.0, "probseg"
    )
    assert_matches_reference(result.table, expected, rtol=1e-7)
    assert result.sidecar["Atlas"]["ResampledToImageGrid"] is True


def test_mask_restricts_voxels_and_may_be_on_another_grid(small_case, tmp_path):
    rng = np.random.default_rng(9)
    mask = rng.uniform(size=small_case["labels"].shape) < 0.7
    same_grid = save_nifti(tmp_path / "mask.nii.gz", mask.astype(np.uint8), AFFINE_2MM)
    # The same mask on a 1 mm grid (each 2 mm voxel = 2x2x2 block), resampled back by NN.
    fine_affine = AFFINE_2MM.copy()
    fine_affine[:3, :3] = np.eye(3)
    fine = np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2).astype(np.uint8)
    other_grid = save_nifti(tmp_path / "mask_1mm.nii.gz", fine, fine_affine)
    data = small_case["data"].astype(np.float64)
    expected = reference_features(data, small_case["labels"], range(1, 6), 8.0, "probseg", mask)
    for mask_file in (same_grid, other_grid):
        result = extract_features(
            small_case["image"], small_case["atlas"], small_case["tsv"], mask_file=mask_file
        )
        assert_matches_reference(result.table, expected)
        assert result.sidecar["Mask"] == mask_file.name
        image_total = result.sidecar["Totals"]["Image"]
        inside = data[mask]
        assert image_total["voxel_count"] == int(np.isfinite(inside).sum())
        assert image_total["volume_mm3"] == pytest.approx(np.nansum(inside) * 8.0, rel=1e-9)


def test_flipped_storage_orientation_gives_the_same_features(small_case, tmp_path):
    """LAS storage of the same image (x axis reversed, affine adjusted): same world, same table."""
    data = small_case["data"]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    affine = AFFINE_2MM @ flip
    image = save_nifti(tmp_path / "flipped.nii.gz", data[::-1], affine)
    ours = extract_features(image, small_case["atlas"], small_case["tsv"]).table
    ref = extract_features(small_case["image"], small_case["atlas"], small_case["tsv"]).table
    pd.testing.assert_frame_equal(ours, ref, rtol=1e-12)


def test_singleton_fourth_dimension_is_squeezed(small_case, tmp_path):
    image = save_nifti(tmp_path / "img4d.nii.gz", small_case["data"][..., None], AFFINE_2MM)
    ours = extract_features(image, small_case["atlas"], small_case["tsv"]).table
    ref = extract_features(small_case["image"], small_case["atlas"], small_case["tsv"]).table
    pd.testing.assert_frame_equal(ours, ref)


def test_second_atlas_fmriprep_style_table(tmp_path):
    """A user atlas: other labels (sparse, > 255), quoted names, a color column."""
    base = block_atlas(shape=(10, 11, 9), n_regions=4, seed=11)
    values = np.array([0, 3, 7, 11, 300], dtype=np.uint16)
    labels = values[base]
    names = ["7Networks_LH_Vis_1", "7Networks_LH_SomMot_1", "7Networks_RH_Default_2", "Left Amy"]
    atlas = save_nifti(tmp_path / "tpl-X_atlas-Schaefer_dseg.nii.gz", labels, AFFINE_2MM)
    tsv = write_dseg_tsv(tmp_path / "dseg.tsv", values[1:], names, fmriprep_style=True)
    assert '"7Networks_LH_Vis_1"' in tsv.read_text()
    data = np.random.default_rng(4).uniform(0, 1, labels.shape)
    image = save_nifti(tmp_path / "img.nii.gz", data, AFFINE_2MM)
    result = extract_features(image, atlas, tsv, atlas_name="Schaefer2018")
    assert result.table["name"].tolist() == names
    expected = reference_features(data, labels, values[1:], 8.0, "probseg")
    assert_matches_reference(result.table, expected)
    assert result.sidecar["Atlas"]["Name"] == "Schaefer2018"
    assert read_label_table(tsv)["index"].tolist() == [3, 7, 11, 300]


def test_region_means_equal_nilearn_labels_masker(tmp_path):
    """Bundled data: a 3 mm probability map and a 4 mm T1w, 2 mm atlas resampled by both."""
    from nilearn.maskers import NiftiLabelsMasker

    atlas = default_atlas(2)
    site = BUNDLED / "siteA"
    images = [
        (probseg_path(site, "03", "1"), "probseg"),
        (site / "sub-05" / "ses-2" / "anat" / "sub-05_ses-2_T1w.nii.gz", "intensity"),
    ]
    for path, kind in images:
        table = extract_features(path, atlas.image, atlas.labels, image_kind=kind).table
        masker = NiftiLabelsMasker(
            labels_img=str(atlas.image), resampling_target="data", strategy="mean"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            means = np.asarray(masker.fit_transform(str(path))).ravel()
        ids = [masker.region_ids_[i] for i in range(len(means))]
        nilearn_means = pd.Series(means, index=ids)
        ours = table.set_index("index")["mean"]
        assert len(ids) == 100
        np.testing.assert_allclose(ours.loc[ids].to_numpy(), nilearn_means.to_numpy(), atol=1e-6)


def test_planted_age_slope_is_recovered_from_the_bundled_sites():
    """OLS per region over all sites (siteA ses-1 only): volume ~ age + sex + group + site.

    Tolerance: the planted slopes are 14-35 mm3/year and their standard errors ~1 mm3/year
    (n ~ 98, age SD ~ 17 years, residual SD ~ 2 % of the volume), so the estimates must have
    the planted sign everywhere, lie within 3 standard errors of the truth in at least 95 of
    the 100 regions (99.7 % expected under the model) and within 25 % in every region.
    """
    import statsmodels.api as sm

    from fednipype.bids import read_participants

    atlas = default_atlas(2)
    truth = json.loads((BUNDLED / "ground_truth.json").read_text())
    rows, volumes = [], []
    for site in ("siteA", "siteB", "siteC"):
        participants = read_participants(BUNDLED / site)
        session = "1" if site == "siteA" else None
        for pid, row in participants.iterrows():
            if pd.isna(row["age"]):
                continue  # siteC has one n/a age
            path = probseg_path(BUNDLED / site, pid.removeprefix("sub-"), session)
            table = extract_features(path, atlas.image, atlas.labels).table
            volumes.append(table["volume_mm3"].to_numpy())
            rows.append(
                {
                    "age": row["age"],
                    "male": float(row["sex"] == "M"),
                    "patient": float(row["group"] == "patient"),
                    "siteB": float(site == "siteB"),
                    "siteC": float(site == "siteC"),
                }
            )
    design = sm.add_constant(pd.DataFrame(rows))
    y = np.vstack(volumes)
    assert y.shape == (24 + 30 + 44, 100)
    true_slopes = np.array([r["age_slope_mm3_per_year"] for r in truth["regions"]])
    estimates, errors = np.empty(100), np.empty(100)
    for r in range(100):
        fit = sm.OLS(y[:, r], design).fit()
        estimates[r], errors[r] = fit.params["age"], fit.bse["age"]
    assert np.all(np.sign(estimates) == np.sign(true_slopes))
    z = np.abs(estimates - true_slopes) / errors
    assert np.sum(z < 3) >= 95, np.sort(z)[-10:]
    assert np.all(np.abs(estimates - true_slopes) <= 0.25 * np.abs(true_slopes))


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def test_regions_outside_the_field_of_view_are_zero_count_and_na(small_case, tmp_path):
    """Slab regions along x; the image covers only the first half of the atlas's x range."""
    labels = np.zeros((12, 14, 10), dtype=np.uint8)
    for region in range(1, 6):
        labels[2 * region : 2 * region + 2, 2:12, 2:8] = region
    atlas = save_nifti(tmp_path / "slabs.nii.gz", labels, AFFINE_2MM)
    data = small_case["data"][:6]
    image = save_nifti(tmp_path / "cropped.nii.gz", data, AFFINE_2MM)
    result = extract_features(image, atlas, small_case["tsv"])
    expected = reference_features(data.astype(float), labels[:6], range(1, 6), 8.0, "probseg")
    assert_matches_reference(result.table, expected)
    empty = result.table["voxel_count"] == 0
    assert empty.tolist() == [False, False, True, True, True]
    out_tsv, out_json = write_features(result, tmp_path / "out" / "features.tsv")
    text = out_tsv.read_text()
    assert text.splitlines()[0].split("\t") == list(FEATURE_COLUMNS)
    assert "n/a" in text and "nan" not in text.lower().replace("nan_count", "")
    back = read_features(out_tsv)
    assert back.loc[empty.to_numpy(), ["volume_mm3", "mean", "std"]].isna().all().all()
    pd.testing.assert_frame_equal(back, result.table, check_dtype=False, rtol=1e-10)
    assert out_json.name == "features.json"


def test_sidecar_totals_and_provenance(small_case, tmp_path):
    result = extract_features(small_case["image"], small_case["atlas"], small_case["tsv"])
    out_tsv, _ = write_features(result, tmp_path / "sub-01_desc-regional_features.tsv")
    sidecar = read_sidecar(out_tsv)
    data = small_case["data"].astype(np.float64)
    labelled = data[small_case["labels"] > 0]
    regions = sidecar["Totals"]["AtlasRegions"]
    assert regions["voxel_count"] == int(np.isfinite(labelled).sum())
    assert regions["nan_count"] == int(np.isnan(labelled).sum())
    assert regions["volume_mm3"] == pytest.approx(np.nansum(labelled) * 8.0, rel=1e-12)
    assert regions["mean"] == pytest.approx(np.nanmean(labelled), rel=1e-12)
    assert regions["std"] == pytest.approx(np.nanstd(labelled), rel=1e-10)
    image = sidecar["Totals"]["Image"]
    assert image["nan_count"] == int(np.isnan(data).sum())
    assert image["volume_mm3"] == pytest.approx(np.nansum(data) * 8.0, rel=1e-9)
    assert sidecar["Units"] == "mm3" and sidecar["volume_mm3"]["Units"] == "mm3"
    assert sidecar["ImageKind"] == "probseg" and sidecar["ValueUnits"] == "probability"
    assert sidecar["StdDdof"] == 0
    assert sidecar["Space"] == SPACE
    assert sidecar["Atlas"]["Name"] == "blocks"
    digest = hashlib.sha256(small_case["atlas"].read_bytes()).hexdigest()
    assert sidecar["Atlas"]["ImageSha256"] == digest
    assert str(tmp_path) not in json.dumps(sidecar)  # file names only, no paths


def test_read_features_validates_columns_and_values(small_case, tmp_path):
    result = extract_features(small_case["image"], small_case["atlas"], small_case["tsv"])
    good, _ = write_features(result, tmp_path / "good.tsv")
    frame = pd.read_csv(good, sep="\t", dtype=str, keep_default_na=False)

    missing = tmp_path / "missing.tsv"
    frame.drop(columns=["std"]).to_csv(missing, sep="\t", index=False)
    with pytest.raises(BIDSError, match=r"missing.tsv.*missing \['std'\]"):
        read_features(missing)
    bad = tmp_path / "bad.tsv"
    frame.assign(voxel_count="many").to_csv(bad, sep="\t", index=False)
    with pytest.raises(BIDSError, match="bad.tsv.*'voxel_count'"):
        read_features(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(BIDSError, match="empty.tsv"):
        read_features(empty)


def test_peak_memory_stays_below_three_float64_copies(tmp_path):
    """tracemalloc (deterministic, not a timing), worst case: every voxel labelled, cold cache.

    Realistic atlases label 15-25 % of the grid (about 1.2x); here 100 %.
    """
    shape = (96, 112, 96)
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, shape).astype(np.float32)
    labels = rng.integers(1, 51, shape).astype(np.uint8)
    image = save_nifti(tmp_path / "big.nii.gz", data, np.eye(4))
    atlas = save_nifti(tmp_path / "atlas.nii.gz", labels, np.eye(4))
    tsv = write_dseg_tsv(tmp_path / "atlas.tsv", range(1, 51), [f"r{i}" for i in range(1, 51)])
    tracemalloc.start()
    extract_features(image, atlas, tsv)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 3 * data.size * 8


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a clear ImageError naming the file
# ---------------------------------------------------------------------------------------------


def _bundled_copy(tmp_path, name="sub-01_space-X_probseg.nii.gz"):
    dst = tmp_path / name
    dst.write_bytes(probseg_path(BUNDLED / "siteB", "01").read_bytes())
    return dst


def _zero_byte(tmp_path):
    path = tmp_path / "zero.nii.gz"
    path.write_bytes(b"")
    return path


def _truncated(tmp_path):
    path = _bundled_copy(tmp_path, "truncated.nii.gz")
    truncate_gzip(path)
    return path


def _html_gz(tmp_path):
    path = tmp_path / "download.nii.gz"
    write_html(path)
    return path


def _html_nii(tmp_path):
    path = tmp_path / "download.nii"
    write_html(path)
    return path


def _four_d(tmp_path):
    data = np.random.default_rng(0).uniform(0, 1, (12, 14, 10, 2))
    return save_nifti(tmp_path / "fourd.nii.gz", data, AFFINE_2MM)


def _all_nan(tmp_path):
    return save_nifti(tmp_path / "allnan.nii.gz", np.full((12, 14, 10), np.nan), AFFINE_2MM)


def _negative(tmp_path):
    data = np.random.default_rng(0).uniform(0, 1, (12, 14, 10))
    data[5, 5, 5] = -0.2
    return save_nifti(tmp_path / "negative.nii.gz", data, AFFINE_2MM)


def _percent(tmp_path):
    data = np.random.default_rng(0).uniform(0, 100, (12, 14, 10))
    return save_nifti(tmp_path / "percent.nii.gz", data, AFFINE_2MM)


BAD_IMAGES = {
    "zero-byte": (_zero_byte, "empty \\(zero-byte\\)"),
    "truncated .nii.gz": (_truncated, "truncated or corrupt"),
    "HTML named .nii.gz": (_html_gz, "cannot read the image as a NIfTI image"),
    "HTML named .nii": (_html_nii, "cannot read the image as a NIfTI image"),
    "4-D": (_four_d, "expected a 3-D image"),
    "all NaN": (_all_nan, "every voxel of the image is NaN"),
    "negative probability": (_negative, "probability map has values in \\[-0.2"),
    "percent map": (_percent, "expected probabilities in \\[0, 1\\]"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_raises_image_error_naming_the_file(case, small_case, tmp_path):
    make, message = BAD_IMAGES[case]
    path = make(tmp_path)
    with pytest.raises(ImageError, match=message) as err:
        extract_features(path, small_case["atlas"], small_case["tsv"])
    assert str(path) in str(err.value)


def test_tiny_negative_probabilities_are_tolerated(small_case, tmp_path):
    data = np.abs(small_case["data"])
    data[3, 3, 3] = -1e-6  # interpolation round-off
    image = save_nifti(tmp_path / "roundoff.nii.gz", data, AFFINE_2MM)
    extract_features(image, small_case["atlas"], small_case["tsv"])


def test_oblique_atlas_grid_is_refused(small_case, tmp_path):
    """A different shape and an affine rotated 30 degrees: not the same space."""
    angle = np.deg2rad(30)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = AFFINE_2MM.copy()
    affine[:3, :3] = rot @ affine[:3, :3]
    atlas = save_nifti(tmp_path / "oblique_atlas.nii.gz", block_atlas((9, 9, 9)), affine)
    with pytest.raises(ImageError, match="oblique") as err:
        extract_features(small_case["image"], atlas, small_case["tsv"])
    assert str(atlas) in str(err.value) and str(small_case["image"]) in str(err.value)


def test_atlas_grid_that_does_not_overlap_is_refused(small_case, tmp_path):
    affine = AFFINE_2MM.copy()
    affine[:3, 3] += 500.0  # half a metre away
    atlas = save_nifti(tmp_path / "far_atlas.nii.gz", block_atlas((8, 9, 7)), affine)
    with pytest.raises(ImageError, match="do not overlap") as err:
        extract_features(small_case["image"], atlas, small_case["tsv"])
    assert str(atlas) in str(err.value)


def test_empty_atlas_is_an_error(small_case, tmp_path):
    atlas = save_nifti(
        tmp_path / "empty_atlas.nii.gz", np.zeros((12, 14, 10), np.uint8), AFFINE_2MM
    )
    with pytest.raises(ImageError, match="no label > 0") as err:
        extract_features(small_case["image"], atlas, small_case["tsv"])
    assert str(atlas) in str(err.value)


def test_atlas_labels_missing_from_the_table_are_an_error(small_case, tmp_path):
    tsv = write_dseg_tsv(tmp_path / "short.tsv", [1, 2, 3], ["a", "b", "c"])
    with pytest.raises(ImageError, match=r"labels \[4, 5\] absent from the label table") as err:
        extract_features(small_case["image"], small_case["atlas"], tsv)
    assert str(small_case["atlas"]) in str(err.value) and str(tsv) in str(err.value)


def test_table_rows_missing_from_the_atlas_warn_and_give_zero_rows(small_case, tmp_path, caplog):
    tsv = write_dseg_tsv(tmp_path / "long.tsv", [1, 2, 3, 4, 5, 9], list("abcdez"))
    with caplog.at_level(logging.WARNING, logger="fednipype.features"):
        table = extract_features(small_case["image"], small_case["atlas"], tsv).table
    assert "absent from the atlas image" in caplog.text and str(tsv) in caplog.text
    row = table.set_index("index").loc[9]
    assert row["voxel_count"] == 0 and row["nan_count"] == 0
    assert np.isnan(row[["volume_mm3", "mean", "std"]].astype(float)).all()


def test_explicit_space_mismatch_is_an_error(small_case, tmp_path):
    atlas = tmp_path / "tpl-MNI152NLin6Asym_atlas-blocks_dseg.nii.gz"
    atlas.write_bytes(small_case["atlas"].read_bytes())
    with pytest.raises(ImageError, match="space 'MNI152NLin2009cAsym'.*'MNI152NLin6Asym'") as err:
        extract_features(small_case["image"], atlas, small_case["tsv"])
    assert str(small_case["image"]) in str(err.value)


def test_label_table_without_name_column_is_an_error(small_case, tmp_path):
    tsv = tmp_path / "noname.tsv"
    tsv.write_text("index\tlabel\n1\ta\n")
    with pytest.raises(ImageError, match="noname.tsv.*'name'"):
        extract_features(small_case["image"], small_case["atlas"], tsv)
