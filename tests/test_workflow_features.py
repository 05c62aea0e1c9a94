"""The regional-features sub-workflow embedded in a lab's own Nipype pipeline."""

from __future__ import annotations

import pandas as pd
from _features_fixtures import BUNDLED, probseg_path
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from fednipype.atlas import default_atlas
from fednipype.features import extract_features, read_features, read_sidecar
from fednipype.workflows.features import init_regional_features_wf

#: (raw T1w the lab segments, the map its segmentation step starts from, expected BIDS prefix)
#: Entities after subject and session in the name of a feature table of the default atlas.
NAME = "_space-MNI152NLin2009cAsym_atlas-fednipype_desc-regional_features"
VISITS = [
    (
        BUNDLED / "siteA" / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz",
        probseg_path(BUNDLED / "siteA", "01", "2"),
        "sub-01/ses-2/anat/sub-01_ses-2",
    ),
    (
        BUNDLED / "siteB" / "sub-03" / "anat" / "sub-03_T1w.nii.gz",
        probseg_path(BUNDLED / "siteB", "03"),
        "sub-03/anat/sub-03",
    ),
]


def _lab_segmentation(t1w_file, prior_file):
    """A lab's own step: writes a grey-matter probability map under the lab's own file name.

    (It sharpens a prior map; a real lab would segment ``t1w_file``.)
    """
    import os

    import nibabel as nb
    import numpy as np

    prior = nb.load(prior_file)
    gm = np.clip(prior.get_fdata(), 0.0, 1.0) ** 2
    out_file = os.path.abspath("gm_probability.nii.gz")
    nb.Nifti1Image(gm.astype(np.float32), prior.affine).to_filename(out_file)
    return out_file


def _lab_total_volume(features):
    """A lab's step after fednipype's: reads the stored table (the sub-workflow's output)."""
    import pandas as pd

    return float(pd.read_csv(features, sep="\t")["volume_mm3"].sum())


def test_regional_features_wf_behind_a_lab_node(tmp_path):
    atlas = default_atlas(2)
    out = tmp_path / "derivatives"
    pipeline = pe.Workflow(name="lab_pipeline", base_dir=str(tmp_path / "work"))

    visits = pe.Node(niu.IdentityInterface(fields=["t1w", "prior"]), name="visits")
    visits.iterables = [
        ("t1w", [str(v[0]) for v in VISITS]),
        ("prior", [str(v[1]) for v in VISITS]),
    ]
    visits.synchronize = True
    segmentation = pe.Node(
        niu.Function(
            function=_lab_segmentation,
            input_names=["t1w_file", "prior_file"],
            output_names=["out_file"],
        ),
        name="segmentation",
    )
    regional_features_wf = init_regional_features_wf(atlas=atlas, output_dir=out)
    total_volume = pe.Node(
        niu.Function(
            function=_lab_total_volume, input_names=["features"], output_names=["volume_mm3"]
        ),
        name="total_volume",
    )
    # fmt: off
    pipeline.connect([
        (visits, segmentation, [("t1w", "t1w_file"), ("prior", "prior_file")]),
        (segmentation, regional_features_wf, [("out_file", "inputnode.in_file")]),
        (visits, regional_features_wf, [("t1w", "inputnode.source_file")]),
        (regional_features_wf, total_volume, [("outputnode.features", "features")]),
    ])
    # fmt: on
    graph = pipeline.run(plugin="Linear")

    # Nipype drops the IdentityInterface nodes from the executed graph: read the lab's nodes.
    ran = {}
    for node in graph.nodes():
        ran.setdefault(node.name, []).append((node.inputs, node.result.outputs))
    lab_maps = {inputs.t1w_file: outputs.out_file for inputs, outputs in ran["segmentation"]}
    # What the lab's node after the sub-workflow received from its outputnode, and computed.
    received = {inputs.features: outputs.volume_mm3 for inputs, outputs in ran["total_volume"]}
    assert sorted(received) == sorted(str(out / f"{v[2]}{NAME}.tsv") for v in VISITS)
    for features, volume in received.items():
        assert volume == read_features(features)["volume_mm3"].sum()

    for t1w, prior, prefix in VISITS:
        tsv = out / f"{prefix}{NAME}.tsv"
        lab_map = lab_maps[str(t1w)]
        assert lab_map.endswith("gm_probability.nii.gz")  # not a BIDS name: named from t1w
        direct = extract_features(lab_map, atlas.image, atlas.labels)
        stored = read_features(tsv)
        pd.testing.assert_frame_equal(stored, direct.table, check_dtype=False, rtol=1e-10)
        # The features are the lab node's map's, not those of the map it started from.
        from_prior = extract_features(prior, atlas.image, atlas.labels).table
        assert (stored["volume_mm3"] < from_prior["volume_mm3"]).all()
        sidecar = read_sidecar(tsv)
        assert sidecar["Source"] == "gm_probability.nii.gz"
        assert sidecar["Totals"] == direct.sidecar["Totals"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == sorted(
        f"{v[2]}{NAME}.{ext}" for v in VISITS for ext in ("json", "tsv")
    )
