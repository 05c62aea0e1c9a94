"""Example for labs: add fednipype's regional features to an existing Nipype pipeline.

A lab's pipeline already grabs its BIDS data and segments it; this example shows the two nodes
to add after the segmentation step. It grabs each subject's grey-matter probability maps with
Nipype's own ``BIDSDataGrabber`` (where your pipeline would connect its segmentation node's
output instead), runs :class:`fednipype.interfaces.features.RegionalFeatures` on each map, and
stores them as BIDS derivatives named after their source map
(``sub-X[_ses-Y]_desc-regional_features.tsv``). Copy it and replace the grabber with your node.

Run::

    python workflows/features_after_segmentation.py bids_examples/siteA out \
        --participant-label 01 02
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nipype import config
from nipype.interfaces import utility as niu
from nipype.interfaces.io import BIDSDataGrabber
from nipype.pipeline import engine as pe

from fednipype.atlas import default_atlas
from fednipype.interfaces.bids import DerivativesDataSink
from fednipype.interfaces.features import RegionalFeatures


def build_pipeline(
    bids_dir: Path, output_dir: Path, subjects: list[str], work_dir: Path
) -> pe.Workflow:
    """The lab's pipeline with fednipype's feature node after the (grabbed) segmentation."""
    atlas = default_atlas(2)
    workflow = pe.Workflow(name="lab_pipeline", base_dir=str(work_dir))
    workflow.config["execution"] = {"poll_sleep_duration": 0.1, "crashdump_dir": str(work_dir)}

    inputnode = pe.Node(niu.IdentityInterface(fields=["subject"]), name="inputnode")
    inputnode.iterables = ("subject", subjects)
    # --- the lab's existing part: data grabbing (+ segmentation, already run here) ---------
    grab = pe.Node(
        BIDSDataGrabber(
            base_dir=str(bids_dir),
            index_derivatives=True,
            output_query={
                "gm": {
                    "suffix": "probseg",
                    "label": "GM",
                    "space": "MNI152NLin2009cAsym",
                    "extension": [".nii.gz", ".nii"],
                }
            },
        ),
        name="grab",
    )
    # --- what fednipype adds: regional features of every map, then storage ------------------
    features = pe.MapNode(
        RegionalFeatures(
            atlas_file=str(atlas.image), atlas_labels=str(atlas.labels), atlas_name=atlas.name
        ),
        iterfield=["in_file"],
        name="features",
    )
    ds_features = pe.MapNode(
        DerivativesDataSink(base_directory=str(output_dir), desc="regional", suffix="features"),
        iterfield=["in_file", "meta_file", "source_file"],
        name="ds_features",
    )
    # fmt: off
    workflow.connect([
        (inputnode, grab, [("subject", "subject")]),
        (grab, features, [("gm", "in_file")]),
        (grab, ds_features, [("gm", "source_file")]),
        (features, ds_features, [("out_tsv", "in_file"), ("out_json", "meta_file")]),
    ])
    # fmt: on
    return workflow


def main(argv: list[str] | None = None) -> int:
    """Build and run the example pipeline (MultiProc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--participant-label", nargs="+", required=True)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    config.update_config({"execution": {"poll_sleep_duration": 0.1}})
    subjects = [s.removeprefix("sub-") for s in args.participant_label]
    work = args.work_dir or args.output_dir.absolute().parent / "work"
    pipeline = build_pipeline(args.bids_dir.absolute(), args.output_dir.absolute(), subjects, work)
    pipeline.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
