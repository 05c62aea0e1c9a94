"""Nipype interface of the hub (a thin wrapper over fednipype.hub: pooling and reports)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from fednipype.hub.pooling import pool
from fednipype.hub.releases import load_releases
from fednipype.hub.reports import write_meta_report


class _MetaAnalysisInputSpec(BaseInterfaceInputSpec):
    in_releases = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="site release files (*_release.json), one per site",
    )
    method = traits.Enum(
        "REML",
        "DL",
        "PM",
        usedefault=True,
        desc="random-effects tau2 estimator: REML, DerSimonian-Laird or Paule-Mandel",
    )
    test = traits.Enum(
        "z",
        "knha",
        usedefault=True,
        desc="random-effects test: Wald z or Knapp-Hartung t",
    )
    regions = traits.List(
        Str(),
        minlen=1,
        desc="regions to analyse and plot (default: all; plots for at most the first 10)",
    )
    terms = traits.List(
        Str(),
        minlen=1,
        desc="model terms to plot (default: every term except the intercept)",
    )


class _MetaAnalysisOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="pooled results, one row per region, term and method")
    out_site_tsv = File(exists=True, desc="each site's own estimates")
    out_html = File(exists=True, desc="HTML summary page linking the forest plots")
    out_plots = OutputMultiObject(File(exists=True), desc="forest plots (PNG)")


class MetaAnalysis(SimpleInterface):
    """Pool site releases: pooled regression and fixed/random-effects meta-analysis.

    Validates the releases and checks that they can be pooled
    (:func:`fednipype.hub.releases.load_releases`), pools them
    (:func:`fednipype.hub.pooling.pool`) and writes the report
    (:func:`fednipype.hub.reports.write_meta_report`) into the node's working directory:
    ``pooled_results.tsv``, ``site_estimates.tsv``, forest plots and ``index.html`` — the same
    files as the ``fednipype-meta`` command.

    Examples
    --------
    >>> meta = MetaAnalysis(method="DL", test="knha")
    >>> meta.inputs.method, meta.inputs.test
    ('DL', 'knha')
    """

    input_spec = _MetaAnalysisInputSpec
    output_spec = _MetaAnalysisOutputSpec

    def _run_interface(self, runtime):
        regions = self.inputs.regions if isdefined(self.inputs.regions) else None
        terms = self.inputs.terms if isdefined(self.inputs.terms) else None
        releases = load_releases(self.inputs.in_releases)
        result = pool(releases, method=self.inputs.method, test=self.inputs.test, regions=regions)
        report = write_meta_report(result, runtime.cwd, terms=terms, plot_regions=regions)
        self._results["out_tsv"] = str(report.tsv)
        self._results["out_site_tsv"] = str(report.sites_tsv)
        self._results["out_html"] = str(report.html)
        self._results["out_plots"] = [str(p) for p in report.plots]
        return runtime
