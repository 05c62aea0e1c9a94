"""The BIDS layer: enumeration against pybids and the file system, participants, derivatives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from bids import BIDSLayout
from support import BUNDLED, COMMUNITY_DATASETS, SITES

from fednipype import bids as fbids
from fednipype.derivatives import derivative_path, write_derivative_description
from fednipype.exceptions import BIDSError


def _walk_subjects(root: Path) -> list[str]:
    """Independent reference: subject folders that contain at least one file."""
    return sorted(
        p.name[4:]
        for p in root.glob("sub-*")
        if p.is_dir() and any(f.is_file() for f in p.rglob("*")) and p.name != "sub-emptyroom"
    )


def _is_raw_t1w(name: str) -> bool:
    """A raw T1w image: no space- or desc- entity (those are a preprocessing's outputs)."""
    return name.endswith((".nii", ".nii.gz")) and not any(
        part.startswith(("space-", "desc-")) for part in Path(name).name.split("_")
    )


def _walk_t1w(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("sub-*/**/anat/*_T1w.nii*") if _is_raw_t1w(p.name))


def _check_enumeration(root: Path) -> None:
    layout = fbids.load_layout(root)
    # fednipype's answers against pybids' own queries on the same index, and against a walk
    # of the file system (an independent reference for subjects and raw T1w images).
    reference = layout
    assert isinstance(reference, BIDSLayout)
    subjects = fbids.get_subjects(layout)
    assert subjects == sorted(s for s in reference.get_subjects() if s != "emptyroom")
    assert subjects == _walk_subjects(root)
    for subject in subjects:
        assert fbids.get_sessions(layout, subject) == sorted(
            reference.get_sessions(subject=subject)
        )
    t1w = [r.path for r in fbids.collect_images(layout, subjects, kind="T1w")]
    expected = reference.get(suffix="T1w", extension=[".nii", ".nii.gz"], return_type="filename")
    # Only raw T1w images count: none in a derivative dataset, never a preprocessed one.
    expected = [f for f in expected if "/derivatives/" not in f and _is_raw_t1w(f)]
    if reference.get_dataset_description().get("DatasetType") == "derivative":
        expected = []
    else:
        assert sorted(t1w) == _walk_t1w(root)
    assert sorted(t1w) == sorted(expected)


@pytest.mark.parametrize("site", SITES)
def test_bundled_sites_enumerate_like_pybids(site):
    _check_enumeration(BUNDLED / site)
    layout = fbids.load_layout(BUNDLED / site)
    maps = [r.path for r in fbids.collect_images(layout, fbids.get_subjects(layout))]
    # the per-subject query agrees with the bulk one
    first = fbids.get_subjects(layout)[0]
    per_subject = [
        f
        for ses in fbids.get_sessions(layout, first) or [None]
        for f in fbids.get_probseg(layout, first, ses)
    ]
    assert per_subject == [m for m in maps if f"sub-{first}_" in m]
    on_disk = sorted(str(p) for p in (BUNDLED / site).rglob("*_label-GM_probseg.nii.gz"))
    assert sorted(maps) == on_disk and len(maps) > 0


@pytest.mark.parametrize("name", COMMUNITY_DATASETS or ["(absent)"])
def test_community_examples_enumerate_like_pybids(name, bids_examples_dir):
    root = bids_examples_dir / name
    layout = fbids.load_layout(root)
    if not layout.get_subjects():
        with pytest.raises(BIDSError, match="no subjects"):
            fbids.get_subjects(layout)
        return
    _check_enumeration(root)


def test_fmriprep_derivative_probseg(bids_examples_dir):
    root = bids_examples_dir / "ds000001-fmriprep"
    if not root.is_dir():
        pytest.skip("ds000001-fmriprep is not in this bids-examples copy")
    layout = fbids.load_layout(root)
    found = [r.path for r in fbids.collect_images(layout, fbids.get_subjects(layout))]
    on_disk = sorted(
        str(p) for p in root.rglob("*space-MNI152NLin2009cAsym*_label-GM_probseg.nii*")
    )
    assert sorted(found) == on_disk and found


def _make_dataset(root: Path, participants: str | None = "participant_id\tage\n") -> Path:
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.9.0"})
    )
    if participants is not None:
        (root / "participants.tsv").write_text(participants)
    return root


