"""A site's answer to a federated request: check → approve → charge → compute → noise → encode.

:func:`answer_request` turns a hub's :class:`~fednipype.contract.request.AnalysisRequest` and
the site's participant-level features into one integer vector on the request's fixed-point
grid (:mod:`fednipype.contract.secure_sum`), which secure aggregation adds to the other sites'
vectors. Everything that can be refused is refused before the ledger is charged, in this
order: the site is not one of the request's sites; the site's ledger cannot be opened; the
data owner has not approved exactly this request (an unapproved or altered request is
recorded as pending, for the owner to review); the site's policy does not allow the mode
(``[federation] modes``; ``exact`` only with ``allow_exact_secure_sum = true``); the site's
public maximum cohort exceeds the request's; the request names regions the site's atlas
does not have; the grid cannot carry the answer; the budget does not cover it (the ledger's
atomic charge refuses and records nothing).

Modes:

``dp``
    The site's exact statistics are written into the layout; continuous Gaussian noise
    (OpenDP, :class:`~fednipype.site.mechanisms.PreparedStatistic`, σ from the analytic
    Gaussian on the layout's L2 sensitivity) is drawn on the entries the site writes (its slot
    and the shared block) against the ledger's charge of the request's (ε, δ); the noisy
    counts (n and each categorical cell, post-processing) are checked against the policy's
    minimum cohort as a release does, and the answer is withheld (the charge stands) if one
    is clearly below it; then the vector is rounded to the grid.
``distributed-dp``
    The exact vector is rounded to the grid and OpenDP's discrete Gaussian (``make_gaussian``
    over ``vector_domain(atom_domain(T="i64"))``, 64-bit integers because the grid's integers
    exceed 32 bits) is added to **every** coordinate (all slots), with σ_site² =
    σ_central² / (K − t): the sum carries at least the central noise while at most t sites
    drop out or collude. σ_site is calibrated on the rounded vector's sensitivity
    (Δ/step + √d) by :mod:`fednipype.contract.distributed_dp` (Kairouz, Liu & Steinke 2021, with
    their τ correction). The ledger is charged the request's (ε, δ), composed with the
    site's other charges by basic composition (sound for any mechanism; the tight Gaussian
    composition is kept for the Gaussian mechanisms of ``dp`` answers and releases); the
    trust assumption and the site's local floor ε (its own noise alone) are recorded in the
    audit row. No cohort check: any decision on the site's own noisy
    vector would cost its local floor, not the charged ε; the central noise protects small
    cells.
``exact``
    No noise, only when the policy opts in, with K >= 3 sites and at least ``min_cohort``
    participants overall and in every categorical cell (exact counts: the answer itself
    discloses the site's n, so the refusal discloses less); recorded in the ledger as a non-DP
    disclosure event (no ε).

Every refusal raised here carries public facts only — the site, the request's id, hash and
fields, the policy's switches and minimum cohort — never a count, a value or a local path:
whatever the client app sends back to the hub is safe. Local details go to the site's log.
An approval pays for one answer (:mod:`fednipype.site.approvals`): it is claimed inside the
charge, just before the noise is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fednipype.bids import read_participants
from fednipype.contract.calibration import analytic_gaussian_sigma
from fednipype.contract.distributed_dp import DistributedNoise, request_noise
from fednipype.contract.document import content_hash
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import DEFAULT_CAPACITY, NOISE_TAIL, Grid, SumLayout
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import (
    DataError,
    DisclosureError,
    FednipypeError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.site import approvals
from fednipype.site.design import ModelSpec, build_design, load_feature_table
from fednipype.site.distributed_dp import draw_discrete_gaussian
from fednipype.site.ledger import PrivacyLedger, Spend
from fednipype.site.mechanisms import Mechanism, PreparedStatistic
from fednipype.site.policy import SitePolicy
from fednipype.site.release import COHORT_MARGIN_SD

__all__ = ["SiteAnswer", "answer_request"]

LOGGER = logging.getLogger(__name__)

#: What the ledger's audit rows of federated answers say they paid for.
PURPOSE = "federated answer"


@dataclass(frozen=True)
class SiteAnswer:
    """One site's answer: an integer vector on the request's grid, and public metadata.

    Attributes
    ----------
    vector : ndarray of int64, shape (layout size,)
        What the site sends through secure aggregation.
    request_hash : str
        Content hash of the request answered.
    site : str
        The site's label.
    slot : int
        Its slot in the request's layout.
    mode : str
        ``dp``, ``distributed-dp`` or ``exact``.
    grid_step : float
        The grid's step (scaled units per integer).
    grid_bound : int
        Largest magnitude of an integer in ``vector``.
    noise_sd : float
        σ of the site's noise per noisy coordinate, in scaled units (0 in exact mode): in
        ``dp`` on its slot and the shared block, in ``distributed-dp`` on every coordinate
        (the integer σ times the step).
    charge_id : int or None
        The ledger charge that paid for it (None in exact mode).
    epsilon, delta : float or None
        What the answer cost (None in exact mode).
    """

    vector: np.ndarray
    request_hash: str
    site: str
    slot: int
    mode: str
    grid_step: float
    grid_bound: int
    noise_sd: float
    charge_id: int | None
    epsilon: float | None
    delta: float | None

    def metadata(self) -> dict[str, Any]:
        """The answer's public facts (no data), e.g. for the message beside the vector."""
        return {
            "request_hash": self.request_hash,
            "site": self.site,
            "slot": self.slot,
            "mode": self.mode,
            "grid_step": self.grid_step,
            "grid_bound": self.grid_bound,
            "noise_sd": self.noise_sd,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }


