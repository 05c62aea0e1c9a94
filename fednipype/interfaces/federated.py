"""``FederatedAnalysis``: a coordinator's Nipype node over the federated run.

A thin layer over :func:`fednipype.federated.analysis.run_federated_analysis` (what
``fednipype-federate`` runs): the request through the consortium's SuperLink, the secure sum
pooled into ``pooled_results.tsv``, forest plots, ``index.html`` and ``federation.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    OutputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from fednipype.federated.analysis import run_federated_analysis

__all__ = ["FederatedAnalysis", "FlowerRunInputSpec", "flower_run_options"]


class FlowerRunInputSpec(BaseInterfaceInputSpec):
    """The inputs every coordinator node over a Flower run has (paths resolved when set: the
    node runs in its own working directory)."""

    superlink = Str(desc="HOST:PORT of the consortium's SuperLink (with root_certificates)")
    root_certificates = File(
        exists=True, resolve=True, desc="the consortium CA's certificate (PEM)"
    )
    connection = Str(desc="instead of superlink: a connection of an existing Flower home")
    flwr_home = Directory(exists=True, resolve=True, desc="the Flower home of connection")
    round_timeout = traits.Float(120.0, usedefault=True, desc="seconds per SecAgg+ exchange")
    connect_timeout = traits.Float(60.0, usedefault=True, desc="seconds for sites to connect")
    num_shares = traits.Int(3, usedefault=True, desc="SecAgg+ shares per secret")
    reconstruction_threshold = traits.Int(
        2, usedefault=True, desc="SecAgg+ shares needed to rebuild a secret"
    )


def flower_run_options(inputs: Any, runtime: Any) -> dict[str, Any]:
    """The keyword arguments of a run function from :class:`FlowerRunInputSpec`'s inputs, and
    ``out_dir`` made absolute in the node's working directory."""

    def opt(name: str) -> Any:
        value = getattr(inputs, name)
        return value if isdefined(value) else None

    out = Path(inputs.out_dir)
    return {
        "out_dir": out if out.is_absolute() else Path(runtime.cwd) / out,
        "superlink": opt("superlink"),
        "root_certificates": opt("root_certificates"),
        "connection": opt("connection"),
        "flwr_home": opt("flwr_home"),
        "timeout": inputs.timeout,
        "round_timeout": inputs.round_timeout,
        "connect_timeout": inputs.connect_timeout,
        "num_shares": inputs.num_shares,
        "reconstruction_threshold": inputs.reconstruction_threshold,
    }


class _FederatedAnalysisInputSpec(FlowerRunInputSpec):
    request = File(
        exists=True, resolve=True, mandatory=True, desc="the analysis request the sites approved"
    )
    out_dir = Str("federated", usedefault=True, desc="output folder (relative: in the node)")
    timeout = traits.Float(900.0, usedefault=True, desc="seconds the whole run may take")


class _FederatedAnalysisOutputSpec(TraitedSpec):
    pooled_results = File(exists=True, desc="pooled_results.tsv (fednipype-meta's columns)")
    site_estimates = File(exists=True, desc="each contributing site's intercept")
    report = File(exists=True, desc="index.html, the summary page")
    federation_json = File(exists=True, desc="the run's record: sites, reasons, hash, timings")
    secure_sum = File(exists=True, desc="the server app's secure_sum.json")
    plots = OutputMultiObject(File(exists=True), desc="forest plots of the site intercepts")


class FederatedAnalysis(SimpleInterface):
    """Run a federated request through the consortium's SuperLink and pool the secure sum.

    A thin node over :func:`run_federated_analysis` (the ``fednipype-federate`` command):
    the same files in ``out_dir`` (inside the node's working directory when relative).

    Examples
    --------
    A coordinator's node (nothing runs until the workflow does)::

        fed = FederatedAnalysis(
            request="age-gm-2026.json",
            superlink="hub.example.org:9092",
            root_certificates="ca.crt",
        )
        fed.inputs.timeout = 600.0
    """

    input_spec = _FederatedAnalysisInputSpec
    output_spec = _FederatedAnalysisOutputSpec

    def _run_interface(self, runtime):
        options = flower_run_options(self.inputs, runtime)
        run = run_federated_analysis(self.inputs.request, options.pop("out_dir"), **options)
        self._results.update(
            pooled_results=str(run.report.tsv),
            site_estimates=str(run.report.sites_tsv),
            report=str(run.report.html),
            federation_json=str(run.report.federation),
            secure_sum=str(run.report.secure_sum),
            plots=[str(p) for p in run.report.plots],
        )
        return runtime
