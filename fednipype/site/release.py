"""Making a site's DP release: validate → design → prepare → dry-run → charge → draw → write.

:func:`make_release` is the site's one way to turn its participant-level features into the
release document (:mod:`fednipype.contract.document`) that leaves the site. Each step is a
named function below, in the order they run; everything that can be refused is checked before
the ledger is charged, and the noise is drawn only against that charge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fednipype.bids import read_participants
from fednipype.contract.calibration import check_delta, check_epsilon
from fednipype.contract.document import new_release, validate
from fednipype.contract.scaling import Scaling
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import DisclosureError, PolicyError, ReleaseValidationError
from fednipype.features import read_atlas_max_volumes, read_sidecar
from fednipype.site.design import Design, ModelSpec, build_design, load_feature_table
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.mechanisms import PreparedStatistic, prepare_sufficient_statistics
from fednipype.site.policy import Bounds, SitePolicy

__all__ = ["SESSIONS", "STATISTIC", "TOTAL", "make_release", "release_name"]

#: The statistic a release holds: the linear model's sufficient statistics.
STATISTIC = "sufficient_statistics"
#: A cell is below the minimum cohort when its noisy count is this many noise sd below it.
COHORT_MARGIN_SD = 5.3
#: How several sessions of a participant enter a release (``model/sessions``).
SESSIONS = "first session of each participant"
#: The summary feature a release may ask for next to regions: the sum over all the atlas's
#: regions (total grey-matter volume for ``volume_mm3``).
TOTAL = "total"


def make_release(
    *,
    features: Sequence[str | os.PathLike[str]],
    participants: str | os.PathLike[str],
    policy: SitePolicy | str | os.PathLike[str],
    epsilon: float,
    delta: float,
    site: str,
    out_path: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    spec: ModelSpec | None = None,
    dataset: str | None = None,
    regions: Sequence[str] | None = None,
) -> Path:
    """Make a site's DP release: validate, charge the ledger, draw the noise, write atomically.

    Everything that can be refused on public facts is checked before the ledger is charged:
    the budget parameters, δ below 1/``max_participants`` (the policy's public maximum
    cohort), the policy's public bounds for every covariate and region, and the document's
    structure. Only then is (ε, δ) charged to the dataset's ledger and the noise drawn
    (OpenDP) against that charge. The minimum cohort, overall and in every cell of each
    categorical covariate, is checked on the released noisy counts (post-processing): a
    release below it is withheld with its charge kept, so neither a refusal nor its timing
    depends on the data except through charged DP quantities. Otherwise the release is
    written through a temporary file whose content hash the ledger records before the rename.

    Covariates and responses are mapped to [-1, 1] with their public bounds
    (:class:`~fednipype.contract.scaling.Scaling`) before the sufficient statistics are
    computed, which keeps their sensitivity small; the release records the maps. A region's
    bounds are the policy's entry for it, else its ``[bounds.features] default``; with
    ``default = "atlas"`` (or no ``[bounds.features]``) a ``volume_mm3`` response is bounded by
    [0, the region's largest possible volume] recorded in the features' sidecars (the largest
    over the files when their grids differ), a public fact of the atlas and the grids.

    Parameters
    ----------
    features : sequence of path-like
        The site's ``*_desc-regional_features.tsv`` files (one per subject/session).
    participants : path-like
        Dataset root or ``participants.tsv``.
    policy : SitePolicy or path-like
        The site policy (bounds, min cohort, ledger).
    epsilon, delta : float
        What this release costs.
    site : str
        Site label written in the release.
    out_path : path-like, optional
        Release file (``*_release.json``); it must not exist (a release is never
        overwritten).
    out_dir : path-like, optional
        Instead of ``out_path``: a folder where the release gets a unique name,
        :func:`release_name` (site, ledger id and charge id).
    spec : ModelSpec, optional
        The linear model (default: feature ``volume_mm3`` on age, sex and group).
    dataset : str, optional
        Dataset name written in the release (default: the site label).
    regions : sequence of str, optional
        The atlas regions to release, pre-registered (default: all). The sensitivity, hence
        the noise, grows with the number of released entries: a few regions cost far less
        noise per region than all of them. Names are public (the atlas's); an unknown name is
        refused before any charge. ``"total"`` (:data:`TOTAL`) adds the summary feature, the
        sum over all the atlas's regions (total grey-matter volume), bounded by the policy's
        ``total`` entry or the sum of the regions' bounds.

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
    if (out_path is None) == (out_dir is None):
        raise ReleaseValidationError("make_release: give exactly one of out_path and out_dir")
    out_path = Path(out_path) if out_path is not None else Path(out_dir) / release_name(site)
    if out_path.exists():
        raise ReleaseValidationError(
            f"{out_path}: exists already; a release is never overwritten (each one was charged)"
        )
    budget = _check_request(policy, epsilon, delta)
    ledger = PrivacyLedger.from_policy(policy)  # refuses an unbound, missing or other ledger
    tsvs = [Path(f) for f in features]
    full = load_feature_table(tsvs, spec.response)
    table = _select_regions(full, regions, spec.response)
    design = build_design(table, read_participants(participants), spec)
    atlas = _atlas_provenance(tsvs, design.regions)
    region_bounds = _region_bounds(policy, spec.response, tsvs, design.regions, tuple(full))
    context = _Context(
        dataset=dataset or site,
        site=site,
        spec=spec,
        design=design,
        policy=policy,
        region_bounds=region_bounds,
        scaling=_scaling(policy, spec, design, region_bounds),
        atlas=atlas,
        epsilon=float(epsilon),
        delta=float(delta),
        budget=budget,
    )
    prepared = _prepare_statistics(context)
    _dry_run(context, prepared, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)  # a missing folder must not waste a charge
    parameters = _audit(context, prepared, out_path)
    statistic = prepared[STATISTIC]
    multiplier = statistic.mechanism.noise_multiplier
    purpose = f"release {site}"
    with ledger.reserve(epsilon, delta, purpose, parameters, noise_multiplier=multiplier) as spend:
        results = {name: prepared_.release(spend) for name, prepared_ in prepared.items()}
        _check_noisy_cohort(context, results[STATISTIC])
        doc = _document(context, prepared, results, spend.charge_id, ledger.ledger_id)
        if out_dir is not None:
            out_path = Path(out_dir) / release_name(site, ledger.ledger_id, spend.charge_id)
        spend.write_release(out_path, validate(doc, str(out_path)))
    return out_path


def release_name(site: str, ledger_id: str | None = None, charge_id: int | None = None) -> str:
    """A release's unique file name: site, ledger and charge (``*_release.json``).

    >>> release_name("siteA", "0123456789abcdef0123456789abcdef", 7)
    'siteA_ledger-01234567_charge-0007_release.json'
    """
    if ledger_id is None or charge_id is None:
        return f"{site}_release.json"
    return f"{site}_ledger-{ledger_id[:8]}_charge-{charge_id:04d}_release.json"


@dataclass(frozen=True)
class _Context:
    """Everything a release is made of except the noisy numbers."""

    dataset: str
    site: str
    spec: ModelSpec
    design: Design
    policy: SitePolicy
    region_bounds: dict[str, Bounds]
    scaling: Scaling
    atlas: dict[str, Any]
    epsilon: float
    delta: float
    budget: dict[str, tuple[float, float]]


# -- 1. validate the request ------------------------------------------------------------------


def _check_request(
    policy: SitePolicy, epsilon: float, delta: float
) -> dict[str, tuple[float, float]]:
    """The release's (ε, δ), checked on public facts only; all of it pays for one statistic."""
    epsilon = check_epsilon(epsilon, "release epsilon")
    delta = check_delta(delta, "release delta")
    if delta <= 0:
        raise ReleaseValidationError("release delta: must be > 0 (Gaussian mechanism)")
    if policy.max_participants is None:
        raise PolicyError(
            f"{policy.source or 'site policy'}: 'budget.max_participants' missing: declare a "
            "public upper bound on the cohort (δ is checked against it, never against the data)"
        )
    return {STATISTIC: (epsilon, delta)}


# -- 2. the design and its public scaling -----------------------------------------------------


def _select_regions(
    table: pd.DataFrame, regions: Sequence[str] | None, response: str = "volume_mm3"
) -> pd.DataFrame:
    """The feature table restricted to the pre-registered regions, in atlas order.

    The summary feature ``total`` (:data:`TOTAL`: the sum of the response over all the
    atlas's regions, e.g. total grey-matter volume) may be asked for next to them; it comes
    last. It is defined for ``volume_mm3`` only (a sum of volumes is a volume).
    """
    if regions is None:
        return table
    wanted = [str(r) for r in regions]
    if TOTAL in wanted:
        if TOTAL in table.columns or response != "volume_mm3":
            raise ReleaseValidationError(
                f"release regions: the summary {TOTAL!r} needs the volume_mm3 response and an "
                f"atlas without a region of that name (response {response!r})"
            )
        table = table.assign(**{TOTAL: table.sum(axis=1, skipna=False)})
    unknown = [r for r in wanted if r not in table.columns]
    if unknown or not wanted or len(set(wanted)) != len(wanted):
        raise ReleaseValidationError(
            f"release regions: expected distinct names of the atlas's regions, got "
            f"{unknown or wanted or 'none'} (the atlas has {', '.join(table.columns[:5])}, …)"
        )
    return table[[c for c in table.columns if c in set(wanted)]]


def _region_bounds(
    policy: SitePolicy,
    response: str,
    tsvs: list[Path],
    regions: tuple[str, ...],
    atlas_regions: tuple[str, ...] = (),
) -> dict[str, Bounds]:
    """Each region's public bounds: the policy's, or [0, atlas maximum] from the sidecars.

    The summary ``total`` takes the policy's own ``total`` entry if it has one, else the sum
    of every atlas region's bounds (public: a sum of values within bounds is within the sum
    of the bounds).
    """
    atlas_max = read_atlas_max_volumes(tsvs) if policy.atlas_default else {}

    def bounds(region: str) -> Bounds:
        return policy.feature_bounds(region, response=response, atlas_max=atlas_max.get(region))

    out = {}
    for region in regions:
        if region == TOTAL and TOTAL not in policy.feature_bounds_map:
            parts = [bounds(r) for r in atlas_regions]
            out[region] = (math.fsum(lo for lo, _ in parts), math.fsum(hi for _, hi in parts))
        else:
            out[region] = bounds(region)
    return out


def _scaling(
    policy: SitePolicy, spec: ModelSpec, design: Design, regions: dict[str, Bounds]
) -> Scaling:
    """Public bounds → the maps onto [-1, 1] (dummies 0/1 → −1/+1)."""
    return Scaling.from_bounds(
        numeric={term: policy.covariate_bounds(term) for term in spec.numeric},
        dummies=design.terms[1 + len(spec.numeric) :],
        regions={region: regions[region] for region in design.regions},
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
    eps, dlt = context.budget[STATISTIC]
    return {
        STATISTIC: prepare_sufficient_statistics(
            scaling.scale_design(design.z, design.terms),
            scaling.scale_response(design.y, design.regions),
            scaling.design_bounds(design.terms),
            scaling.response_bounds(design.regions),
            eps,
            dlt,
            terms=design.terms,
            regions=design.regions,
            max_participants=policy.max_participants,
            # the intercept and the ±1-coded dummies: their ZᵀZ diagonal is n
            n_terms=(design.terms[0], *design.terms[1 + len(context.spec.numeric) :]),
        )
    }


def _check_noisy_cohort(context: _Context, stats: SufficientStatistics) -> None:
    """Withhold a release whose noisy counts show a cell below the minimum cohort.

    The counts are post-processing of the released statistics: n, and for every level of a
    categorical covariate (coded −1/+1 per non-reference level) n_l = (n + Σz_l)/2, the
    reference level getting what remains; each has a known noise sd. A cell is below the
    minimum when its noisy count is below it by more than :data:`COHORT_MARGIN_SD` noise sd,
    so an honest cohort is withheld with probability below 1e-7 per cell, and the rule is
    exact as the noise vanishes; at high noise it bites only on clearly small cells (and the
    noise then drowns any small cell's statistics). Raised inside the charge: the charge stays.
    """
    minimum = context.policy.min_cohort
    variance = stats.n_noise_var
    cells = {"all participants": (stats.n, variance)}
    terms = list(stats.terms)
    for name, levels in context.spec.categorical.items():
        others = len(levels) - 1
        reference = stats.n * (1.0 - others / 2.0)
        for level in levels[1:]:
            sums = stats.ztz[0, terms.index(f"{name}[{level}]")]
            cells[f"{name} = {level}"] = ((stats.n + sums) / 2.0, variance / 2.0)
            reference -= sums / 2.0
        cells[f"{name} = {levels[0]}"] = (
            reference,
            variance * ((1.0 - others / 2.0) ** 2 + others / 4.0),
        )
    small = {
        cell: count
        for cell, (count, var) in cells.items()
        if count + COHORT_MARGIN_SD * var**0.5 < minimum
    }
    if small:
        described = ", ".join(f"{cell}: {count:.1f}" for cell, count in small.items())
        raise DisclosureError(
            f"release withheld: noisy participant count(s) more than {COHORT_MARGIN_SD:g} noise "
            f"sd below the policy's minimum cohort of {minimum} ({described}); the counts are "
            "DP releases, so the charge stands"
        )


# -- 4. dry-run the document ------------------------------------------------------------------


def _dry_run(context: _Context, prepared: dict[str, PreparedStatistic], out_path: Path) -> None:
    """Validate the document with placeholder numbers: a structural problem fails before any
    budget is spent."""
    placeholders = {name: statistic.placeholder() for name, statistic in prepared.items()}
    validate(_document(context, prepared, placeholders, 1, "0" * 32), str(out_path))


def _document(
    context: _Context,
    prepared: dict[str, PreparedStatistic],
    results: dict[str, Any],
    charge_id: int,
    ledger_id: str,
) -> dict[str, Any]:
    stats: SufficientStatistics = results[STATISTIC]
    statistics = {
        STATISTIC: {
            **prepared[STATISTIC].mechanism.document_fields(),
            **stats.to_document(),
            "scaling": context.scaling.to_document(),
        }
    }
    spec, policy, design = context.spec, context.policy, context.design
    bounds = {t: list(policy.covariate_bounds(t)) for t in spec.numeric}
    bounds.update({r: list(context.region_bounds[r]) for r in design.regions})
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
            "max_participants": policy.max_participants,
            "ledger_id": ledger_id,
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