def answer_request(
    request: AnalysisRequest,
    policy: SitePolicy | str | os.PathLike[str],
    *,
    features: Sequence[str | os.PathLike[str]],
    participants: str | os.PathLike[str],
    site: str,
    capacity: int = DEFAULT_CAPACITY,
) -> SiteAnswer:
    """Answer ``request`` from the site's features: checked, approved, charged, noised, encoded.

    Parameters
    ----------
    request : AnalysisRequest
        The hub's request (validated).
    policy : SitePolicy or path-like
        The site's policy; its ledger is charged.
    features : sequence of path-like
        The site's ``*_desc-regional_features.tsv`` files.
    participants : path-like
        Dataset root or ``participants.tsv``.
    site : str
        The site's public label (one of ``request.sites``).
    capacity : int
        Largest summed integer the transport carries exactly (the grid depends on it; hub and
        sites must use the same).

    Returns
    -------
    SiteAnswer

    Raises
    ------
    RequestError, PolicyError, PrivacyBudgetExceeded, DataError
        Before any charge, with a text of public facts only.
    DisclosureError
        ``exact``: a cell below the minimum cohort (before anything is recorded); ``dp``: the
        noisy counts show one (after the charge, which stands).
    """
    context = _checked(request, policy, site, capacity)
    stats, design = _statistics(request, features, participants, context.where)
    exact = context.layout.site_vector(stats, context.slot)
    parameters = _audit(context, design)
    if request.mode == "exact":
        return _answer_exact(context, exact, parameters)
    if request.mode == "dp":
        return _answer_dp(context, exact, parameters)
    return _answer_distributed(context, exact, parameters)


@dataclass(frozen=True)
class _Context:
    request: AnalysisRequest
    policy: SitePolicy
    ledger: PrivacyLedger
    site: str
    slot: int
    layout: SumLayout
    grid: Grid
    where: str
    noise: DistributedNoise | None


def _refusal(kind: type[FednipypeError], where: str, text: str) -> FednipypeError:
    """A refusal whose text is public facts only (also as ``public_reason``, for the hub)."""
    error = kind(f"{where}: refused: {text}")
    error.public_reason = str(error)  # type: ignore[attr-defined]
    return error


def _refuse(kind: type[FednipypeError], where: str, text: str) -> NoReturn:
    raise _refusal(kind, where, text)


# -- checks before any charge ------------------------------------------------------------------


def _checked(
    request: AnalysisRequest,
    policy: SitePolicy | str | os.PathLike[str],
    site: str,
    capacity: int,
) -> _Context:
    """Every refusal on public facts, in order; the context of an answer that may proceed."""
    if not isinstance(request, AnalysisRequest):
        raise RequestError(f"answer_request: expected an AnalysisRequest, got {type(request)}")
    where = f"site {site}: request {request.request_id} ({request.content_hash[:12]})"
    if site not in request.sites:
        _refuse(RequestError, where, "this site is not one of the request's sites")
    policy, ledger = _open(policy, where)
    _check_approved(ledger, request, where)
    _check_policy(policy, request, where)
    layout = SumLayout.from_request(request)
    try:
        grid = Grid.for_request(request, capacity=capacity)
    except RequestError as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(RequestError, where, "its secure-sum grid cannot carry this request")
    noise = None
    if request.mode == "distributed-dp":
        noise, _ = request_noise(request, capacity=capacity)
        room = grid.bound * grid.step - request.max_participants
        if NOISE_TAIL * noise.sigma_site * grid.step > room:
            _refuse(RequestError, where, "its grid leaves no room for the noise's tail")
    slot = request.slot(site)
    return _Context(request, policy, ledger, site, slot, layout, grid, where, noise)


