"""Nipype interface for regional feature extraction (a thin wrapper over fednipype.features)."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)


class _RegionalFeaturesInputSpec(BaseInterfaceInputSpec):
    in_file = File(
        exists=True,
        mandatory=True,
        desc="3-D NIfTI image in the atlas's space: a tissue probability map or a T1w image",
    )
    atlas_file = File(
        exists=True,
        mandatory=True,
        desc="integer label NIfTI image (0 is background), same space as in_file",
    )
    atlas_labels = File(
        exists=True,
        mandatory=True,
        desc="BIDS-style dseg.tsv of the atlas with columns 'index' and 'name'",
    )
    mask_file = File(
        exists=True,
        desc="optional brain mask (nonzero inside), on the image's grid or another grid of "
        "the same space",
    )
    image_kind = traits.Enum(
        "probseg",
        "intensity",
        usedefault=True,
        desc="'probseg': volume = sum of probabilities x voxel volume; 'intensity': volume = "
        "voxel count x voxel volume",
    )
    atlas_name = Str(desc="atlas name recorded in the sidecar (default: from the file name)")
    atlas_space = Str(desc="template space of the atlas (default: its tpl-/space- entity)")
    image_space = Str(desc="template space of in_file (default: its space- entity)")


class _RegionalFeaturesOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="regional features table, one row per atlas region")
    out_json = File(exists=True, desc="JSON sidecar: totals, atlas provenance, units")


class RegionalFeatures(SimpleInterface):
    """Regional features (voxel count, volume, mean, SD) of an image over a label atlas.

    A thin wrapper around :func:`fednipype.features.extract_features`; the table and its
    sidecar are written to the node's working directory as ``regional_features.tsv`` and
    ``regional_features.json``.

    Examples
    --------
    >>> from fednipype.atlas import default_atlas
    >>> atlas = default_atlas(2)
    >>> features = RegionalFeatures(atlas_file=str(atlas.image), atlas_labels=str(atlas.labels))
    >>> features.inputs.image_kind
    'probseg'
    """

    input_spec = _RegionalFeaturesInputSpec
    output_spec = _RegionalFeaturesOutputSpec

    def _run_interface(self, runtime):
        # Imported when the node runs (pandas, scipy): importing the interface stays fast.
        from fednipype.features import extract_features, write_features

        def optional(name):
            value = getattr(self.inputs, name)
            return value if isdefined(value) else None

        result = extract_features(
            self.inputs.in_file,
            self.inputs.atlas_file,
            self.inputs.atlas_labels,
            image_kind=self.inputs.image_kind,
            mask_file=optional("mask_file"),
            atlas_name=optional("atlas_name"),
            atlas_space=optional("atlas_space"),
            image_space=optional("image_space"),
        )
        out_tsv, out_json = write_features(
            result,
            os.path.join(runtime.cwd, "regional_features.tsv"),
            os.path.join(runtime.cwd, "regional_features.json"),
        )
        self._results["out_tsv"] = str(out_tsv)
        self._results["out_json"] = str(out_json)
        return runtime
