"""The trained model as one JSON file (schema ``fednipype-model/1.0``) and its loader.

The file holds what predicting needs — task, feature names, the public scaling and ``w`` in
scaled units — and the run's provenance: the request (id and content hash), every site with
the rounds it took part in and its status, the rounds run, the privacy each site spent (or
``null`` without DP), the per-round metrics (non-DP runs only), software versions and the UTC
creation time. :func:`load_model` returns an ordinary scikit-learn estimator
(:func:`fednipype.learn.models.to_sklearn`) with the provenance attached as
``fednipype_provenance_``. A file that does not conform is refused with a
:class:`~fednipype.exceptions.DataError` naming the file and the field.

Layout::

    {"schema": "fednipype-model/1.0", "task": "brain-age",
     "features": ["L_P01", ...],
     "scaling": {"lo": [...], "hi": [...], "label": [18, 90] | null},
     "w": [intercept, coef_1, ...],
     "provenance": {"request_id": ..., "request_hash": ..., "rounds": 20,
                    "sites": [{"site": ..., "rounds": [1, ...], "status": "completed"}, ...],
                    "privacy": {"<site>": {"epsilon", "delta", "noise_multiplier",
                                           "sampling_rate", "steps", "accountant"}} | null,
                    "metrics": [{"round": 1, ...}, ...] | null,
                    "software": {...}, "created": "2026-...Z"}}
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge

from fednipype.exceptions import DataError
from fednipype.io import atomic_write_json
from fednipype.learn import models

__all__ = ["SCHEMA", "ModelFile", "load_model", "read_model", "save_model", "software_versions"]

SCHEMA = "fednipype-model/1.0"
#: Packages whose versions the provenance records.
SOFTWARE = ("fednipype", "flwr", "numpy", "scikit-learn", "dp-accounting")
_STATUS = re.compile(r"^(completed|refused|dropped at round [1-9][0-9]*)$")
_PRIVACY_FIELDS = ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "accountant")


@dataclass(frozen=True)
class ModelFile:
    """Every field of a model file, checked."""

    task: str
    features: list[str]
    scaling: models.FeatureScaling
    w: np.ndarray
    provenance: dict[str, Any]

    def estimator(self) -> Ridge | LogisticRegression:
        """The scikit-learn estimator, with ``fednipype_provenance_`` attached."""
        est = models.to_sklearn(self.task, self.w, self.scaling, self.features)
        est.fednipype_provenance_ = self.provenance
        return est


def software_versions() -> dict[str, str | None]:
    """Installed versions of :data:`SOFTWARE` (None for a package that is not installed)."""
    out: dict[str, str | None] = {}
    for name in SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class _Checker:
    """Field checks that raise one-line DataErrors naming the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, expected: str, got: Any) -> DataError:
        shown = repr(got)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return DataError(f"{self.source}: field {field!r}: expected {expected}, got {shown}")

    def get(self, block: Mapping[str, Any], key: str, field: str) -> Any:
        if not isinstance(block, Mapping) or key not in block:
            raise self.fail(field, "a value (missing)", None)
        return block[key]

    def number(self, value: Any, field: str, *, positive: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (positive and value <= 0):
            raise self.fail(field, "a finite number" + (" > 0" if positive else ""), value)
        return float(value)

    def numbers(self, value: Any, field: str, length: int) -> np.ndarray:
        if not isinstance(value, list) or len(value) != length:
            raise self.fail(field, f"a list of {length} finite numbers", value)
        return np.array([self.number(v, f"{field}[{i}]") for i, v in enumerate(value)])

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, "a non-empty string", value)
        return value


def _check_provenance(c: _Checker, prov: Any) -> dict[str, Any]:
    if not isinstance(prov, Mapping):
        raise c.fail("provenance", "an object", prov)
    c.text(c.get(prov, "request_id", "provenance/request_id"), "provenance/request_id")
    c.text(c.get(prov, "request_hash", "provenance/request_hash"), "provenance/request_hash")
    rounds = c.get(prov, "rounds", "provenance/rounds")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise c.fail("provenance/rounds", "a whole number >= 0", rounds)
    sites = c.get(prov, "sites", "provenance/sites")
    if not isinstance(sites, list) or not sites:
        raise c.fail("provenance/sites", "a non-empty list of sites", sites)
    for i, site in enumerate(sites):
        field = f"provenance/sites[{i}]"
        c.text(c.get(site, "site", f"{field}/site"), f"{field}/site")
        taken = c.get(site, "rounds", f"{field}/rounds")
        if not isinstance(taken, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= rounds for r in taken
        ):
            raise c.fail(f"{field}/rounds", f"a list of round numbers 1..{rounds}", taken)
        status = c.get(site, "status", f"{field}/status")
        if not isinstance(status, str) or not _STATUS.match(status):
            raise c.fail(
                f"{field}/status", "'completed', 'refused' or 'dropped at round <r>'", status
            )
    privacy = c.get(prov, "privacy", "provenance/privacy")
    if privacy is not None:
        if not isinstance(privacy, Mapping) or not privacy:
            raise c.fail("provenance/privacy", "null (no DP) or an object by site", privacy)
        for name, spent in privacy.items():
            field = f"provenance/privacy/{name}"
            for key in _PRIVACY_FIELDS:
                value = c.get(spent, key, f"{field}/{key}")
                if key == "accountant":
                    c.text(value, f"{field}/{key}")
                else:
                    c.number(value, f"{field}/{key}", positive=True)
    metrics = c.get(prov, "metrics", "provenance/metrics")
    if metrics is not None and not (
        isinstance(metrics, list) and all(isinstance(m, Mapping) for m in metrics)
    ):
        raise c.fail("provenance/metrics", "null or a list of per-round objects", metrics)
    software = c.get(prov, "software", "provenance/software")
    if not isinstance(software, Mapping) or not all(
        isinstance(v, str | type(None)) for v in software.values()
    ):
        raise c.fail("provenance/software", "an object of package versions", software)
    created = c.text(c.get(prov, "created", "provenance/created"), "provenance/created")
    try:
        stamp = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise c.fail("provenance/created", "an ISO 8601 UTC time", created) from None
    if stamp.utcoffset() != dt.timedelta(0):
        raise c.fail("provenance/created", "an ISO 8601 UTC time", created)
    return dict(prov)