def _planned_multiplier(context: _Context) -> float | None:
    """The noise multiplier the answer's charge will carry (None: composed by its (ε, δ))."""
    request, layout = context.request, context.layout
    if context.noise is not None:
        # The distributed bound is a Rényi bound on a sum of discrete Gaussians, not a
        # Gaussian mechanism: composed by its (ε, δ) (basic composition, sound) rather than
        # as a Gaussian of multiplier σ_central / Δ, which would be an approximation.
        return None
    sigma = analytic_gaussian_sigma(request.epsilon, request.delta, layout.sensitivity)
    return sigma / layout.sensitivity


def _open(policy: SitePolicy | str | os.PathLike[str], where: str):
    try:
        policy = policy if isinstance(policy, SitePolicy) else SitePolicy.from_toml(policy)
        return policy, PrivacyLedger.from_policy(policy)
    except FednipypeError as err:  # local paths stay in the site's log
        LOGGER.error("%s: %s", where, err)
        _refuse(PolicyError, where, "the site's policy or privacy ledger cannot be used")


def _check_approved(ledger: PrivacyLedger, request: AnalysisRequest, where: str) -> None:
    status = approvals.request_status(ledger, request.content_hash)
    if status == approvals.APPROVED:
        return
    if status == approvals.REFUSED:
        _refuse(RequestError, where, "the site's data owner refused this request")
    approvals.record_pending(ledger, request)
    done = " (its approval was used by an answer already)" if status == approvals.ANSWERED else ""
    _refuse(
        RequestError,
        where,
        f"not approved by the site's data owner{done}; recorded as pending for review",
    )


def _check_policy(policy: SitePolicy, request: AnalysisRequest, where: str) -> None:
    if not policy.allows_mode(request.mode):
        if request.mode == "exact":
            _refuse(
                PolicyError,
                where,
                "the site's policy does not allow exact (noise-free) answers "
                "([federation] allow_exact_secure_sum is not true)",
            )
        _refuse(
            PolicyError,
            where,
            f"the site's policy does not allow mode {request.mode} ([federation] modes)",
        )
    if request.mode == "exact" and request.k < 3:
        _refuse(PolicyError, where, "an exact answer needs at least 3 sites")
    mp = policy.max_participants
    if mp is None or mp > request.max_participants:
        _refuse(
            PolicyError,
            where,
            f"the site's public maximum cohort is not declared or exceeds the request's "
            f"max_participants {request.max_participants}",
        )


# -- the site's statistics (exact, in the request's scaled units) ------------------------------


def _statistics(request: AnalysisRequest, features, participants, where: str):
    spec = ModelSpec(**request.spec)
    try:
        table = load_feature_table([Path(f) for f in features], request.response)
    except (FednipypeError, OSError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(DataError, where, "the site has no usable regional features for it")
    unknown = [r for r in request.regions if r not in table.columns]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", …" if len(unknown) > 5 else "")
        _refuse(RequestError, where, f"regions not in the site's atlas: {shown}")
    try:
        design = build_design(table[list(request.regions)], read_participants(participants), spec)
    except (FednipypeError, OSError) as err:
        LOGGER.error("%s: %s", where, err)
        _refuse(DataError, where, "the site's participants table does not hold the model's data")
    if tuple(design.terms) != request.terms:  # both follow the request's term order
        raise RequestError(f"{where}: the design's terms differ from the request's")
    scaling = request.scaling
    z = np.clip(scaling.scale_design(design.z, design.terms), -1.0, 1.0)
    y = np.clip(scaling.scale_response(design.y, design.regions), -1.0, 1.0)
    stats = SufficientStatistics(
        terms=request.terms,
        regions=request.regions,
        ztz=z.T @ z,
        zty=z.T @ y,
        yty=np.sum(y**2, axis=0),
        n=float(design.n),
        n_terms=request.n_terms,
    )
    return stats, design


