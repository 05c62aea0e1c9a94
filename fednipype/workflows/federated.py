"""Hub-side workflow: a training request through the consortium → the model file and metrics."""

from __future__ import annotations

import os

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from fednipype.interfaces.training import FederatedFit


def init_federated_wf(
    *,
    request: str | os.PathLike[str],
    superlink: str | None = None,
    root_certificates: str | os.PathLike[str] | None = None,
    connection: str | None = None,
    flwr_home: str | os.PathLike[str] | None = None,
    simulate: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "federated_fit",
    timeout: float = 1800.0,
    round_timeout: float = 120.0,
    check_timeout: float = 120.0,
    connect_timeout: float = 60.0,
    num_shares: int = 3,
    reconstruction_threshold: int = 2,
    patience: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
    name: str = "federated_wf",
) -> pe.Workflow:
    """Build the coordinator's workflow that trains a model across the consortium's sites.

    One :class:`~fednipype.interfaces.training.FederatedFit` node (check round, FedAvg rounds
    through SecAgg+, the model file) and an ``outputnode`` with ``model``, ``metrics`` and
    ``record`` for whatever a lab connects next (its evaluation, a report, a datasink).

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from fednipype.workflows.federated import init_federated_wf
            wf = init_federated_wf(request="request.json", superlink="hub:9092",
                                   root_certificates="ca.crt")

    Parameters
    ----------
    request : path-like
        The training request the sites approved.
    superlink, root_certificates, connection, flwr_home, simulate : optional
        The engine: the SuperLink with the consortium CA, a connection of an existing Flower
        home, or a JSON list of node configs to simulate (exactly one).
    out_dir : path-like
        Output folder (relative: inside the node's working directory).
    timeout, round_timeout, check_timeout, connect_timeout : float
        Seconds for the whole run, each SecAgg+ stage, the check round and the sites to
        connect.
    num_shares, reconstruction_threshold : int
        SecAgg+'s shares per secret (3 to the request's number of sites) and shares needed.
    patience : int
        Mode ``none``: early-stopping patience in rounds (0: off).
    work_dir : path-like, optional
        The workflow's base directory.
    name : str
        The workflow's name.

    Outputs
    -------
    model, metrics, record
        ``model.json``, ``metrics.tsv`` and ``training.json``.
    """
    workflow = pe.Workflow(name=name, base_dir=None if work_dir is None else str(work_dir))
    fit = pe.Node(FederatedFit(request=os.fspath(request)), name="federated_fit")
    fit.inputs.out_dir = os.fspath(out_dir)
    for key, number in (
        ("timeout", timeout),
        ("round_timeout", round_timeout),
        ("check_timeout", check_timeout),
        ("connect_timeout", connect_timeout),
    ):
        setattr(fit.inputs, key, float(number))
    fit.inputs.num_shares = int(num_shares)
    fit.inputs.reconstruction_threshold = int(reconstruction_threshold)
    fit.inputs.patience = int(patience)
    for key, value in (
        ("superlink", superlink),
        ("root_certificates", root_certificates),
        ("connection", connection),
        ("flwr_home", flwr_home),
        ("simulate", simulate),
    ):
        if value is not None:
            setattr(fit.inputs, key, os.fspath(value))
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["model", "metrics", "record"]), name="outputnode"
    )
    workflow.connect(
        [(fit, outputnode, [("model", "model"), ("metrics", "metrics"), ("record", "record")])]
    )
    return workflow