def test_zero_byte_and_non_nifti_images_are_enumerated_not_opened(tmp_path):
    root = _make_dataset(tmp_path / "ds")
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    (root / "sub-02" / "anat").mkdir(parents=True)
    (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_text("<html>not an image</html>")
    layout = fbids.load_layout(root)
    assert fbids.get_subjects(layout) == ["01", "02"]
    assert [Path(f).name for s in ("01", "02") for f in fbids.get_t1w(layout, s)] == [
        "sub-01_T1w.nii.gz",
        "sub-02_T1w.nii.gz",
    ]


def test_missing_dataset_description(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(BIDSError, match=r"dataset_description\.json"):
        fbids.load_layout(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(BIDSError, match="does not exist"):
        fbids.load_layout(tmp_path / "nope")


def test_no_subjects(tmp_path):
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    layout = fbids.load_layout(tmp_path)
    with pytest.raises(BIDSError, match=f"{tmp_path}: no subjects"):
        fbids.get_subjects(layout)


def test_label_filter_accepts_both_forms_and_rejects_unknown():
    layout = fbids.load_layout(BUNDLED / "siteB")
    assert fbids.get_subjects(layout, ["sub-03", "04", "03"]) == ["03", "04"]
    with pytest.raises(BIDSError, match="sub-99 match no subject"):
        fbids.get_subjects(layout, ["01", "sub-99"])


def test_participants_missing(tmp_path):
    root = _make_dataset(tmp_path / "ds", participants=None)
    with pytest.raises(BIDSError, match=r"participants\.tsv not found"):
        fbids.read_participants(root)


def test_participants_duplicate_id(tmp_path):
    root = _make_dataset(tmp_path / "ds", "participant_id\tage\nsub-01\t20\nsub-01\t30\n")
    with pytest.raises(BIDSError, match="duplicate participant_id: sub-01"):
        fbids.read_participants(root)


def test_participants_non_numeric_age(tmp_path):
    root = _make_dataset(tmp_path / "ds", "participant_id\tage\nsub-01\t20\nsub-02\tforty\n")
    with pytest.raises(BIDSError, match="column 'age' expects numbers or n/a; sub-02 has 'forty'"):
        fbids.read_participants(root)


def test_participants_without_id_column(tmp_path):
    root = _make_dataset(tmp_path / "ds", "subject\tage\n01\t20\n")
    with pytest.raises(BIDSError, match="no 'participant_id' column"):
        fbids.read_participants(root)


def test_participants_malformed_id(tmp_path):
    root = _make_dataset(tmp_path / "ds", "participant_id\tage\n01\t20\n")
    with pytest.raises(BIDSError, match="row 2 has '01'"):
        fbids.read_participants(root)


def test_participants_quirks_bom_crlf_aliases_and_na(tmp_path):
    text = "\ufeffparticipant_id\tAge\tGender\tGroup\tscanner\r\n"
    text += "sub-01\t31\tmale\tpatient\tA\r\n"
    text += "sub-02\tn/a\tF\tn/a\tB\r\n"
    text += "sub-03\t89+\tn/a\tcontrol\tA\r\n"
    root = _make_dataset(tmp_path / "ds", text)
    table = fbids.read_participants(root)
    assert list(table.columns) == ["age", "sex", "group", "scanner"]
    assert table["age"].dtype == float
    assert table.loc["sub-01", "age"] == 31.0 and table.loc["sub-03", "age"] == 89.0
    assert table["age"].isna().tolist() == [False, True, False]
    assert table["sex"].tolist()[:2] == ["M", "F"] and table["sex"].isna().tolist()[2]
    assert table.loc["sub-02", "group"] is None or table["group"].isna().tolist()[1]
    assert table["scanner"].tolist() == ["A", "B", "A"]
    assert table.attrs["renamed"] == {"Age": "age", "Gender": "sex", "Group": "group"}


def test_participants_sidecar_units_make_columns_numeric(tmp_path):
    root = _make_dataset(tmp_path / "ds", "participant_id\theight\tsite\nsub-01\t170.5\t7\n")
    (root / "participants.json").write_text(json.dumps({"height": {"Units": "cm"}}))
    table = fbids.read_participants(root)
    assert table.loc["sub-01", "height"] == 170.5
    assert table.loc["sub-01", "site"] == "7"  # no Units: kept as text


def test_community_participants_quirks(bids_examples_dir):
    cases = {
        "ds000248": lambda t: t["age"].isna().all() and "sub-emptyroom" in t.index,  # BOM
        "ds009": lambda t: {"age", "sex"} <= set(t.columns) and t.shape[1] > 80,  # Age, Gender
        "ds114": lambda t: t.loc["sub-01", "dominant_hand"] == "left",  # CRLF
        "7t_trt": lambda t: t["age"].dtype == float,  # age_at_first_scan_years
        "genetics_ukbb": lambda t: t["age"].max() == 89.0,  # top-coded 89+
    }
    checked = 0
    for name, check in cases.items():
        root = bids_examples_dir / name
        if root.is_dir():
            assert check(fbids.read_participants(root)), name
            checked += 1
    assert checked > 0


def test_subject_without_participants_row_warns(tmp_path, caplog):
    root = BUNDLED / "siteB"
    table = fbids.read_participants(root)
    table = table.drop(index="sub-05")
    with caplog.at_level(logging.WARNING, logger="fednipype.bids"):
        missing = fbids.match_participants(["04", "05"], table)
    assert missing == ["05"]
    assert "sub-05 has images but no row in" in caplog.text


def test_derivative_path_and_description(tmp_path):
    path = derivative_path(
        "sub-01", "1", desc="regional", suffix="features", extension=".tsv", output_dir=tmp_path
    )
    assert path == tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_desc-regional_features.tsv"
    written = write_derivative_description(tmp_path, ["file:///data/siteA"])
    description = json.loads(written.read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "fednipype"
    assert description["GeneratedBy"][0]["Version"]
    assert description["SourceDatasets"] == [{"URL": "file:///data/siteA"}]
    # pybids reads it back as a derivative dataset
    assert BIDSLayout(str(tmp_path), validate=False, is_derivative=True).get_dataset_description()
    assert not list(tmp_path.glob(".*.tmp"))


def test_derivative_description_refuses_foreign_folder(tmp_path):
    (tmp_path / "dataset_description.json").write_text(
        json.dumps(
            {"Name": "x", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fmriprep"}]}
        )
    )
    with pytest.raises(BIDSError, match="belongs to another dataset"):
        write_derivative_description(tmp_path)


def test_summary_counts_match_disk():
    row = fbids.summarize(BUNDLED / "siteA")
    assert row["subjects"] == len(list((BUNDLED / "siteA").glob("sub-*")))
    assert row["t1w"] == len(list((BUNDLED / "siteA").glob("sub-*/ses-*/anat/*_T1w.nii.gz")))
    assert row["sessions"] == row["t1w"] == row["gm_probseg"] == 2 * row["subjects"]
