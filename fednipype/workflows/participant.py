"""The participant-level workflow: regional features of every image of a site, one branch each.

The factory only builds the graph: the images come from the caller (the BIDS-App finds them
with :func:`fednipype.bids.collect_probseg_maps`), and running and reporting failures per
subject is the command-line layer's job (:func:`fednipype.cli.participant.run_participant_wf`).
Each image is one branch (Nipype iterables), so a subject whose image is broken fails alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from fednipype.atlas import Atlas
from fednipype.bids import DEFAULT_SPACE
from fednipype.interfaces.bids import DerivativeDescription
from fednipype.workflows.features import init_regional_features_wf


def init_participant_wf(
    *,
    in_files: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    atlas: Atlas,
    space: str | None = DEFAULT_SPACE,
    source_datasets: Sequence[str | Mapping[str, str]] = (),
    dataset_links: Mapping[str, str] | None = None,
    name: str = "participant_wf",
) -> pe.Workflow:
    """Build the participant-level workflow: regional features of each image, one branch each.

    ``inputnode`` iterates over ``in_files`` (Nipype iterables): each image becomes one branch
    running :func:`~fednipype.workflows.features.init_regional_features_wf`, so branches run
    in parallel and fail independently (the workflow is configured not to stop on the first
    crash).  The derivative dataset's ``dataset_description.json`` is written once.  Building
    reads no file: the images are only opened when the workflow runs.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from fednipype.atlas import default_atlas
            from fednipype.workflows.participant import init_participant_wf

            wf = init_participant_wf(
                in_files=["sub-01_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"],
                output_dir="derivatives",
                atlas=default_atlas(2),
            )

    Parameters
    ----------
    in_files : sequence of path-like
        The images, one per subject/session, each with a BIDS name: the outputs are named
        after it (it is also the sub-workflow's ``source_file``).
    output_dir : path-like
        Root of the derivative dataset written (``dataset_description.json`` and
        ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-S_atlas-A[_res-R]_desc-regional_features.tsv``
        + ``.json``, with ``README.md`` and ``.bidsignore``: a valid BIDS derivative dataset).
    atlas : fednipype.atlas.Atlas
        Label atlas, e.g. :func:`fednipype.atlas.default_atlas`.
    space : str or None
        Template space of the images; must agree with the atlas's space when the atlas
        declares one (``None``: each image's ``space-`` entity).
    source_datasets : sequence of str or mapping
        The input datasets, recorded as ``SourceDatasets`` in the ``dataset_description.json``:
        URLs (or BIDS URIs) or objects with ``DOI``/``URL``/``Version``
        (:func:`fednipype.derivatives.describe_source` makes them without machine paths).
    dataset_links : mapping, optional
        ``DatasetLinks`` of the description (names used in BIDS URIs → locations).
    name : str
        Name of the workflow (and of its folder in the working directory).

    Inputs
    ------
    in_file
        Set by the workflow itself (iterables over ``in_files``): one branch per image.

    Outputs
    -------
    features, sidecar
        Per branch, the stored features table and its sidecar (in ``output_dir``).

    Returns
    -------
    nipype.pipeline.engine.Workflow

    Raises
    ------
    ValueError
        If ``in_files`` is empty.
    ImageError
        If the atlas's space differs from ``space``.

    Examples
    --------
    >>> from fednipype.atlas import default_atlas
    >>> maps = [f"sub-0{i}_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz" for i in (1, 2)]
    >>> wf = init_participant_wf(in_files=maps, output_dir="derivatives", atlas=default_atlas(2))
    >>> sorted(wf.list_node_names())  # doctest: +NORMALIZE_WHITESPACE
    ['ds_description', 'inputnode', 'outputnode', 'regional_features_wf.ds_features',
     'regional_features_wf.features', 'regional_features_wf.inputnode',
     'regional_features_wf.outputnode']
    >>> field, values = wf.get_node("inputnode").iterables
    >>> field, [Path(v).name[:6] for v in values]
    ('in_file', ['sub-01', 'sub-02'])
    """
    if not in_files:
        raise ValueError("in_files: no image to process")
    output_dir = Path(output_dir).absolute()

    workflow = pe.Workflow(name=name)
    # Branches are independent: one subject's crash must not stop the others.
    workflow.config["execution"] = {
        "stop_on_first_crash": "false",
        "remove_unnecessary_outputs": "false",
    }

    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    inputnode.iterables = ("in_file", [str(Path(f).absolute()) for f in in_files])
    outputnode = pe.Node(niu.IdentityInterface(fields=["features", "sidecar"]), name="outputnode")
    regional_features_wf = init_regional_features_wf(
        atlas=atlas, output_dir=output_dir, image_kind="probseg", space=space
    )
    ds_description = pe.Node(
        DerivativeDescription(
            output_dir=str(output_dir),
            source_datasets=[s if isinstance(s, str) else dict(s) for s in source_datasets],
            **({"dataset_links": dict(dataset_links)} if dataset_links else {}),
        ),
        name="ds_description",
        run_without_submitting=True,
    )

    # fmt: off
    workflow.connect([
        (inputnode, regional_features_wf, [("in_file", "inputnode.in_file"),
                                           ("in_file", "inputnode.source_file")]),
        (regional_features_wf, outputnode, [("outputnode.features", "features"),
                                            ("outputnode.sidecar", "sidecar")]),
    ])
    # fmt: on
    workflow.add_nodes([ds_description])
    return workflow
