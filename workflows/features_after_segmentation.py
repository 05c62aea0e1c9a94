"""Example for labs: add fednipype's regional features to an existing Nipype pipeline.

A lab's pipeline already iterates over its subjects and sessions, grabs their BIDS data and
segments it; this example shows what to add after the segmentation step. Each visit's
grey-matter probability map is grabbed with Nipype's own ``BIDSDataGrabber`` (where your
pipeline would connect its segmentation node's output instead) and fed to
:func:`fednipype.workflows.features.init_regional_features_wf`, which computes the regional
features and stores them as BIDS derivatives named after the source file
(``sub-X[_ses-Y]_desc-regional_features.tsv``). Copy it and replace the grabber with your node.

Run::

    python workflows/features_after_segmentation.py bids_examples/siteA out \
        --participant-label 01 02
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bids import BIDSLayout
from nipype import config
from nipype.interfaces import utility as niu
from nipype.interfaces.io import BIDSDataGrabber
from nipype.pipeline import engine as pe

from fednipype.atlas import default_atlas
from fednipype.workflows.features import init_regional_features_wf


def _pop(in_files):
    """The one file of a per-visit query (Nipype grabbers return lists)."""
    return in_files[0] if isinstance(in_files, list | tuple) else in_files


def build_pipeline(
    bids_dir: Path,
    output_dir: Path,
    visits: list[tuple[str, str | None]],
    work_dir: Path,
) -> pe.Workflow:
    """The lab's pipeline, one branch per (subject, session), with fednipype's features added."""
    workflow = pe.Workflow(name="lab_pipeline", base_dir=str(work_dir))
    workflow.config["execution"] = {"poll_sleep_duration": 0.1, "crashdump_dir": str(work_dir)}

    # --- the lab's existing part: its iterables, data grabbing (+ segmentation, already run) --
    inputnode = pe.Node(niu.IdentityInterface(fields=["subject", "session"]), name="inputnode")
    inputnode.iterables = [
        ("subject", [subject for subject, _ in visits]),
        ("session", [session for _, session in visits]),  # None: a dataset without sessions
    ]
    inputnode.synchronize = True
    grab = pe.Node(
        BIDSDataGrabber(
            base_dir=str(bids_dir),
            index_derivatives=True,
            infields=["subject", "session"],
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
    # --- what fednipype adds: regional features of the map, stored as a BIDS derivative ----
    regional_features_wf = init_regional_features_wf(
        atlas=default_atlas(2), output_dir=output_dir, space="MNI152NLin2009cAsym"
    )
    # fmt: off
    workflow.connect([
        (inputnode, grab, [("subject", "subject"), ("session", "session")]),
        # Your segmentation node here; source_file names the outputs (e.g. the T1w it segmented).
        (grab, regional_features_wf, [(("gm", _pop), "inputnode.in_file"),
                                      (("gm", _pop), "inputnode.source_file")]),
    ])
    # fmt: on
    return workflow


def find_visits(bids_dir: Path, subjects: list[str]) -> list[tuple[str, str | None]]:
    """The (subject, session) pairs of the raw dataset; session is None without sessions."""
    layout = BIDSLayout(str(bids_dir), validate=False)
    return [
        (subject, session)
        for subject in subjects
        for session in (layout.get_sessions(subject=subject) or [None])
    ]


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
    bids_dir = args.bids_dir.absolute()
    visits = find_visits(bids_dir, subjects)
    pipeline = build_pipeline(bids_dir, args.output_dir.absolute(), visits, work)
    pipeline.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