def _audit(context: _Context, design) -> dict[str, Any]:
    request, grid = context.request, context.grid
    return {
        "site": context.site,
        "slot": context.slot,
        "request_hash": request.content_hash,
        "request_id": request.request_id,
        "mode": request.mode,
        "sites": list(request.sites),
        "min_sites": request.min_sites,
        "max_dropouts": request.max_dropouts,
        "model": {"response": request.response, "terms": list(request.terms)},
        "regions": len(request.regions),
        "layout_size": context.layout.size,
        "sensitivity": context.layout.sensitivity,
        "grid": {"step": grid.step, "bound": grid.bound},
        "n_rows": design.n,
        "dropped": design.dropped,
    }


# -- the three modes ---------------------------------------------------------------------------


@contextlib.contextmanager
def _charged(
    context: _Context,
    epsilon: float,
    delta: float,
    parameters: dict[str, Any],
    multiplier: float | None,
) -> Iterator[Spend]:
    """The ledger's reservation, then the approval's claim; the block draws the noise.

    A budget refusal records nothing and gets a public text. The claim is made inside the
    charge: if another process used the approval meanwhile, the charge stays (fail-closed)
    and nothing is drawn.
    """
    with contextlib.ExitStack() as stack:
        try:
            spend = stack.enter_context(
                context.ledger.reserve(
                    epsilon, delta, PURPOSE, parameters, noise_multiplier=multiplier
                )
            )
        except PrivacyBudgetExceeded as err:
            LOGGER.error("%s: %s", context.where, err)
            raise _refusal(
                PrivacyBudgetExceeded,
                context.where,
                f"the site's privacy budget does not cover epsilon={epsilon:g}, delta={delta:g}",
            ) from err
        if approvals.claim_answer(context.ledger, context.request, context.site) is not None:
            raise _refusal(RequestError, context.where, "its approval was used by another answer")
        yield spend


def _finish(context: _Context, spend: Spend, vector: np.ndarray) -> None:
    """Record the answer's hash in the charge's audit row (the answer's "release")."""
    digest = content_hash(
        {"request_hash": context.request.content_hash, "vector": vector.tolist()}
    )
    context.ledger.record_release(spend.charge_id, digest)
    spend.released = True  # the answer is what this charge paid for


def _answer_dp(context: _Context, exact: np.ndarray, parameters: dict) -> SiteAnswer:
    request, layout, slot = context.request, context.layout, context.slot
    index = np.arange(layout.size)
    where = np.concatenate([index[layout.slot_range(slot)], index[layout.shared_range]])
    labels = layout.labels()
    mechanism = Mechanism.calibrated(
        "federated_sufficient_statistics",
        request.epsilon,
        request.delta,
        layout.sensitivity,
        {"Z": "request bounds, scaled to [-1, 1]", "Y": "request bounds, scaled to [-1, 1]"},
        [labels[i] for i in where],
    )
    prepared = PreparedStatistic(mechanism, exact[where], lambda noisy: noisy)
    parameters = {**parameters, "mechanism": mechanism.as_dict()}
    charged = _charged(
        context, request.epsilon, request.delta, parameters, mechanism.noise_multiplier
    )
    with charged as spend:
        noisy = prepared.release(spend)
        _check_noisy_cohort(context, noisy, mechanism.noise_variance)
        vector = np.zeros(layout.size)
        vector[where] = noisy
        ints = context.grid.encode(vector)
        _finish(context, spend, ints)
    return _answer(context, ints, mechanism.noise_scale, spend)


def _answer_distributed(context: _Context, exact: np.ndarray, parameters: dict) -> SiteAnswer:
    request, grid, noise = context.request, context.grid, context.noise
    assert noise is not None  # calibrated by _checked in distributed-dp mode
    multiplier = _planned_multiplier(context)
    parameters = {
        **parameters,
        "mechanism": noise.as_dict(),
        "sampler": "opendp.measurements.make_gaussian over vector_domain(atom_domain(T=i64))",
        "trust": (
            f"the sum is (epsilon={request.epsilon:g}, delta={request.delta:g})-DP while at most "
            f"t={request.max_dropouts} of the K={request.k} sites drop out or collude with the "
            f"hub; this site's answer alone is (epsilon={noise.local_floor_epsilon:.6g}, "
            f"delta={request.delta:g})-DP (its local floor)"
        ),
        "composition": "basic (a Rényi bound, not a Gaussian mechanism)",
    }
    rounded = grid.encode(exact)
    with _charged(context, request.epsilon, request.delta, parameters, multiplier) as spend:
        ints = draw_discrete_gaussian(spend, rounded, noise)
        ints = np.clip(ints, -grid.bound, grid.bound)
        _finish(context, spend, ints)
    return _answer(context, ints, noise.sigma_site * grid.step, spend)


