"""``FederatedFit``: a coordinator's Nipype node over federated training.

A thin layer over :func:`fednipype.federated.training.run_federated_training` (what
``fednipype-train`` runs): the training request through the consortium's SuperLink (or a
simulation of the given sites), the model file ``model.json`` (loadable with
:func:`fednipype.learn.modelfile.load_model` as a scikit-learn estimator), ``metrics.tsv`` and
the run's record ``training.json``.

Paths given to the node are made absolute when they are set (the node runs in its own working
directory), and so are the relative paths of a simulated site's node config: relative to the
folder of the ``simulate`` file.
"""

from __future__ import annotations

from nipype.interfaces.base import (
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from fednipype.federated.training import read_simulated_sites, run_federated_training
from fednipype.interfaces.federated import FlowerRunInputSpec, flower_run_options

__all__ = ["FederatedFit"]


class _FederatedFitInputSpec(FlowerRunInputSpec):
    request = File(
        exists=True, resolve=True, mandatory=True, desc="the training request the sites approved"
    )
    simulate = File(
        exists=True,
        resolve=True,
        desc="instead: simulate the sites of this JSON list of node configs (relative paths "
        "in them: from this file's folder)",
    )
    out_dir = Str("federated_fit", usedefault=True, desc="output folder (relative: in the node)")
    timeout = traits.Float(1800.0, usedefault=True, desc="seconds the whole run may take")
    check_timeout = traits.Float(120.0, usedefault=True, desc="seconds for the check round")
    patience = traits.Int(0, usedefault=True, desc="mode none: early-stopping patience (rounds)")


class _FederatedFitOutputSpec(TraitedSpec):
    model = File(exists=True, desc="model.json: the trained model with its provenance")
    metrics = File(exists=True, desc="metrics.tsv: one row per round")
    record = File(exists=True, desc="training.json: sites, rounds, privacy spent, timings")


class FederatedFit(SimpleInterface):
    """Train a model across the consortium's sites and write the model file.

    A thin node over :func:`run_federated_training` (the ``fednipype-train`` command): the
    same files in ``out_dir`` (inside the node's working directory when relative).

    Examples
    --------
    A coordinator's node (nothing runs until the workflow does)::

        fit = FederatedFit(
            request="brain-age-2026.json",
            superlink="hub.example.org:9092",
            root_certificates="ca.crt",
        )
        fit.inputs.timeout = 3600.0
    """

    input_spec = _FederatedFitInputSpec
    output_spec = _FederatedFitOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        options = flower_run_options(inputs, runtime)
        simulate = inputs.simulate if isdefined(inputs.simulate) else None
        run = run_federated_training(
            inputs.request,
            options.pop("out_dir"),
            sites=read_simulated_sites(simulate) if simulate is not None else None,
            check_timeout=inputs.check_timeout,
            patience=inputs.patience,
            **options,
        )
        self._results.update(
            model=str(run.model), metrics=str(run.metrics), record=str(run.record_path)
        )
        return runtime
