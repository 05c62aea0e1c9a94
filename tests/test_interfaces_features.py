"""Nipype interfaces of the feature step: RegionalFeatures and the derivatives sink."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _features_fixtures import BUNDLED, probseg_path, save_nifti, write_dseg_tsv
from nipype.pipeline import engine as pe

from fednipype.atlas import default_atlas
from fednipype.exceptions import BIDSError
from fednipype.features import read_features, read_sidecar
from fednipype.interfaces.bids import DerivativeDescription, DerivativesDataSink
from fednipype.interfaces.features import RegionalFeatures


def test_regional_features_writes_table_and_sidecar_in_its_cwd(tmp_path, monkeypatch):
    """The interface's table equals a per-region numpy computation on the same files."""
    import nibabel as nb
    from nibabel.processing import resample_from_to

    monkeypatch.chdir(tmp_path)
    atlas = default_atlas(2)
    image = probseg_path(BUNDLED / "siteB", "07")
    result = RegionalFeatures(
        in_file=str(image), atlas_file=str(atlas.image), atlas_labels=str(atlas.labels)
    ).run()
    out_tsv, out_json = result.outputs.out_tsv, result.outputs.out_json
    assert out_tsv.startswith(str(tmp_path)) and out_json.startswith(str(tmp_path))
    table = read_features(out_tsv)
    # Reference: the ground truth's own definition (generate.py), region by region.
    img = nb.load(image)
    labels = np.asarray(resample_from_to(nb.load(atlas.image), img, order=0).dataobj)
    data = img.get_fdata()
    expected = [data[labels == i].sum() * 27.0 for i in table["index"]]
    np.testing.assert_allclose(table["volume_mm3"], expected, rtol=1e-9)
    sidecar = read_sidecar(out_tsv)
    assert sidecar == json.loads(open(out_json).read())
    assert sidecar["Atlas"]["Name"] == "fednipype" and sidecar["ImageKind"] == "probseg"


def test_regional_features_intensity_and_mask(tmp_path):
    labels = np.zeros((6, 7, 5), dtype=np.uint8)
    labels[1:3, 1:6, 1:4], labels[3:5, 1:6, 1:4] = 1, 2
    data = np.arange(labels.size, dtype=np.int16).reshape(labels.shape)
    mask = np.ones(labels.shape, dtype=np.uint8)
    mask[:, :3] = 0
    affine = np.eye(4)
    node = pe.Node(
        RegionalFeatures(
            in_file=str(save_nifti(tmp_path / "t1.nii.gz", data, affine)),
            atlas_file=str(save_nifti(tmp_path / "atlas.nii.gz", labels, affine)),
            atlas_labels=str(write_dseg_tsv(tmp_path / "atlas.tsv", [1, 2], ["left", "right"])),
            mask_file=str(save_nifti(tmp_path / "mask.nii.gz", mask, affine)),
            image_kind="intensity",
        ),
        name="features",
        base_dir=str(tmp_path / "work"),
    )
    table = read_features(node.run().outputs.out_tsv)
    for index in (1, 2):
        inside = (labels == index) & (mask > 0)
        row = table.set_index("index").loc[index]
        assert row["voxel_count"] == inside.sum() == row["volume_mm3"]
        assert row["mean"] == pytest.approx(data[inside].mean())
        assert row["std"] == pytest.approx(data[inside].std())


def test_regional_features_error_names_the_file(tmp_path):
    broken = tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
    broken.write_bytes(b"")
    atlas = default_atlas(2)
    node = pe.Node(
        RegionalFeatures(
            in_file=str(broken), atlas_file=str(atlas.image), atlas_labels=str(atlas.labels)
        ),
        name="features",
        base_dir=str(tmp_path / "work"),
    )
    with pytest.raises(Exception, match="zero-byte") as err:
        node.run()
    assert str(broken) in str(err.value)


def test_node_is_cached_on_rerun(tmp_path):
    atlas = default_atlas(2)
    image = probseg_path(BUNDLED / "siteC", "02")

    def make():
        return pe.Node(
            RegionalFeatures(
                in_file=str(image), atlas_file=str(atlas.image), atlas_labels=str(atlas.labels)
            ),
            name="features",
            base_dir=str(tmp_path / "work"),
        )

    first = make().run().outputs.out_tsv
    mtime = (tmp_path / "work" / "features" / "result_features.pklz").stat().st_mtime_ns
    second = make().run().outputs.out_tsv
    assert first == second
    assert (tmp_path / "work" / "features" / "result_features.pklz").stat().st_mtime_ns == mtime


def test_derivatives_sink_names_outputs_after_the_source_file(tmp_path):
    src = tmp_path / "features.tsv"
    src.write_text("index\tname\n1\ta\n")
    meta = tmp_path / "features.json"
    meta.write_text(json.dumps({"Units": "mm3"}))
    out = tmp_path / "derivatives"
    source = BUNDLED / "siteA" / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz"
    sink = DerivativesDataSink(
        base_directory=str(out),
        in_file=str(src),
        meta_file=str(meta),
        meta_dict={"Extra": 1},
        source_file=str(source),
        desc="regional",
        suffix="features",
    )
    result = sink.run().outputs
    expected = out / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_desc-regional_features.tsv"
    assert result.out_file == str(expected) and expected.read_text() == src.read_text()
    sidecar = expected.with_suffix(".json")
    assert result.out_meta == str(sidecar)
    assert json.loads(sidecar.read_text()) == {"Units": "mm3", "Extra": 1}
    # Re-running with the same content leaves the files untouched.
    mtimes = expected.stat().st_mtime_ns, sidecar.stat().st_mtime_ns
    sink.run()
    assert (expected.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == mtimes
    # A source without session: no ses- level; a bare file name is enough.
    sink.inputs.source_file = "sub-03_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
    no_session = sink.run().outputs.out_file
    assert no_session.endswith("sub-03/anat/sub-03_desc-regional_features.tsv")


def test_derivatives_sink_needs_a_bids_source_file(tmp_path):
    src = tmp_path / "features.tsv"
    src.write_text("index\tname\n1\ta\n")
    sink = DerivativesDataSink(
        base_directory=str(tmp_path / "out"), in_file=str(src), desc="regional", suffix="x"
    )
    with pytest.raises(ValueError, match="source_file"):  # mandatory, as in niworkflows
        sink.run()
    sink.inputs.source_file = str(tmp_path / "segmentation.nii.gz")
    with pytest.raises(BIDSError, match="no 'sub-<label>' entity") as err:
        sink.run()
    assert "segmentation.nii.gz" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_derivative_description(tmp_path):
    out = DerivativeDescription(
        output_dir=str(tmp_path), source_datasets=["file:///data/siteA"]
    ).run()
    description = json.loads(open(out.outputs.out_file).read())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "fednipype"
    assert pd.notna(description["GeneratedBy"][0]["Version"])
