"""Making a site's DP release: validate → design → prepare → dry-run → charge → draw → write.

:func:`make_release` is the site's one way to turn its participant-level features into the
release document (:mod:`fednipype.contract.document`) that leaves the site. Each step is a
named function below, in the order they run; everything that can be refused is checked before
the ledger is charged, and the noise is drawn only against that charge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednipype.bids import read_participants
from fednipype.contract.calibration import check_delta, check_epsilon
from fednipype.contract.document import new_release, validate
from fednipype.contract.scaling import Scaling
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import ReleaseValidationError
from fednipype.features import read_sidecar
from fednipype.site.design import Design, ModelSpec, build_design, load_feature_table
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.mechanisms import (
    GroupMeans,
    PreparedStatistic,
    prepare_group_means,
    prepare_sufficient_statistics,
)
from fednipype.site.policy import SitePolicy

__all__ = ["DEFAULT_SPLIT", "SESSIONS", "make_release"]

#: Default split of a release's (ε, δ) across its statistics (fractions of each).
DEFAULT_SPLIT = {"sufficient_statistics": 0.7, "group_means": 0.3}
#: How several sessions of a participant enter a release (``model/sessions``).
SESSIONS = "first session of each participant"


def make_release(
    *,
    features: Sequence[str | os.PathLike[str]],
    participants: str | os.PathLike[str],
    policy: SitePolicy | str | os.PathLike[str],
    epsilon: float,
    delta: float,
    site: str,
    out_path: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    dataset: str | None = None,
    split: Mapping[str, float] | None = None,
) -> Path:
    """Make a site's DP release: validate, charge the ledger, draw the noise, write atomically.

    Everything that can be refused is checked before the ledger is charged: the budget
    parameters, the policy's public bounds for every covariate and region, the disclosure
    rules (``min_cohort`` overall and in every group; δ < 1/n) and the document's structure.
    Only then is (ε, δ) charged to the dataset's ledger, the noise drawn (OpenDP) against that
    charge and the release written through a temporary file whose content hash the ledger
    records before the rename.

    Covariates and responses are mapped to [-1, 1] with their public bounds
    (:class:`~fednipype.contract.scaling.Scaling`) before the sufficient statistics are
    computed, which keeps their sensitivity small; the release records the maps.

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
        Fraction of (ε, δ) per statistic (``sufficient_statistics``, ``group_means``);
        default :data:`DEFAULT_SPLIT`.

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
    spec = spec or ModelSpec()
    policy = policy if isinstance(policy, SitePolicy) else SitePolicy.from_toml(policy)
    out_path = Path(out_path)
    budget = _split_budget(epsilon, delta, split)
    tsvs = [Path(f) for f in features]
    table = load_feature_table(tsvs, spec.response)
    design = build_design(table, read_participants(participants), spec)
    context = _Context(
        dataset=dataset or site,
        site=site,
        spec=spec,
        design=design,
        policy=policy,
        scaling=_scaling(policy, spec, design),
        atlas=_atlas_provenance(tsvs, design.regions),
        epsilon=float(epsilon),
        delta=float(delta),
        budget=budget,
    )
    prepared = _prepare_statistics(context)
    _dry_run(context, prepared, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)  # a missing folder must not waste a charge
    ledger = PrivacyLedger.from_policy(policy)
    parameters = _audit(context, prepared, out_path)
    with ledger.reserve(epsilon, delta, f"release {site}", parameters) as spend:
        results = {name: statistic.release(spend) for name, statistic in prepared.items()}
        doc = validate(_document(context, prepared, results, spend.charge_id), str(out_path))
        spend.write_release(out_path, doc)
    return out_path


@dataclass(frozen=True)
class _Context:
    """Everything a release is made of except the noisy numbers."""

    dataset: str
    site: str
    spec: ModelSpec
    design: Design
    policy: SitePolicy
    scaling: Scaling
    atlas: dict[str, Any]
    epsilon: float
    delta: float
    budget: dict[str, tuple[float, float]]


# -- 1. validate the request ------------------------------------------------------------------


def _split_budget(
    epsilon: float, delta: float, split: Mapping[str, float] | None
) -> dict[str, tuple[float, float]]:
    """The (ε, δ) of each statistic: the release's total times its fraction."""
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
    return {k: (epsilon * f, delta * f) for k, f in fractions.items()}


# -- 2. the design and its public scaling -----------------------------------------------------


