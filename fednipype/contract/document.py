"""The release document: the only thing that leaves a site — schema, validation, I/O, hash.

A release is versioned JSON (``schema_version``) validated against the JSON Schema shipped in
``fednipype/data/release.schema.json`` when written and when read.  The schema admits no
property it does not name, restricts every string (no path separators, nothing shaped like a
participant label) and sizes every array by regions or model terms; :func:`validate` adds the
checks a schema cannot express (array shapes agree with the declared terms and regions, the
budget split sums to the declared total).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from fednipype import __version__
from fednipype.contract.calibration import (
    analytic_gaussian_sigma,
    sufficient_statistics_sensitivity,
)
from fednipype.exceptions import PolicyError, ReleaseValidationError
from fednipype.io import atomic_write_text

LOGGER = logging.getLogger(__name__)

SCHEMA_VERSION = "2.0"
#: Largest magnitude of any number in a release (statistics are sums over at most
#: max_participants rows of values in [-1, 1], plus noise): larger is an error, not a value.
MAX_MAGNITUDE = 1e15
#: Deepest nesting a release has (statistics/…/ztz/row/entry is 5 levels).
MAX_DEPTH = 8
#: Digits a JSON integer may have before it is refused unparsed.
_MAX_INT_DIGITS = 20
SCHEMA_FILE = "release.schema.json"
RELEASE_SUFFIX = "_release.json"


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The release JSON Schema (draft 2020-12) shipped with the package."""
    text = (resources.files("fednipype") / "data" / SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def canonical_json(doc: dict[str, Any]) -> str:
    """The document serialised canonically (sorted keys, no spaces): what gets hashed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def content_hash(doc: dict[str, Any]) -> str:
    """The release's one content hash: SHA-256 of :func:`canonical_json`.

    The privacy ledger records it in the audit row of the charge that paid for the release,
    and the hub's report shows it, so an auditor can match a file the hub pooled to the
    charge that paid for it. It does not depend on the file's indentation.
    """
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def validate(doc: Any, source: str = "<release>") -> dict[str, Any]:
    """Check a release against the schema and the cross-field rules.

    Parameters
    ----------
    doc : object
        The parsed document.
    source : str
        Where it came from, for error messages (a file name).

    Returns
    -------
    dict
        ``doc`` itself, for chaining.

    Raises
    ------
    ReleaseValidationError
        Naming ``source``, the JSON path of the offending field and what was expected.
    """
    _check_depth(doc, source)
    if isinstance(doc, dict) and doc.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ReleaseValidationError(
            f"{source}: schema_version {doc.get('schema_version')!r} is not supported "
            f"(this fednipype reads {SCHEMA_VERSION!r})"
        )
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ReleaseValidationError(f"{source}: field {where}: {first.message}{more}")
    _check_numbers(doc, source, "")
    _check_shapes(doc, source)
    _check_privacy(doc, source)
    return doc


def _check_depth(doc: Any, source: str) -> None:
    """Refuse documents nested deeper than any release can be (iteratively: no recursion)."""
    stack = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ReleaseValidationError(
                f"{source}: nested deeper than {MAX_DEPTH} levels; not a release"
            )
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def _check_numbers(obj: Any, source: str, path: str) -> None:
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        if not math.isfinite(obj):
            raise ReleaseValidationError(f"{source}: field {path}: expected a finite number")
        if abs(obj) > MAX_MAGNITUDE:
            raise ReleaseValidationError(
                f"{source}: field {path}: {float(obj):.3g} is beyond any value a release holds "
                f"(|x| <= {MAX_MAGNITUDE:g})"
            )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_numbers(value, source, f"{path}/{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_numbers(value, source, f"{path}/{i}")


def _check_shapes(doc: dict[str, Any], source: str) -> None:
    regions = doc["atlas"]["regions"]
    terms = doc["model"]["terms"]
    stats = doc["statistics"]
    split = doc["privacy"]["budget_split"]
    eps = sum(v["epsilon"] for v in split.values())
    delta = sum(v["delta"] for v in split.values())
    if not math.isclose(eps, doc["privacy"]["epsilon"], rel_tol=1e-9) or delta > doc["privacy"][
        "delta"
    ] * (1 + 1e-9):
        raise ReleaseValidationError(
            f"{source}: field privacy/budget_split: parts sum to (ε={eps}, δ={delta}), "
            f"not the declared (ε={doc['privacy']['epsilon']}, δ={doc['privacy']['delta']})"
        )
    if set(split) != set(stats):
        raise ReleaseValidationError(
            f"{source}: field privacy/budget_split: names {sorted(split)} must match the "
            f"statistics {sorted(stats)}"
        )
    for name, stat in stats.items():
        part = split[name]
        if not (
            math.isclose(stat["epsilon"], part["epsilon"], rel_tol=1e-9)
            and math.isclose(stat["delta"], part["delta"], rel_tol=1e-9, abs_tol=1e-300)
        ):
            raise ReleaseValidationError(
                f"{source}: field statistics/{name}: (ε, δ) differ from privacy/budget_split"
            )
    model = stats.get("sufficient_statistics")
    if model is not None:
        p, r = len(model["terms"]), len(model["regions"])
        if model["terms"] != terms or model["regions"] != regions:
            raise ReleaseValidationError(
                f"{source}: field statistics/sufficient_statistics: terms/regions differ from "
                "model/terms and atlas/regions"
            )
        if len(model["ztz"]) != p or any(len(row) != p for row in model["ztz"]):
            raise ReleaseValidationError(
                f"{source}: field statistics/sufficient_statistics/ztz: expected {p}×{p} (terms)"
            )
        if len(model["zty"]) != p or any(len(row) != r for row in model["zty"]):
            raise ReleaseValidationError(
                f"{source}: field statistics/sufficient_statistics/zty: expected {p}×{r} "
                "(terms×regions)"
            )
        if len(model["yty"]) != r:
            raise ReleaseValidationError(
                f"{source}: field statistics/sufficient_statistics/yty: expected {r} values "
                "(regions)"
            )


def _check_privacy(doc: dict[str, Any], source: str) -> None:
    """Recompute what a release declares about its privacy from public facts; refuse mismatches.

    The scaling must be the map of the declared bounds (dummies: 0/1 → −1/+1); the
    sensitivity follows from the terms and regions on that scale; σ from (ε, δ, Δ) by the
    analytic Gaussian mechanism; every per-entry noise variance is σ²; δ is below
    1/max_participants. A release that declares less noise than its (ε, δ) needs, or other
    units than its bounds, is refused rather than pooled.
    """
    privacy = doc["privacy"]
    block = doc["statistics"]["sufficient_statistics"]
    where = f"{source}: field statistics/sufficient_statistics"
    bounds = privacy["bounds"]
    terms, regions = block["terms"], block["regions"]
    scaling = block["scaling"]
    for name in [*terms[1:], *regions]:
        if name in bounds:
            lo, hi = bounds[name]
            expected = {"center": (lo + hi) / 2, "scale": (hi - lo) / 2}
        elif name in terms and "[" in name:
            expected = {"center": 0.5, "scale": 0.5}
        else:
            raise ReleaseValidationError(
                f"{source}: field privacy/bounds: no public bounds for {name!r}"
            )
        found = scaling.get(name)
        if found is None or any(
            not math.isclose(float(found[k]), expected[k], rel_tol=1e-12, abs_tol=1e-12)
            for k in ("center", "scale")
        ):
            raise ReleaseValidationError(
                f"{where}/scaling/{name}: {found!r} is not the map of the declared bounds "
                f"({expected})"
            )
    if privacy["delta"] >= 1.0 / privacy["max_participants"]:
        raise ReleaseValidationError(
            f"{source}: field privacy/delta: {privacy['delta']:g} is not below "
            f"1/max_participants = {1.0 / privacy['max_participants']:g}"
        )
    z_bounds = ([1.0] + [-1.0] * (len(terms) - 1), [1.0] * len(terms))
    y_bounds = ([-1.0] * len(regions), [1.0] * len(regions))
    unit = []
    for name in block["n_terms"]:
        # only the intercept and ±1-coded dummies square to 1 for everyone
        if name not in terms or not (name == terms[0] or "[" in name):
            raise ReleaseValidationError(
                f"{where}/n_terms: {name!r} is not the intercept or a dummy term"
            )
        i = terms.index(name)
        if block["ztz"][i][i] != block["n"]:
            raise ReleaseValidationError(
                f"{where}/ztz: the diagonal entry of {name!r} must be n (n_terms)"
            )
        unit.append(i)
    sensitivity = sufficient_statistics_sensitivity(z_bounds, y_bounds, unit)
    if not math.isclose(block["sensitivity"], sensitivity, rel_tol=1e-9):
        raise ReleaseValidationError(
            f"{where}/sensitivity: declared {block['sensitivity']:g}, but {len(terms)} terms and "
            f"{len(regions)} regions on the [-1, 1] scale give {sensitivity:g}"
        )
    try:
        sigma = analytic_gaussian_sigma(block["epsilon"], block["delta"], sensitivity)
    except PolicyError as err:
        raise ReleaseValidationError(f"{where}: {err}") from err
    if not math.isclose(block["scale"], sigma, rel_tol=1e-9):
        raise ReleaseValidationError(
            f"{where}/scale: declared noise sd {block['scale']:g}, but (epsilon="
            f"{block['epsilon']:g}, delta={block['delta']:g}, sensitivity={sensitivity:g}) "
            f"needs {sigma:g}"
        )
    for name, value in [("noise_variance", block["noise_variance"])] + [
        (f"noise_variances/{k}", v) for k, v in block["noise_variances"].items()
    ]:
        if not math.isclose(value, sigma**2, rel_tol=1e-9):
            raise ReleaseValidationError(
                f"{where}/{name}: {value:g}, but the noise sd {sigma:g} gives {sigma**2:g}"
            )


def new_release(
    *,
    dataset: str,
    site: str,
    atlas: dict[str, Any],
    feature: str,
    model: dict[str, Any],
    privacy: dict[str, Any],
    statistics: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a release document (not yet validated; :func:`write_release` validates).

    Parameters
    ----------
    dataset, site : str
        Dataset name and site label.
    atlas : dict
        ``name``, ``space``, ``sha256`` of the atlas image, ``regions`` (names, in order).
    feature : str
        The feature column released (e.g. ``volume_mm3``).
    model : dict
        ``response``, ``terms`` and ``reference_levels`` of the linear model.
    privacy : dict
        ``epsilon``, ``delta``, ``min_cohort``, ``budget_split``, ``bounds``,
        ``max_participants``, ``ledger_id``, ``ledger_charge``.
    statistics : dict
        Statistic name → its noisy values and mechanism description.

    Returns
    -------
    dict
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "fednipype-release",
        "dataset": dataset,
        "site": site,
        "software": {"name": "fednipype", "version": __version__},
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "atlas": atlas,
        "feature": feature,
        "model": model,
        "privacy": {
            "unit": "participant",
            "neighbouring": "add or remove one participant",
            **privacy,
        },
        "statistics": statistics,
    }


def write_release(doc: dict[str, Any], path: str | Path) -> Path:
    """Validate ``doc`` and write it atomically (temporary file, then rename).

    Raises
    ------
    ReleaseValidationError
        The document does not conform; nothing is written.
    """
    path = Path(path)
    validate(doc, source=str(path))
    return atomic_write_text(path, dumps(doc))


def dumps(doc: dict[str, Any]) -> str:
    """The text of a release file (indented JSON, final newline)."""
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def read_release(path: str | Path) -> dict[str, Any]:
    """Read and validate a release file.

    Raises
    ------
    ReleaseValidationError
        Unreadable file, invalid JSON, or a document that does not conform (naming the file).
    """
    path = Path(path)

    def parse_int(text: str) -> int:
        # Python's int() refuses (or takes quadratic time on) thousands of digits: refuse first.
        if len(text.lstrip("-")) > _MAX_INT_DIGITS:
            raise ReleaseValidationError(
                f"{path}: an integer of {len(text)} digits is beyond any value a release holds"
            )
        return int(text)

    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_int=parse_int)
    except FileNotFoundError as err:
        raise ReleaseValidationError(f"{path}: release file not found") from err
    except RecursionError as err:
        raise ReleaseValidationError(f"{path}: nested too deeply; not a release") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseValidationError(f"{path}: not a readable JSON release ({err})") from err
    return validate(doc, source=str(path))
