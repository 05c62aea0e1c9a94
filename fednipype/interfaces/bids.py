"""Nipype interfaces that write BIDS derivatives: a derivatives sink, the dataset description."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from fednipype.derivatives import (
    derivative_path,
    source_entities,
    write_derivative_description,
    write_if_changed,
)
from fednipype.images import bids_entities


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(
        mandatory=True, desc="root of the derivative dataset (the output directory)"
    )
    in_file = File(exists=True, mandatory=True, desc="file to store as a BIDS derivative")
    source_file = File(
        mandatory=True,
        desc="the input the output derives from: subject and session are read from its BIDS "
        "path (it need not exist)",
    )
    meta_file = File(
        exists=True, desc="JSON file whose content becomes (part of) the sidecar of the output"
    )
    meta_dict = traits.Dict(
        key_trait=Str, desc="extra keys written into the sidecar (override meta_file's)"
    )
    desc = Str(mandatory=True, desc="value of the 'desc-' entity")
    suffix = Str(mandatory=True, desc="BIDS suffix of the output, e.g. 'features'")
    space = Str(desc="value of the 'space-' entity, if any")
    atlas = Str(desc="value of the 'atlas-' entity, if any (the atlas the output is over)")
    res = Str(desc="value of the 'res-' entity; by default source_file's, if it has one")
    datatype = Str("anat", usedefault=True, desc="BIDS datatype folder")
    extension = Str(desc="extension with its dot; by default that of in_file")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(desc="the stored derivative")
    out_meta = File(desc="its JSON sidecar (when meta_file or meta_dict was given)")


class DerivativesDataSink(SimpleInterface):
    """Store a file under ``base_directory`` with a BIDS-derivative name, plus a sidecar.

    As niworkflows' sink of the same name, the output is named after ``source_file``
    (mandatory): its subject, session and resolution, then the ``space``, ``atlas``,
    ``desc`` and ``suffix`` given here, e.g.
    ``sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009cAsym_atlas-fednipype_desc-regional_features.tsv``
    (:func:`fednipype.derivatives.derivative_path`).  Files are written atomically, and only
    when their content changed, so re-running a workflow leaves unchanged outputs untouched.
    The sink always runs (it is cheap), so deleted outputs are restored from the cache on the
    next run.

    Examples
    --------
    >>> sink = DerivativesDataSink(
    ...     desc="regional", suffix="features", source_file="sub-01/anat/sub-01_T1w.nii.gz"
    ... )
    >>> sink.inputs.datatype
    'anat'
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        in_file = Path(self.inputs.in_file)
        extension = self.inputs.extension if isdefined(self.inputs.extension) else None
        if not extension:
            name = in_file.name
            extension = ".nii.gz" if name.endswith(".nii.gz") else in_file.suffix
        subject, session = source_entities(self.inputs.source_file)
        space = self.inputs.space if isdefined(self.inputs.space) else None
        atlas = self.inputs.atlas if isdefined(self.inputs.atlas) else None
        res = self.inputs.res if isdefined(self.inputs.res) else None
        if res is None:
            res = bids_entities(self.inputs.source_file).get("res")
        out_file = derivative_path(
            subject,
            session,
            desc=self.inputs.desc,
            suffix=self.inputs.suffix,
            extension=extension,
            datatype=self.inputs.datatype,
            space=space or None,
            atlas=atlas or None,
            res=res or None,
            output_dir=self.inputs.base_directory,
        )
        write_if_changed(out_file, in_file.read_bytes())
        self._results["out_file"] = str(out_file)

        meta: dict = {}
        if isdefined(self.inputs.meta_file):
            meta.update(json.loads(Path(self.inputs.meta_file).read_text(encoding="utf-8")))
        if isdefined(self.inputs.meta_dict):
            meta.update(self.inputs.meta_dict)
        if meta:
            out_meta = out_file.with_name(out_file.name.removesuffix(extension) + ".json")
            write_if_changed(out_meta, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
            self._results["out_meta"] = str(out_meta)
        return runtime


class _DerivativeDescriptionInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="root of the derivative dataset")
    source_datasets = traits.List(
        traits.Either(Str, traits.Dict(key_trait=Str, value_trait=Str)),
        desc="SourceDatasets: URLs (or BIDS URIs) or objects with DOI/URL/Version",
    )
    dataset_links = traits.Dict(
        key_trait=Str, value_trait=Str, desc="DatasetLinks: names in BIDS URIs -> locations"
    )


class _DerivativeDescriptionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the dataset_description.json written")


class DerivativeDescription(SimpleInterface):
    """Write the derivative dataset's root files (always runs).

    ``dataset_description.json``, ``README.md`` and ``.bidsignore``
    (:func:`fednipype.derivatives.write_derivative_description`).
    """

    input_spec = _DerivativeDescriptionInputSpec
    output_spec = _DerivativeDescriptionOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        sources = self.inputs.source_datasets if isdefined(self.inputs.source_datasets) else []
        links = self.inputs.dataset_links if isdefined(self.inputs.dataset_links) else None
        self._results["out_file"] = str(
            write_derivative_description(
                self.inputs.output_dir, source_datasets=sources, dataset_links=links or None
            )
        )
        return runtime