def _scaling(policy: SitePolicy, spec: ModelSpec, design: Design) -> Scaling:
    """Public bounds → the maps onto [-1, 1] (dummies 0/1 → −1/+1)."""
    return Scaling.from_bounds(
        numeric={term: policy.covariate_bounds(term) for term in spec.numeric},
        dummies=design.terms[1 + len(spec.numeric) :],
        regions={region: policy.feature_bounds(region) for region in design.regions},
    )


def _atlas_provenance(tsvs: list[Path], regions: tuple[str, ...]) -> dict[str, Any]:
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


# -- 3. prepare the statistics (exact values, no noise yet) -----------------------------------


def _prepare_statistics(context: _Context) -> dict[str, PreparedStatistic]:
    design, scaling, policy = context.design, context.scaling, context.policy
    prepared = {}
    if "sufficient_statistics" in context.budget:
        eps, dlt = context.budget["sufficient_statistics"]
        prepared["sufficient_statistics"] = prepare_sufficient_statistics(
            scaling.scale_design(design.z, design.terms),
            scaling.scale_response(design.y, design.regions),
            scaling.design_bounds(design.terms),
            scaling.response_bounds(design.regions),
            eps,
            dlt,
            terms=design.terms,
            regions=design.regions,
            min_cohort=policy.min_cohort,
        )
    if "group_means" in context.budget:
        levels = tuple(context.spec.categorical.get("group", ()))
        if not levels:
            raise ReleaseValidationError("release split: group_means needs a 'group' covariate")
        eps, dlt = context.budget["group_means"]
        prepared["group_means"] = prepare_group_means(
            design.y,
            design.groups,
            list(levels),
            policy.feature_bounds_arrays(design.regions),
            eps,
            dlt,
            regions=design.regions,
            min_cohort=policy.min_cohort,
        )
    return prepared


# -- 4. dry-run the document ------------------------------------------------------------------


def _dry_run(context: _Context, prepared: dict[str, PreparedStatistic], out_path: Path) -> None:
    """Validate the document with placeholder numbers: a structural problem fails before any
    budget is spent."""
    placeholders = {name: statistic.placeholder() for name, statistic in prepared.items()}
    validate(_document(context, prepared, placeholders, 1), str(out_path))


def _document(
    context: _Context,
    prepared: dict[str, PreparedStatistic],
    results: dict[str, Any],
    charge_id: int,
) -> dict[str, Any]:
    statistics: dict[str, Any] = {}
    if "sufficient_statistics" in results:
        stats: SufficientStatistics = results["sufficient_statistics"]
        statistics["sufficient_statistics"] = {
            **prepared["sufficient_statistics"].mechanism.document_fields(),
            **stats.to_document(),
            "scaling": context.scaling.to_document(),
        }
    if "group_means" in results:
        means: GroupMeans = results["group_means"]
        statistics["group_means"] = {
            **prepared["group_means"].mechanism.document_fields(),
            "regions": list(means.regions),
            "groups": {
                level: {
                    "means": means.means[i].tolist(),
                    "mean_noise_variance": means.mean_noise_var[i].tolist(),
                    "count": float(means.counts[i]),
                    "count_noise_variance": means.count_noise_var,
                }
                for i, level in enumerate(means.levels)
            },
        }
    spec, policy, design = context.spec, context.policy, context.design
    bounds = {t: list(policy.covariate_bounds(t)) for t in spec.numeric}
    bounds.update({r: list(policy.feature_bounds(r)) for r in design.regions})
    return new_release(
        dataset=context.dataset,
        site=context.site,
        atlas=context.atlas,
        feature=spec.response,
        model={
            "response": spec.response,
            "terms": list(design.terms),
            "reference_levels": spec.reference_levels,
            "sessions": SESSIONS,
        },
        privacy={
            "epsilon": context.epsilon,
            "delta": context.delta,
            "min_cohort": policy.min_cohort,
            "budget_split": {
                k: {"epsilon": e, "delta": d} for k, (e, d) in context.budget.items()
            },
            "bounds": bounds,
            "ledger_charge": charge_id,
        },
        statistics=statistics,
    )


# -- 5. what the ledger's audit row records ---------------------------------------------------


def _audit(
    context: _Context, prepared: dict[str, PreparedStatistic], out_path: Path
) -> dict[str, Any]:
    return {
        "site": context.site,
        "model": {"response": context.spec.response, "terms": list(context.design.terms)},
        "n_rows": context.design.n,
        "dropped": context.design.dropped,
        "budget_split": {k: [e, d] for k, (e, d) in context.budget.items()},
        "mechanisms": {k: v.audit_parameters() for k, v in prepared.items()},
        "release_file": out_path.name,
    }
