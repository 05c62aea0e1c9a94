"""The hub's bookkeeping of a federated training run: provenance, metrics, the model file.

The training server app (:mod:`fednipype.federated.app.training_server`) collects, per round,
which sites contributed to the secure sum, the summed weight and (mode ``none`` only) the
held-out metrics the sites sent; this module turns that into

- ``training.json`` (schema ``fednipype-training-run/1.0``): the run's record — the request's
  id and content hash, every request site with its check-round answer, the rounds it took
  part in and its status (``completed``, ``dropped at round r``, ``refused``, ...), the
  privacy each participating site spent (the request's accountant numbers, which every site
  derives alike and charges to its ledger), the rounds, the transport and timings;
- ``metrics.tsv``: one row per round (the aggregated held-out metrics in mode ``none``, the
  contributors and summed weight in every mode);
- ``model.json``: the model file (:func:`fednipype.learn.modelfile.save_model`), whose
  provenance is the record's.

The hub holds no participant data: every number here is a sum over sites or a metric a site
chose to send (mode ``none``, opted in by its owner).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fednipype import __version__
from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import DataError

__all__ = [
    "METRICS_NAME",
    "model_provenance",
    "MODEL_NAME",
    "RECORD_NAME",
    "RECORD_SCHEMA",
    "privacy_spent",
    "read_training_record",
    "site_participation",
    "software_versions",
    "write_json",
    "write_metrics_tsv",
    "write_model",
]

RECORD_SCHEMA = "fednipype-training-run/1.0"
RECORD_NAME = "training.json"
METRICS_NAME = "metrics.tsv"
MODEL_NAME = "model.json"
#: The accountant the request's (ε, δ) comes from (:mod:`fednipype.learn.accountant`).
ACCOUNTANT = "dp-accounting RDP"


def software_versions() -> dict[str, str | None]:
    """Versions of fednipype and the libraries a model depends on (None if absent)."""
    versions: dict[str, str | None] = {"fednipype": __version__}
    for dist in ("flwr", "numpy", "scikit-learn", "dp-accounting"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def privacy_spent(request: TrainingRequest) -> dict[str, Any] | None:
    """What the run costs one participating site (None in mode ``none``).

    The same at every site by construction: each derives the noise from the request
    (:meth:`TrainingRequest.noise`) and charges :meth:`TrainingRequest.spent` to its ledger
    before its first reply.
    """
    noise, spent = request.noise(), request.spent()
    if noise is None or spent is None:
        return None
    found = {
        "epsilon": spent[0],
        "delta": spent[1],
        "noise_multiplier": noise[0],
        "count_noise_multiplier": noise[1],
        "sampling_rate": request.sampling_rate,
        "clip": request.clip,
        "steps": request.steps,
        "accountant": ACCOUNTANT,
    }
    if (shared := request.distributed_noise()) is not None:
        # The guarantee holds while min_sites sites' shares are in every sum; the local
        # floor is what a site's own share guarantees if every other site colluded.
        found["accountant"] = str(shared.as_dict()["accounting"])
        found["distributed"] = shared.as_dict()
    return found


def site_participation(
    request: TrainingRequest,
    checks: Sequence[Mapping[str, Any]],
    rounds: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per request site: check answer, rounds taken part in, status, privacy spent.

    Parameters
    ----------
    request : TrainingRequest
    checks : sequence of mapping
        The check round's table (``site``, ``status``, ``reason``; status ``accepted``,
        ``refused``, ``error``, ``no-reply`` or ``absent``).
    rounds : sequence of mapping
        The completed rounds (``round``, ``contributors``).

    Returns
    -------
    list of dict
        ``status`` is ``completed`` (every round run), ``dropped at round r`` (the first
        round run without it, after it had joined), ``joined at round r`` (missed the first
        rounds, then stayed), ``no round`` (accepted, never contributed), or the check
        round's status; ``privacy_spent`` is the request's per-site cost for sites that were
        sent a round (a site charges before its first reply), else None.
    """
    run = [int(r["round"]) for r in rounds]
    spent = privacy_spent(request)
    by_site = {str(row["site"]): row for row in checks}
    table = []
    for site in request.sites:
        row = by_site.get(site, {"status": "absent", "reason": ""})
        took = [int(r["round"]) for r in rounds if site in r["contributors"]]
        status = str(row["status"])
        if status == "accepted":
            if not took:
                status = "no round"
            elif took == run:
                status = "completed"
            elif took == run[: len(took)]:
                status = f"dropped at round {run[len(took)]}"
            else:
                status = f"joined at round {took[0]}" if took[-1] == run[-1] else "intermittent"
        table.append(
            {
                "site": site,
                "status": status,
                "reason": str(row.get("reason", "")),
                "rounds": took,
                "privacy_spent": spent if row["status"] == "accepted" and run else None,
            }
        )
    return table