def _answer_exact(context: _Context, exact: np.ndarray, parameters: dict) -> SiteAnswer:
    _check_exact_cohort(context, exact)
    claim = approvals.claim_answer(context.ledger, context.request, context.site)
    if claim is not None:
        _refuse(RequestError, context.where, "its approval was used by another answer")
    ints = context.grid.encode(exact)
    parameters = {
        **parameters,
        "min_cohort": context.policy.min_cohort,
        "answer_sha256": content_hash(
            {"request_hash": context.request.content_hash, "vector": ints.tolist()}
        ),
    }
    approvals.record_disclosure(context.ledger, context.request, context.site, parameters)
    LOGGER.warning(
        "%s: answered without noise (exact mode): a non-DP disclosure, recorded in the ledger",
        context.where,
    )
    return _answer(context, ints, 0.0, None)


def _answer(context: _Context, ints: np.ndarray, noise_sd: float, spend: Spend | None):
    request = context.request
    vector = np.asarray(ints, dtype=np.int64)
    vector.setflags(write=False)
    return SiteAnswer(
        vector=vector,
        request_hash=request.content_hash,
        site=context.site,
        slot=context.slot,
        mode=request.mode,
        grid_step=context.grid.step,
        grid_bound=context.grid.bound,
        noise_sd=float(noise_sd),
        charge_id=None if spend is None else spend.charge_id,
        epsilon=request.epsilon,
        delta=request.delta,
    )


# -- noise and disclosure checks ---------------------------------------------------------------


def _cells(request: AnalysisRequest, slot_values: np.ndarray) -> dict[str, tuple[float, float]]:
    """Participant counts of every cell from a slot's (n, Σz_c …) entries, with the factor of
    the per-entry noise variance each carries (as :mod:`fednipype.site.release` derives them:
    a ±1 dummy's sum is 2 n_level − n)."""
    n = float(slot_values[0])
    covariates = request.terms[1:]
    cells = {"all participants": (n, 1.0)}
    for name, levels in request.categorical.items():
        others = len(levels) - 1
        reference = n * (1.0 - others / 2.0)
        for level in levels[1:]:
            sums = float(slot_values[1 + covariates.index(f"{name}[{level}]")])
            cells[f"{name} = {level}"] = ((n + sums) / 2.0, 0.5)
            reference -= sums / 2.0
        cells[f"{name} = {levels[0]}"] = (reference, (1.0 - others / 2.0) ** 2 + others / 4.0)
    return cells


def _check_noisy_cohort(context: _Context, noisy: np.ndarray, variance: float) -> None:
    """Withhold a ``dp`` answer whose noisy counts show a cell clearly below the minimum
    cohort (more than :data:`~fednipype.site.release.COHORT_MARGIN_SD` noise sd below it).
    Post-processing of the charged answer; raised inside the charge, which stands."""
    minimum = context.policy.min_cohort
    cells = _cells(context.request, noisy[: context.layout.slot_size])
    if any(c + COHORT_MARGIN_SD * (f * variance) ** 0.5 < minimum for c, f in cells.values()):
        _refuse(
            DisclosureError,
            context.where,
            f"answer withheld: a noisy participant count is below the site's minimum cohort of "
            f"{minimum}; the charge stands",
        )


def _check_exact_cohort(context: _Context, exact: np.ndarray) -> None:
    """Refuse an ``exact`` answer with fewer than ``min_cohort`` participants overall or in a
    categorical cell (exact counts; the answer itself would disclose the site's n)."""
    minimum = context.policy.min_cohort
    cells = _cells(context.request, exact[context.layout.slot_range(context.slot)])
    if any(count < minimum - 1e-6 for count, _ in cells.values()):
        _refuse(
            DisclosureError,
            context.where,
            f"fewer participants than the site's minimum cohort of {minimum} overall or in a "
            "cell of the model",
        )
