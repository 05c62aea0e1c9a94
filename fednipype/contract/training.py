"""The federated training request: what the hub asks every site to train, checked and hashed.

A training request is a small JSON document (schema ``fednipype-training-request/1.0``) that a
data owner reviews and approves at the site before any round is trained::

    {
     "schema": "fednipype-training-request/1.0",
     "request_id": "brain-age-2026",
     "sites": ["site-a", "site-b", "site-c"],
     "task": "brain-age",
     "regions": ["L_P01", "R_P01"],
     "bounds": {"regions": {"default": [0, 12000]}, "label": [18, 90]},
     "mode": "dp",
     "epsilon": 4.0, "delta": 1e-5,
     "rounds": 20, "local_steps": 5, "learning_rate": 0.5, "l2": 1e-3,
     "sampling_rate": 0.1, "clip": 1.0,
     "holdout_fraction": 0.2,
     "min_sites": 2, "max_participants": 1000
    }

``task`` is ``brain-age`` (ridge-penalised linear regression of age on the regions'
``volume_mm3``) or ``diagnosis`` (logistic regression, patient = 1 vs control = 0). The
features are the regions' volumes in the order given, scaled with the public bounds only
(:class:`fednipype.learn.models.FeatureScaling`); ``bounds/label`` is the public age range of
brain-age and is absent (or null) for diagnosis. ``epsilon`` and ``delta`` are what the whole
run costs each site (all ``rounds`` × ``local_steps`` DP-SGD steps and the one noisy count of
its training rows), charged to its ledger before its first reply.

Rules (each violation is a :class:`~fednipype.exceptions.RequestError` naming the source and
the field), beside the general ones of :mod:`fednipype.contract.request` (known keys, names,
sizes, finite numbers, no repeated key, every region bounded):

- ``mode`` ``dp``: 0 < ε, 0 < δ < 1/``max_participants``, 0 < ``sampling_rate`` <= 1,
  ``clip`` > 0; ``mode`` ``distributed-dp``: the same, and ``local_steps`` = 1 and
  ``sampling_rate`` = 1 (each round is one full-batch gradient sum, FedSGD); ``mode``
  ``none``: all four null (a non-DP run, answered only by sites whose policy opts in);
- 1 <= ``rounds`` <= :data:`MAX_ROUNDS`, 1 <= ``local_steps`` <= :data:`MAX_LOCAL_STEPS`,
  ``learning_rate`` > 0, ``l2`` >= 0, 0 < ``holdout_fraction`` < 1;
- ``bounds/label`` for ``brain-age`` only;
- at least 2 sites, and 2 <= ``min_sites`` <= K: an average over one site would be that
  site's own update; 1 <= ``max_participants`` <= :data:`~fednipype.contract.request.
  MAX_PARTICIPANTS`.

The content hash (:attr:`TrainingRequest.content_hash`) is the SHA-256 of the canonical JSON
of the normalised document, as for analysis requests; an altered request has another hash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from fednipype.contract.calibration import is_number
from fednipype.contract.distributed_dp import TrainingNoise, calibrate_training

# The analysis request's validators: one set of rules for both kinds of request.
from fednipype.contract.request import (
    DEFAULT_REGION,
    MAX_MAGNITUDE,
    MAX_PARTICIPANTS,
    MAX_REGIONS,
    MAX_SITES,
    HashedRequest,
    _bounds,
    _check_depth,
    _check_privacy,
    _integer,
    _list,
    _mapping,
    _name,
    _names,
    _object,
    _region_bounds,
)
from fednipype.exceptions import FederationError, RequestError
from fednipype.learn import accountant
from fednipype.learn.models import FeatureScaling

__all__ = ["DP_MODES", "MODES", "TASKS", "TRAINING_SCHEMA", "TrainingRequest"]

TRAINING_SCHEMA = "fednipype-training-request/1.0"
#: The models a request may train.
TASKS = ("brain-age", "diagnosis")
#: ``dp``: DP-SGD at every site; ``distributed-dp``: one full-batch gradient sum per round
#: with each site's discrete Gaussian share (its noise adds up only in the SecAgg+ sum);
#: ``none``: no noise (a site's policy must opt in).
MODES = ("dp", "distributed-dp", "none")
#: The modes with noise.
DP_MODES = ("dp", "distributed-dp")
MAX_ROUNDS = 1000
MAX_LOCAL_STEPS = 1000
#: Fewest sites of a training request (an average over one site is that site's update).
MIN_SITES = 2
#: The regional feature the models are trained on.
FEATURE = "volume_mm3"
_DP_FIELDS = ("epsilon", "delta", "sampling_rate", "clip")
_KEYS = {
    "schema",
    "request_id",
    "sites",
    "task",
    "regions",
    "bounds",
    "mode",
    "epsilon",
    "delta",
    "rounds",
    "local_steps",
    "learning_rate",
    "l2",
    "sampling_rate",
    "clip",
    "holdout_fraction",
    "min_sites",
    "max_participants",
}
_BOUNDS_KEYS = {"regions", "label"}

Bounds = tuple[float, float]


@dataclass(frozen=True, eq=False)
class TrainingRequest(HashedRequest):
    """A validated federated training request (see the module docstring for the rules).

    Parameters
    ----------
    request_id : str
        A label, ``[A-Za-z0-9._-]{1,64}``.
    sites : tuple of str
        Public site labels.
    task : {"brain-age", "diagnosis"}
        The model trained.
    regions : tuple of str
        The atlas regions whose ``volume_mm3`` are the features, in order.
    region_bounds : Mapping[str, tuple of float]
        Public ``(lo, hi)`` of regions; ``"default"`` for every region not named.
    label_bounds : tuple of float or None
        Public ``(lo, hi)`` of the brain-age label (age, years); None for diagnosis.
    mode : {"dp", "none"}
    epsilon, delta : float or None
        What the whole run costs each site; None in mode ``none``.
    rounds, local_steps : int
        Federated rounds, and DP-SGD steps per round at each site.
    learning_rate, l2 : float
        Step size (scaled units) and ridge penalty (the intercept is not penalised).
    sampling_rate, clip : float or None
        Poisson sampling rate of a step's batch and per-example gradient clipping norm;
        None in mode ``none``.
    holdout_fraction : float
        Share of each site's participants held out for evaluation (by participant id and the
        request's hash, :func:`fednipype.learn.fedavg.holdout_split`).
    min_sites : int
        The run needs at least this many sites.
    max_participants : int
        Public per-site cohort cap (the δ check).
    source : str
        Where the request came from, for error messages (not part of the content).

    Raises
    ------
    RequestError
        Naming ``source`` and the field.
    """

    request_id: str
    sites: tuple[str, ...]
    task: str
    regions: tuple[str, ...]
    region_bounds: Mapping[str, Bounds]
    label_bounds: Bounds | None
    mode: str
    epsilon: float | None
    delta: float | None
    rounds: int
    local_steps: int
    learning_rate: float
    l2: float
    sampling_rate: float | None
    clip: float | None
    holdout_fraction: float
    min_sites: int
    max_participants: int
    source: str = field(default="<request>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        set_ = object.__setattr__
        set_(self, "request_id", _name(self.request_id, src, "request_id"))
        set_(self, "sites", _names(self.sites, src, "sites", MAX_SITES, MIN_SITES))
        if self.task not in TASKS:
            raise RequestError(
                f"{src}: field task: expected one of {', '.join(TASKS)}, got {self.task!r}"
            )
        set_(self, "regions", _names(self.regions, src, "regions", MAX_REGIONS))
        set_(self, "region_bounds", _region_bounds(self, src))  # type: ignore[arg-type]
        if self.task == "brain-age":
            if self.label_bounds is None:
                raise RequestError(
                    f"{src}: field bounds/label: brain-age needs the label's public bounds "
                    "[lo, hi] (age, years)"
                )
            set_(self, "label_bounds", _bounds(self.label_bounds, src, "bounds/label"))
        elif self.label_bounds is not None:
            raise RequestError(
                f"{src}: field bounds/label: only brain-age has label bounds; must be absent "
                f"or null for {self.task}"
            )
        set_(self, "rounds", _integer(self.rounds, src, "rounds", 1, MAX_ROUNDS))
        set_(
            self, "local_steps", _integer(self.local_steps, src, "local_steps", 1, MAX_LOCAL_STEPS)
        )
        set_(self, "learning_rate", _real(self.learning_rate, src, "learning_rate", low=0.0))
        set_(self, "l2", _real(self.l2, src, "l2", low=0.0, low_open=False))
        set_(
            self,
            "holdout_fraction",
            _real(self.holdout_fraction, src, "holdout_fraction", low=0.0, high=1.0),
        )
        set_(
            self,
            "max_participants",
            _integer(self.max_participants, src, "max_participants", 1, MAX_PARTICIPANTS),
        )
        set_(self, "min_sites", _integer(self.min_sites, src, "min_sites", MIN_SITES, self.k))
        _check_mode(self, src)

    # -- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: Any, *, source: str = "<request>") -> TrainingRequest:
        """Validate a parsed training request document.

        Raises
        ------
        RequestError
            Naming ``source`` and the first offending field.
        """
        _check_depth(doc, source)
        obj = _object(doc, source, "(top level)", _KEYS, required=_KEYS)
        if obj["schema"] != TRAINING_SCHEMA:
            raise RequestError(
                f"{source}: field schema: expected {TRAINING_SCHEMA!r}, got {obj['schema']!r}"
            )
        bounds = _object(obj["bounds"], source, "bounds", _BOUNDS_KEYS, required={"regions"})
        return cls(
            request_id=obj["request_id"],
            sites=_list(obj["sites"], source, "sites"),
            task=obj["task"],
            regions=_list(obj["regions"], source, "regions"),
            region_bounds=_mapping(bounds["regions"], source, "bounds/regions"),
            label_bounds=bounds.get("label"),
            mode=obj["mode"],
            epsilon=obj["epsilon"],
            delta=obj["delta"],
            rounds=obj["rounds"],
            local_steps=obj["local_steps"],
            learning_rate=obj["learning_rate"],
            l2=obj["l2"],
            sampling_rate=obj["sampling_rate"],
            clip=obj["clip"],
            holdout_fraction=obj["holdout_fraction"],
            min_sites=obj["min_sites"],
            max_participants=obj["max_participants"],
            source=source,
        )

    def to_document(self) -> dict[str, Any]:
        """The normalised request document (JSON-ready; what the content hash covers)."""
        bounds: dict[str, Any] = {"regions": {k: list(v) for k, v in self.region_bounds.items()}}
        if self.label_bounds is not None:
            bounds["label"] = list(self.label_bounds)
        return {
            "schema": TRAINING_SCHEMA,
            "request_id": self.request_id,
            "sites": list(self.sites),
            "task": self.task,
            "regions": list(self.regions),
            "bounds": bounds,
            "mode": self.mode,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
            "local_steps": self.local_steps,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "sampling_rate": self.sampling_rate,
            "clip": self.clip,
            "holdout_fraction": self.holdout_fraction,
            "min_sites": self.min_sites,
            "max_participants": self.max_participants,
        }

    # -- the run ---------------------------------------------------------------------------

    @property
    def k(self) -> int:
        """Number of sites."""
        return len(self.sites)

    @property
    def dp(self) -> bool:
        """Whether the run is differentially private (mode ``dp`` or ``distributed-dp``)."""
        return self.mode in DP_MODES

    @property
    def distributed(self) -> bool:
        """Whether each round is one distributed discrete Gaussian gradient sum."""
        return self.mode == "distributed-dp"

    def check_secure_aggregation(self, secure_aggregation: bool) -> None:
        """Refuse a run without SecAgg+ in mode ``distributed-dp`` (coordinator and server app).

        Raises
        ------
        FederationError
            Mode ``distributed-dp`` and ``secure_aggregation`` false.
        """
        if self.distributed and not secure_aggregation:
            raise FederationError(
                "mode distributed-dp: each site's share is private only inside a SecAgg+ sum; "
                "secure aggregation cannot be turned off"
            )

    def distributed_noise(self) -> TrainingNoise | None:
        """The ``distributed-dp`` noise every site and the hub derive (None in other modes).

        :func:`fednipype.contract.distributed_dp.calibrate_training` at the request's (ε, δ),
        ``clip``, ``rounds``, its parameters (regions + 1) and ``min_sites`` honest sites.
        """
        if not self.distributed:
            return None
        return calibrate_training(
            self.epsilon, self.delta, self.clip, len(self.regions) + 1, self.rounds,
            self.min_sites,
        )  # fmt: skip

    @property
    def steps(self) -> int:
        """DP-SGD steps of the whole run at one site: ``rounds`` × ``local_steps``."""
        return self.rounds * self.local_steps

    def noise(self) -> tuple[float, float] | None:
        """The noise multipliers ``(σ, σ_count)`` every site uses (None in mode ``none``).

        σ is the DP-SGD noise multiplier (noise SD over ``clip``) and σ_count that of the one
        noisy count of a site's training rows, both calibrated deterministically from the
        request's numbers (:func:`fednipype.learn.accountant.calibrate_noise_multiplier`), so
        the hub and every site derive the same.
        """
        return self._noise

    @cached_property
    def _noise(self) -> tuple[float, float] | None:
        if not self.dp:
            return None
        if (found := self.distributed_noise()) is not None:
            return found.noise_multiplier, found.count_noise_multiplier
        sigma, sigma_count = accountant.calibrate_noise_multiplier(
            self.epsilon, self.delta, self.sampling_rate, self.steps
        )
        return float(sigma), float(sigma_count)

    def spent(self) -> tuple[float, float] | None:
        """The ``(ε, δ)`` the accountant gives the run at :meth:`noise` (None in mode ``none``).

        ε is at most the request's (the calibration rounds the noise up); it is what each site's
        ledger is charged.
        """
        return self._spent

    @cached_property
    def _spent(self) -> tuple[float, float] | None:
        noise = self.noise()
        if noise is None:
            return None
        if (found := self.distributed_noise()) is not None:
            return found.epsilon, found.delta
        epsilon = accountant.training_epsilon(
            self.sampling_rate, noise[0], self.steps, noise[1], self.delta
        )
        return float(epsilon), float(self.delta)  # type: ignore[arg-type]

    def bounds_of_region(self, region: str) -> Bounds:
        """Public ``(lo, hi)`` of ``region`` (its own or the default)."""
        if region not in self.regions:
            raise RequestError(f"{self.source}: region {region!r} is not in the request")
        return self.region_bounds.get(region, self.region_bounds.get(DEFAULT_REGION))  # type: ignore[return-value]

    @property
    def scaling(self) -> FeatureScaling:
        """The public-bounds scaling of the features (and of the brain-age label)."""
        pairs = [self.bounds_of_region(r) for r in self.regions]
        return FeatureScaling(
            lo=np.array([p[0] for p in pairs]),
            hi=np.array([p[1] for p in pairs]),
            label=self.label_bounds,
        )

    def __repr__(self) -> str:
        return (
            f"TrainingRequest({self.request_id!r}, task={self.task!r}, mode={self.mode!r}, "
            f"sites={self.k}, rounds={self.rounds}, regions={len(self.regions)}, "
            f"hash={self.content_hash[:12]})"
        )


# -- checks ----------------------------------------------------------------------------------


def _real(
    value: Any,
    source: str,
    where: str,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = True,
) -> float:
    """A finite number in (low, high) (``[low, …`` when not ``low_open``), as a float."""
    ok = is_number(value) and math.isfinite(value) and abs(value) <= MAX_MAGNITUDE
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        left = "(" if low_open else "["
        right = f"{high:g})" if high is not None else f"{MAX_MAGNITUDE:g}]"
        raise RequestError(
            f"{source}: field {where}: expected a number in {left}{low:g}, {right}, got {value!r}"
        )
    return float(value)


def _check_mode(req: TrainingRequest, source: str) -> None:
    set_ = object.__setattr__
    if req.mode not in MODES:
        raise RequestError(
            f"{source}: field mode: expected one of {', '.join(MODES)}, got {req.mode!r}"
        )
    if req.mode == "none":
        for name in _DP_FIELDS:
            if getattr(req, name) is not None:
                raise RequestError(f"{source}: field {name}: must be null in mode none")
        return
    _check_privacy(req, source)
    set_(req, "sampling_rate", _sampling_rate(req.sampling_rate, source))
    set_(req, "clip", _real(req.clip, source, "clip", low=0.0))
    if req.mode == "distributed-dp":
        # One exact gradient sum per round: the shares' noise adds up only in the sum of one
        # linear step, and no amplification by sampling is claimed for a sum of discrete
        # Gaussians (fednipype.contract.distributed_dp.training_epsilon).
        if req.local_steps != 1:
            raise RequestError(
                f"{source}: field local_steps: mode distributed-dp sends one gradient sum per "
                f"round; expected 1, got {req.local_steps}"
            )
        if req.sampling_rate != 1.0:
            raise RequestError(
                f"{source}: field sampling_rate: mode distributed-dp uses every training row "
                f"each round; expected 1, got {req.sampling_rate:g}"
            )


def _sampling_rate(value: Any, source: str) -> float:
    if not is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise RequestError(
            f"{source}: field sampling_rate: expected a number in (0, 1], got {value!r}"
        )
    return float(value)
