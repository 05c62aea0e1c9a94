"""The release document: the only thing that leaves a site — build, validate, read, write.

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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fednipype import __version__
from fednipype.exceptions import ReleaseValidationError
from fednipype.io import atomic_write_text

LOGGER = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

    from fednipype.site.design import ModelSpec
    from fednipype.hub.regression import SufficientStatistics
    from fednipype.site.policy import SitePolicy

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = "release.schema.json"
RELEASE_SUFFIX = "_release.json"


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The release JSON Schema (draft 2020-12) shipped with the package."""
    text = (resources.files("fednipype") / "data" / SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def canonical_json(doc: dict[str, Any]) -> str:
    """The document serialised canonically (sorted keys, no spaces): what gets hashed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def content_hash(doc: dict[str, Any]) -> str:
    """SHA-256 of :func:`canonical_json` — recorded in the privacy ledger's audit trail."""
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
    return doc


def _check_numbers(obj: Any, source: str, path: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ReleaseValidationError(f"{source}: field {path}: expected a finite number")
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
    model = stats.get("linear_model")
    if model is not None:
        p, r = len(model["terms"]), len(model["regions"])
        if model["terms"] != terms or model["regions"] != regions:
            raise ReleaseValidationError(
                f"{source}: field statistics/linear_model: terms/regions differ from "
                "model/terms and atlas/regions"
            )
        if len(model["ztz"]) != p or any(len(row) != p for row in model["ztz"]):
            raise ReleaseValidationError(
                f"{source}: field statistics/linear_model/ztz: expected {p}×{p} (terms)"
            )
        if len(model["zty"]) != p or any(len(row) != r for row in model["zty"]):
            raise ReleaseValidationError(
                f"{source}: field statistics/linear_model/zty: expected {p}×{r} (terms×regions)"
            )
        if len(model["yty"]) != r:
            raise ReleaseValidationError(
                f"{source}: field statistics/linear_model/yty: expected {r} values (regions)"
            )
    means = stats.get("group_means")
    if means is not None:
        if means["regions"] != regions:
            raise ReleaseValidationError(
                f"{source}: field statistics/group_means/regions: differ from atlas/regions"
            )
        for group, values in means["groups"].items():
            if len(values["means"]) != len(regions):
                raise ReleaseValidationError(
                    f"{source}: field statistics/group_means/groups/{group}/means: expected "
                    f"{len(regions)} values (regions)"
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
        ``epsilon``, ``delta``, ``min_cohort``, ``budget_split``, ``bounds``, ``ledger_charge``.
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
    return atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def read_release(path: str | Path) -> dict[str, Any]:
    """Read and validate a release file.

    Raises
    ------
    ReleaseValidationError
        Unreadable file, invalid JSON, or a document that does not conform (naming the file).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ReleaseValidationError(f"{path}: release file not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseValidationError(f"{path}: not a readable JSON release ({err})") from err
    return validate(doc, source=str(path))


def sufficient_statistics(doc: dict[str, Any]) -> SufficientStatistics:
    """The release's linear-model statistics, in the scaled units they were released in.

    Parameters
    ----------
    doc : dict
        A validated release holding ``statistics/linear_model``.

    Returns
    -------
    fednipype.hub.regression.SufficientStatistics
    """
    from fednipype.hub.regression import SufficientStatistics

    model = doc["statistics"].get("linear_model")
    if model is None:
        raise ReleaseValidationError(
            f"release of site {doc.get('site')!r}: no statistics/linear_model to pool"
        )
    noise = model["noise_variances"]
    n = model["n"]
    floor = len(model["terms"]) + 1
    if n < floor:
        # A noisy count can fall below the number of parameters (or below zero) at small ε;
        # raising it is post-processing of a released value, so it costs no privacy.
        LOGGER.warning(
            "release of site %r: noisy n = %.1f raised to %d (terms + 1)",
            doc.get("site"),
            n,
            floor,
        )
        n = float(floor)
    return SufficientStatistics(
        terms=tuple(model["terms"]),
        regions=tuple(model["regions"]),
        ztz=model["ztz"],
        zty=model["zty"],
        yty=model["yty"],
        n=n,
        ztz_noise_var=noise["ztz"],
        zty_noise_var=noise["zty"],
        yty_noise_var=noise["yty"],
    )


def unscale_coefficients(
    table: pd.DataFrame, scaling: dict[str, dict[str, float]]
) -> pd.DataFrame:
    """Convert regression results from the released scaled units back to original units.

    Released statistics use ``x_s = (x − center) / scale`` for every covariate and for each
    region's response, with centers and scales fixed by the public bounds.  A slope becomes
    ``β = β_s · scale_y / scale_x``; the intercept becomes the expected response at the
    covariates' centers, ``center_y + scale_y · β_s``.  Standard errors and confidence limits
    scale the same way (the maps are affine and increasing).

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`fednipype.hub.regression.pooled_regression` or
        :func:`fednipype.hub.regression.site_estimates` (columns ``region``, ``term``, ``estimate``,
        ``se``, ``ci_low``, ``ci_high``).
    scaling : dict
        The release's ``statistics/linear_model/scaling``.

    Returns
    -------
    pandas.DataFrame
        A copy in original units.
    """
    out = table.copy()
    factor = []
    shift = []
    for region, term in zip(out["region"], out["term"], strict=True):
        y = scaling[region]
        if term == "intercept":
            factor.append(y["scale"])
            shift.append(y["center"])
        else:
            factor.append(y["scale"] / scaling[term]["scale"])
            shift.append(0.0)
    factor_arr = [float(f) for f in factor]
    for column in ("estimate", "ci_low", "ci_high"):
        out[column] = out[column] * factor_arr + shift
    out["se"] = out["se"] * factor_arr
    return out


#: Default split of a release's (ε, δ) across its statistics (fractions of each).
DEFAULT_SPLIT = {"linear_model": 0.7, "group_means": 0.3}


def _mechanism_fields(mech) -> dict[str, Any]:
    return {
        "mechanism": mech.name,
        "calibration": mech.calibration,
        "sampler": mech.sampler,
        "epsilon": mech.epsilon,
        "delta": mech.delta,
        "sensitivity": mech.sensitivity,
        "sensitivity_norm": mech.sensitivity_norm,
        "scale": mech.noise_scale,
        "noise_variance": mech.noise_variance,
    }


def _atlas_provenance(tsvs: list[Path], regions: tuple[str, ...]) -> dict[str, Any]:
    from fednipype.features import read_sidecar

    hashes, first = set(), None
    for tsv in tsvs:
        atlas = read_sidecar(tsv).get("Atlas") or {}
        hashes.add(atlas.get("ImageSha256"))
        first = first or atlas
    if len(hashes) != 1 or None in hashes:
        raise ReleaseValidationError(
            f"{tsvs[0]}: the feature files were made with different (or unrecorded) atlases"
        )
    return {
        "name": str(first.get("Name") or "atlas"),
        "space": first.get("Space"),
        "sha256": hashes.pop(),
        "regions": list(regions),
    }


def make_release(
    *,
    features: Sequence[str | Path],
    participants: str | Path,
    policy: SitePolicy | str | Path,
    epsilon: float,
    delta: float,
    site: str,
    out_path: str | Path,
    spec: ModelSpec | None = None,
    dataset: str | None = None,
    split: Mapping[str, float] | None = None,
) -> Path:
    """Make a site's DP release: validate, charge the ledger, draw the noise, write atomically.

    Everything that can be refused is checked before the ledger is charged: the budget
    parameters, the policy's public bounds for every covariate and region, the disclosure
    rules (``min_cohort`` overall and in every group; δ < 1/n) and the document's structure.
    Only then is (ε, δ) charged to the dataset's ledger, the noise drawn (OpenDP) and the
    release written through a temporary file whose hash the ledger records before the rename.

    Covariates and responses are mapped to [-1, 1] with their public bounds (center = midpoint,
    scale = half-width; dummies 0/1 → -1/+1) before the sufficient statistics are computed, which
    keeps their sensitivity small; the release records the maps (``scaling``).

    Parameters
    ----------
    features : sequence of path-like
        The site's ``*_desc-regional_features.tsv`` files (one per subject/session).
    participants : path-like
        Dataset root or ``participants.tsv``.
    policy : SitePolicy or path-like
        The site policy (bounds, min cohort, ledger).
    epsilon, delta : float
        What this release costs, split across its statistics by ``split``.
    site : str
        Site label written in the release.
    out_path : path-like
        Release file (``*_release.json``).
    spec : ModelSpec, optional
        The linear model (default: feature ``volume_mm3`` on age, sex and group).
    dataset : str, optional
        Dataset name written in the release (default: the site label).
    split : mapping, optional
        Fraction of (ε, δ) per statistic (``linear_model``, ``group_means``); default
        :data:`DEFAULT_SPLIT`.

    Returns
    -------
    pathlib.Path
        The release file.

    Raises
    ------
    PolicyError, DisclosureError, PrivacyBudgetExceeded, ReleaseValidationError, BIDSError
        With nothing charged (except a failure after the charge, which keeps the charge:
        fail-closed) and nothing written.
    """
    import numpy as np

    from fednipype.bids import read_participants
    from fednipype.site.design import ModelSpec, build_design, load_feature_table
    from fednipype.site.ledger import PrivacyLedger
    from fednipype.site.mechanisms import prepare
    from fednipype.site.policy import SitePolicy, check_delta, check_epsilon

    spec = spec or ModelSpec()
    if not isinstance(policy, SitePolicy):
        policy = SitePolicy.from_toml(policy)
    epsilon = check_epsilon(epsilon, "release epsilon")
    delta = check_delta(delta, "release delta")
    if delta <= 0:
        raise ReleaseValidationError("release delta: must be > 0 (Gaussian mechanism)")
    fractions = dict(split or DEFAULT_SPLIT)
    unknown = sorted(set(fractions) - set(DEFAULT_SPLIT))
    if unknown or not fractions or any(f <= 0 for f in fractions.values()):
        raise ReleaseValidationError(
            f"release split: expected positive fractions for {sorted(DEFAULT_SPLIT)}, "
            f"got {fractions}"
        )
    if not math.isclose(sum(fractions.values()), 1.0, rel_tol=1e-9):
        raise ReleaseValidationError(f"release split: fractions must sum to 1, got {fractions}")
    budget = {k: (epsilon * f, delta * f) for k, f in fractions.items()}

    tsvs = [Path(f) for f in features]
    table = load_feature_table(tsvs, feature=spec.response)
    design = build_design(table, read_participants(participants), spec)
    regions = design.regions
    atlas = _atlas_provenance(tsvs, regions)

    # Public bounds → affine maps onto [-1, 1]; dummies 0/1 → -1/+1.
    scaling: dict[str, dict[str, float]] = {}
    for term in spec.numeric:
        lo, hi = policy.covariate_bounds(term)
        scaling[term] = {"center": (lo + hi) / 2, "scale": (hi - lo) / 2}
    for term in design.terms[1 + len(spec.numeric) :]:
        scaling[term] = {"center": 0.5, "scale": 0.5}
    lows, highs = policy.feature_bounds_arrays(regions)
    for region, lo, hi in zip(regions, lows, highs, strict=True):
        scaling[region] = {"center": (lo + hi) / 2, "scale": (hi - lo) / 2}
    z_center = np.array([0.0] + [scaling[t]["center"] for t in design.terms[1:]])
    z_scale = np.array([1.0] + [scaling[t]["scale"] for t in design.terms[1:]])
    y_center = np.array([scaling[r]["center"] for r in regions])
    y_scale = np.array([scaling[r]["scale"] for r in regions])
    p, r = len(design.terms), len(regions)

    prepared = {}
    if "linear_model" in budget:
        eps, dlt = budget["linear_model"]
        prepared["linear_model"] = prepare(
            "sufficient_statistics",
            (design.z - z_center) / z_scale,
            (design.y - y_center) / y_scale,
            ([1.0] + [-1.0] * (p - 1), [1.0] * p),
            ([-1.0] * r, [1.0] * r),
            eps,
            dlt,
            terms=list(design.terms),
            regions=list(regions),
            min_cohort=policy.min_cohort,
        )
    levels = tuple(spec.categorical.get("group", ()))
    if "group_means" in budget:
        if not levels:
            raise ReleaseValidationError("release split: group_means needs a 'group' covariate")
        eps, dlt = budget["group_means"]
        prepared["group_means"] = prepare(
            "group_means",
            design.y,
            design.groups,
            list(levels),
            (np.array(lows), np.array(highs)),
            eps,
            dlt,
            regions=list(regions),
            min_cohort=policy.min_cohort,
        )

    def document(results: dict[str, Any], charge_id: int) -> dict[str, Any]:
        statistics: dict[str, Any] = {}
        if "linear_model" in results:
            lm = results["linear_model"]
            statistics["linear_model"] = {
                **_mechanism_fields(prepared["linear_model"].mechanism),
                "terms": list(design.terms),
                "regions": list(regions),
                "ztz": np.asarray(lm.ztz).tolist(),
                "zty": np.asarray(lm.zty).tolist(),
                "yty": np.asarray(lm.yty).tolist(),
                "n": float(lm.n),
                "noise_variances": {
                    "ztz": lm.ztz_noise_var,
                    "zty": lm.zty_noise_var,
                    "yty": lm.yty_noise_var,
                },
                "scaling": scaling,
            }
        if "group_means" in results:
            gm = results["group_means"]
            mech = prepared["group_means"].mechanism
            statistics["group_means"] = {
                **_mechanism_fields(mech),
                "regions": list(regions),
                "groups": {
                    str(level): {
                        "means": np.asarray(gm.value[i]).tolist(),
                        "mean_noise_variance": np.asarray(gm.noise_var[i]).tolist(),
                        "count": float(gm.n[i]),
                        "count_noise_variance": mech.noise_variance,
                    }
                    for i, level in enumerate(levels)
                },
            }
        bounds = {
            t: [policy.covariate_bounds(t)[0], policy.covariate_bounds(t)[1]] for t in spec.numeric
        }
        bounds.update({reg: [lo, hi] for reg, lo, hi in zip(regions, lows, highs, strict=True)})
        return new_release(
            dataset=dataset or site,
            site=site,
            atlas=atlas,
            feature=spec.response,
            model={
                "response": spec.response,
                "terms": list(design.terms),
                "reference_levels": spec.reference_levels,
            },
            privacy={
                "epsilon": epsilon,
                "delta": delta,
                "min_cohort": policy.min_cohort,
                "budget_split": {k: {"epsilon": e, "delta": d} for k, (e, d) in budget.items()},
                "bounds": bounds,
                "ledger_charge": charge_id,
            },
            statistics=statistics,
        )

    # Dry run of the document with placeholder numbers: a structural problem fails here,
    # before any budget is spent.
    out_path = Path(out_path)
    placeholder = {
        "linear_model": _Placeholder(p, r, prepared.get("linear_model")),
        "group_means": _Placeholder(p, r, prepared.get("group_means"), len(levels)),
    }
    validate(document({k: placeholder[k] for k in prepared}, 1), source=str(out_path))

    parameters = {
        "site": site,
        "model": {"response": spec.response, "terms": list(design.terms)},
        "n_rows": design.n,
        "dropped": design.dropped,
        "budget_split": {k: [e, d] for k, (e, d) in budget.items()},
        "mechanisms": {k: v.audit_parameters() for k, v in prepared.items()},
        "release_file": out_path.name,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)  # a missing folder must not waste a charge
    ledger = PrivacyLedger.from_policy(policy)
    with ledger.reserve(epsilon, delta, f"release {site}", parameters) as spend:
        results = {name: prep.release() for name, prep in prepared.items()}
        doc = validate(document(results, spend.charge_id), source=str(out_path))
        spend.write_release(out_path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return out_path


class _Placeholder:
    """Zero-valued stand-in for released statistics, to validate a document's structure."""

    def __init__(self, p: int, r: int, prepared, n_levels: int = 0) -> None:
        import numpy as np

        self.ztz, self.zty, self.yty = np.zeros((p, p)), np.zeros((p, r)), np.zeros(r)
        self.n = np.zeros(n_levels) if n_levels else 0.0
        self.value = np.zeros((n_levels, r))
        self.noise_var = np.zeros((n_levels, r))
        noise = prepared.mechanism.noise_variance if prepared is not None else 1.0
        self.ztz_noise_var = self.zty_noise_var = self.yty_noise_var = noise
