"""The regional-features sub-workflow: features of one image, stored as a BIDS derivative.

Embeddable in any Nipype pipeline: connect the node that produces the image (a segmentation,
a grabber) to its ``inputnode``.  It neither queries BIDS nor iterates; the caller decides
which images run (the participant workflow iterates over a site's maps).
"""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from fednipype.atlas import Atlas
from fednipype.bids import DEFAULT_SPACE
from fednipype.derivatives import FEATURES_DESC, FEATURES_SUFFIX, atlas_entity
from fednipype.exceptions import ImageError
from fednipype.interfaces.bids import DerivativesDataSink
from fednipype.interfaces.features import RegionalFeatures


def init_regional_features_wf(
    *,
    atlas: Atlas,
    output_dir: str | os.PathLike[str],
    image_kind: str = "probseg",
    space: str | None = DEFAULT_SPACE,
    name: str = "regional_features_wf",
) -> pe.Workflow:
    """Build a workflow computing an image's regional features and storing them as BIDS.

    :class:`~fednipype.interfaces.features.RegionalFeatures` computes the table and its
    sidecar; :class:`~fednipype.interfaces.bids.DerivativesDataSink` stores them under
    ``output_dir`` named after ``source_file`` (subject, session, resolution), the space and
    the atlas: ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-S_atlas-A[_res-R]_desc-regional_features``
    ``.tsv`` and ``.json``, so features over two atlases never overwrite each other.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from fednipype.atlas import default_atlas
            from fednipype.workflows.features import init_regional_features_wf

            wf = init_regional_features_wf(atlas=default_atlas(2), output_dir="derivatives")

    Parameters
    ----------
    atlas : fednipype.atlas.Atlas
        Label atlas (image and ``dseg.tsv``); resampled by nearest neighbour to each image's
        grid when the grids differ.
    output_dir : path-like
        Root of the derivative dataset the sink writes into (made absolute when the workflow
        is built).
    image_kind : {"probseg", "intensity"}
        ``probseg``: a tissue probability map (volume = sum of probabilities x voxel volume);
        ``intensity``: e.g. a T1w image (volume = voxel count x voxel volume).
    space : str or None
        Template space of the input images; must agree with the atlas's space when the atlas
        declares one.  ``None`` reads it from each image's ``space-`` entity, when it has one.
    name : str
        Name of the workflow.

    Inputs
    ------
    in_file
        The 3-D image, in the atlas's space (any file name).
    source_file
        The BIDS file the image derives from (e.g. the subject's T1w or the map itself): the
        outputs' subject and session are read from its path.

    Outputs
    -------
    features
        The stored features table (``…_desc-regional_features.tsv``).
    sidecar
        Its JSON sidecar (totals, atlas provenance, units).

    Returns
    -------
    nipype.pipeline.engine.Workflow

    Raises
    ------
    ImageError
        If the atlas's space differs from ``space``.
    traits.TraitError
        If ``image_kind`` is neither ``probseg`` nor ``intensity``.

    Examples
    --------
    >>> from fednipype.atlas import default_atlas
    >>> wf = init_regional_features_wf(atlas=default_atlas(2), output_dir="derivatives")
    >>> sorted(wf.list_node_names())
    ['ds_features', 'features', 'inputnode', 'outputnode']
    >>> wf.get_node("inputnode").inputs.copyable_trait_names()
    ['in_file', 'source_file']
    >>> wf.get_node("ds_features").inputs.desc
    'regional'
    """
    if atlas.space and space and atlas.space != space:
        raise ImageError(
            f"{atlas.image}: the atlas is in space '{atlas.space}' but the images requested are "
            f"in space '{space}'"
        )
    workflow = pe.Workflow(name=name)

    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "source_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["features", "sidecar"]), name="outputnode")
    features = pe.Node(
        RegionalFeatures(
            atlas_file=str(atlas.image),
            atlas_labels=str(atlas.labels),
            atlas_name=atlas.name,
            image_kind=image_kind,
            **({"image_space": space} if space else {}),
            **({"atlas_space": atlas.space} if atlas.space else {}),
        ),
        name="features",
    )
    # Light: it runs in the main process rather than as a job of the plugin.
    out_space = space or atlas.space
    ds_features = pe.Node(
        DerivativesDataSink(
            base_directory=str(Path(output_dir).absolute()),
            desc=FEATURES_DESC,
            suffix=FEATURES_SUFFIX,
            atlas=atlas_entity(atlas.name),
            **({"space": out_space} if out_space else {}),
        ),
        name="ds_features",
        run_without_submitting=True,
    )

    # fmt: off
    workflow.connect([
        (inputnode, features, [("in_file", "in_file")]),
        (inputnode, ds_features, [("source_file", "source_file")]),
        (features, ds_features, [("out_tsv", "in_file"), ("out_json", "meta_file")]),
        (ds_features, outputnode, [("out_file", "features"), ("out_meta", "sidecar")]),
    ])
    # fmt: on
    return workflow
