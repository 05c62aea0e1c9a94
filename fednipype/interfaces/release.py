"""Nipype interfaces for the site's DP release (thin wrappers over fednipype.site.release)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from fednipype.bids import find_feature_files
from fednipype.site.design import ModelSpec
from fednipype.site.release import make_release


class _DPReleaseInputSpec(BaseInterfaceInputSpec):
    in_features = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="per-subject regional-feature TSVs (sub-X[_ses-Y]_desc-regional_features.tsv)",
    )
    participants_file = File(
        exists=True, mandatory=True, desc="the dataset's participants.tsv (covariates)"
    )
    policy_file = File(
        exists=True,
        mandatory=True,
        desc="site policy (TOML): total budget, public bounds, min cohort, ledger location",
    )
    epsilon = traits.Float(mandatory=True, desc="privacy loss epsilon this release spends")
    delta = traits.Float(1e-5, usedefault=True, desc="privacy loss delta this release spends")
    site = Str(mandatory=True, desc="site label written in the release")
    dataset = Str(desc="dataset name written in the release (default: the site label)")
    response = Str("volume_mm3", usedefault=True, desc="feature column modelled per region")
    regions = traits.List(
        Str(), minlen=1, desc="atlas regions to release, pre-registered (default: all)"
    )
    out_file = File(
        xor=["out_dir"],
        mandatory=True,
        desc="path of the release file to write (*_release.json); it must not exist",
    )
    out_dir = traits.Directory(
        xor=["out_file"],
        mandatory=True,
        desc="folder for the release, named uniquely with its ledger and charge ids",
    )


class _DPReleaseOutputSpec(TraitedSpec):
    out_release = File(exists=True, desc="the validated release file")


class DPRelease(SimpleInterface):
    """Make a site's differentially private release (:func:`fednipype.site.release.make_release`).

    The release is charged to the dataset's privacy ledger before it exists, written
    atomically to ``out_file`` and validated against the release schema.  ``epsilon`` and the
    policy's bounds are mandatory: a privacy choice is never implicit.

    Examples
    --------
    >>> DPRelease().inputs.delta
    1e-05
    """

    input_spec = _DPReleaseInputSpec
    output_spec = _DPReleaseOutputSpec

    def _run_interface(self, runtime):
        path = make_release(
            features=list(self.inputs.in_features),
            participants=self.inputs.participants_file,
            policy=self.inputs.policy_file,
            epsilon=self.inputs.epsilon,
            delta=self.inputs.delta,
            site=self.inputs.site,
            dataset=self.inputs.dataset if isdefined(self.inputs.dataset) else None,
            out_path=self.inputs.out_file if isdefined(self.inputs.out_file) else None,
            out_dir=self.inputs.out_dir if isdefined(self.inputs.out_dir) else None,
            regions=self.inputs.regions if isdefined(self.inputs.regions) else None,
            spec=ModelSpec(response=self.inputs.response),
        )
        self._results["out_release"] = str(path)
        return runtime


class _FeatureFilesInputSpec(BaseInterfaceInputSpec):
    derivatives_dir = traits.Directory(
        exists=True, mandatory=True, desc="fednipype's participant-level derivatives"
    )
    participant_label = traits.List(Str(), desc="subjects to keep (default: all)")


class _FeatureFilesOutputSpec(TraitedSpec):
    out_features = traits.List(File(exists=True), desc="regional-feature TSVs found")


class FeatureFiles(SimpleInterface):
    """List the regional-feature files of a participant-level run (pybids query)."""

    input_spec = _FeatureFilesInputSpec
    output_spec = _FeatureFilesOutputSpec

    def _run_interface(self, runtime):
        labels = (
            self.inputs.participant_label if isdefined(self.inputs.participant_label) else None
        )
        self._results["out_features"] = [
            str(p) for p in find_feature_files(self.inputs.derivatives_dir, labels)
        ]
        return runtime