def write_json(doc: Mapping[str, Any], path: Path) -> Path:
    """Write ``doc`` atomically (a temporary file in the folder, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=1, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def write_metrics_tsv(rounds: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``metrics.tsv``: round, contributors, summed weight, loss and each aggregated metric."""
    names = sorted({key for r in rounds for key in (r.get("metrics") or {})})
    columns = ["round", "contributors", "total_weight", "loss", *names]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for r in rounds:
            metrics = r.get("metrics") or {}
            values = [r.get("loss"), *(metrics.get(name) for name in names)]
            writer.writerow(
                [r["round"], ",".join(r["contributors"]), f"{float(r['total_weight']):.6g}"]
                + ["n/a" if v is None else f"{float(v):.6g}" for v in values]
            )
    return path


def _model_status(row: Mapping[str, Any], run: Sequence[int]) -> str:
    """The model file's status of a site: ``completed``, ``dropped at round r`` or ``refused``
    (a site that took no round for any reason: the record's ``detail`` says which)."""
    status, took = str(row["status"]), list(row["rounds"])
    if status == "completed" or status.startswith("dropped at round "):
        return status
    if not took:
        return "refused"
    missing = [r for r in run if r not in took]
    return f"dropped at round {missing[0]}" if missing else "completed"


def model_provenance(record: Mapping[str, Any]) -> dict[str, Any]:
    """The model file's provenance (:func:`fednipype.learn.modelfile.save_model`) of a record.

    Sites with the rounds they took part in and their status (``completed``, ``dropped at
    round r``, ``refused``; the record's own status and public reason as ``detail`` and
    ``reason``), privacy spent by site (mode ``dp``: the sites that were sent a round), the
    per-round metrics (mode ``none``), and the run's facts.
    """
    run = [int(r["round"]) for r in record["rounds"]]
    sites = [
        {
            "site": row["site"],
            "rounds": list(row["rounds"]),
            "status": _model_status(row, run),
            "detail": row["status"],
            "reason": row.get("reason", ""),
        }
        for row in record["sites"]
    ]
    privacy = {
        row["site"]: dict(row["privacy_spent"])
        for row in record["sites"]
        if row.get("privacy_spent")
    }
    metrics = None
    if record.get("evaluate"):
        metrics = [
            {"round": r["round"], "loss": r["loss"], **r["metrics"]}
            for r in record["rounds"]
            if r.get("loss") is not None
        ]
    return {
        "request_id": record["request_id"],
        "request_hash": record["request_hash"],
        "rounds": len(run),
        "sites": sites,
        "privacy": privacy or None,
        "metrics": metrics,
        "software": dict(record["software"]),
        "mode": record["mode"],
        "rounds_requested": record["rounds_requested"],
        "best_round": record.get("best_round"),
        "halted": record.get("halted"),
        "early_stop": record.get("early_stop"),
        "secure_aggregation": record.get("secure_aggregation"),
    }


def write_model(
    path: Path, request: TrainingRequest, w: np.ndarray, record: Mapping[str, Any]
) -> Path:
    """The model file of ``w`` (scaled units) with the provenance of the run's ``record``."""
    # Imported here: the model file's module is needed only once a model exists.
    from fednipype.learn import modelfile

    return modelfile.save_model(
        path,
        task=request.task,
        features=list(request.regions),
        scaling=request.scaling,
        w=np.asarray(w, dtype=np.float64),
        provenance=model_provenance(record),
    )


def read_training_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``training.json``.

    Raises
    ------
    DataError
        Unreadable, or not a ``fednipype-training-run/1.0`` document (naming the file).
    """
    target = Path(path)
    try:
        doc = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{target}: unreadable training record ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema") != RECORD_SCHEMA:
        raise DataError(f"{target}: schema: expected {RECORD_SCHEMA!r}")
    for key in ("status", "request_hash", "sites", "rounds"):
        if key not in doc:
            raise DataError(f"{target}: field '{key}' is missing")
    return doc