def _from_document(doc: Any, source: str) -> ModelFile:
    c = _Checker(source)
    if not isinstance(doc, Mapping):
        raise c.fail("(document)", "a JSON object", type(doc).__name__)
    schema = c.get(doc, "schema", "schema")
    if schema != SCHEMA:
        raise c.fail("schema", repr(SCHEMA), schema)
    task = c.get(doc, "task", "task")
    if task not in models.TASKS:
        raise c.fail("task", f"one of {list(models.TASKS)}", task)
    features = c.get(doc, "features", "features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f for f in features)
        or len(set(features)) != len(features)
    ):
        raise c.fail("features", "a non-empty list of distinct names", features)
    d = len(features)
    block = c.get(doc, "scaling", "scaling")
    lo = c.numbers(c.get(block, "lo", "scaling/lo"), "scaling/lo", d)
    hi = c.numbers(c.get(block, "hi", "scaling/hi"), "scaling/hi", d)
    if not np.all(hi > lo):
        raise c.fail("scaling/hi", "every upper bound above its lower bound", block["hi"])
    label = c.get(block, "label", "scaling/label")
    if task == "brain-age":
        pair = c.numbers(label, "scaling/label", 2)
        if not pair[1] > pair[0]:
            raise c.fail("scaling/label", "[lo, hi] with hi > lo", label)
        label_bounds: tuple[float, float] | None = (float(pair[0]), float(pair[1]))
    elif label is not None:
        raise c.fail("scaling/label", "null for the diagnosis task", label)
    else:
        label_bounds = None
    w = c.numbers(c.get(doc, "w", "w"), "w", d + 1)
    provenance = _check_provenance(c, c.get(doc, "provenance", "provenance"))
    scaling = models.FeatureScaling(lo, hi, label_bounds)
    return ModelFile(task, list(features), scaling, w, provenance)


def save_model(
    path: str | os.PathLike[str],
    *,
    task: str,
    features: Sequence[str],
    scaling: models.FeatureScaling,
    w: Any,
    provenance: Mapping[str, Any],
) -> Path:
    """Check and write the model file atomically.

    Parameters
    ----------
    path : path-like
        Where to write the JSON file.
    task : {"brain-age", "diagnosis"}
    features : sequence of str
        Feature (region) names in the order of ``w``.
    scaling : FeatureScaling
        The public scaling used in training.
    w : ndarray
        ``[intercept, coef...]`` in scaled units.
    provenance : Mapping
        ``request_id``, ``request_hash``, ``rounds``, ``sites``, ``privacy``, ``metrics``;
        ``software`` (default :func:`software_versions`) and ``created`` (default now, UTC)
        are filled in when absent.

    Returns
    -------
    pathlib.Path
    """
    prov = dict(provenance)
    prov.setdefault("software", software_versions())
    prov.setdefault(
        "created", dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
    doc = {
        "schema": SCHEMA,
        "task": task,
        "features": [str(f) for f in features],
        "scaling": {
            "lo": scaling.lo.tolist(),
            "hi": scaling.hi.tolist(),
            "label": list(scaling.label) if scaling.label is not None else None,
        },
        "w": np.asarray(w, dtype=float).tolist(),
        "provenance": prov,
    }
    # the same checks a reader applies, before anything is written
    _from_document(json.loads(json.dumps(doc, allow_nan=True)), os.fspath(path))
    return atomic_write_json(path, doc)


def read_model(path: str | os.PathLike[str]) -> ModelFile:
    """Read and check every field of a model file."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{source}: cannot read the model file ({exc.strerror})") from None
    try:
        doc = json.loads(text, parse_constant=lambda name: float("nan"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return _from_document(doc, source)


def load_model(path: str | os.PathLike[str]) -> Ridge | LogisticRegression:
    """The model file as a scikit-learn estimator (``fednipype_provenance_`` attached)."""
    return read_model(path).estimator()
