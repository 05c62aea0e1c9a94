"""The federated analysis request: what the hub asks every site, checked and hashed.

A request is a small JSON document (schema ``fednipype-request/1.0``) that a data owner
reviews and approves at the site before anything is computed::

    {
     "schema": "fednipype-request/1.0",
     "request_id": "age-gm-2026",
     "sites": ["site-a", "site-b", "site-c"],
     "model": {"response": "volume_mm3", "numeric": ["age"],
               "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]}},
     "regions": ["L_P27", "R_P27"],
     "bounds": {"covariates": {"age": [18, 90]},
                "regions": {"default": [0, 12000], "L_P27": [0, 9000]}},
     "mode": "dp",
     "epsilon": 1.0, "delta": 1e-5,
     "max_dropouts": 0,
     "min_sites": 2,
     "max_participants": 1000
    }

The order of ``sites`` is the slot order of the secure-sum vector
(:mod:`fednipype.contract.secure_sum`). The design's terms are ``intercept``, the numeric
covariates in the order given, then one ±1-coded dummy per non-reference level of each
categorical covariate, the covariates sorted by name (a JSON object has no order the content
hash could see, so the order is fixed by name): the example above has terms
``intercept, age, group[patient], sex[M]``.

Rules (each violation is a :class:`~fednipype.exceptions.RequestError` naming the source and
the field):

- every key is known and every value has the expected type; no key is repeated; labels and
  names match ``[A-Za-z0-9._-]{1,64}``; at most :data:`MAX_SITES` sites,
  :data:`MAX_REGIONS` regions, :data:`MAX_COVARIATES` covariates and :data:`MAX_LEVELS`
  levels each; numbers are finite and at most :data:`MAX_MAGNITUDE` in magnitude; the text
  is at most :data:`MAX_BYTES` bytes and nested at most :data:`MAX_DEPTH` levels;
- every numeric covariate has public bounds ``[lo, hi]`` (lo < hi) and no other covariate
  has; every region has bounds (its own or ``default``); bounds name no unknown region;
- ``exact``: at least 3 sites, ``epsilon`` and ``delta`` null, ``max_dropouts`` 0 and
  ``min_sites`` >= 3 (the sum is never over fewer than 3 sites);
- ``dp`` and ``distributed-dp``: 0 < ε, 0 < δ < 1/``max_participants``;
- ``distributed-dp``: 0 <= ``max_dropouts`` = t < K and ``min_sites`` >= K − t (the noise
  shares of the K − t sites that must answer carry the central noise); other modes have t = 0;
- 1 <= ``min_sites`` <= K; 1 <= ``max_participants`` <= :data:`MAX_PARTICIPANTS`.

The content hash (:attr:`AnalysisRequest.content_hash`) is the SHA-256 of the canonical JSON
of the normalised document (:func:`fednipype.contract.document.canonical_json`); an altered
request has another hash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from fednipype.contract.calibration import check_delta, check_epsilon, is_number
from fednipype.contract.document import canonical_json, content_hash
from fednipype.contract.scaling import INTERCEPT, Scaling
from fednipype.exceptions import PolicyError, RequestError

__all__ = ["MODES", "REQUEST_SCHEMA", "AnalysisRequest"]

REQUEST_SCHEMA = "fednipype-request/1.0"
#: The three ways a site may answer (see :mod:`fednipype.contract.secure_sum`).
MODES = ("dp", "distributed-dp", "exact")
#: Limits a request must respect (larger is refused unparsed or unchecked).
MAX_BYTES = 1_000_000
MAX_DEPTH = 5
MAX_MAGNITUDE = 1e15
MAX_SITES = 256
MAX_REGIONS = 4096
MAX_COVARIATES = 32
MAX_LEVELS = 32
MAX_PARTICIPANTS = 10_000_000
#: Fewest sites of an exact (noise-free) secure sum.
MIN_EXACT_SITES = 3
_MAX_INT_DIGITS = 20
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEYS = {
    "schema",
    "request_id",
    "sites",
    "model",
    "regions",
    "bounds",
    "mode",
    "epsilon",
    "delta",
    "max_dropouts",
    "min_sites",
    "max_participants",
}
_MODEL_KEYS = {"response", "numeric", "categorical"}
_BOUNDS_KEYS = {"covariates", "regions"}
DEFAULT_REGION = "default"

Bounds = tuple[float, float]


class HashedRequest:
    """What every request document shares: reading and writing it, and its identity.

    A request is a frozen dataclass (``eq=False``) with ``from_document`` (validation) and
    ``to_document`` (the normalised document). Its identity is the canonical JSON of that
    document: two requests are equal when their documents are, and the content hash (SHA-256
    of the canonical JSON) is what a data owner approves. The readers refuse oversized,
    non-UTF-8 or malformed JSON, repeated keys, overlong integers and NaN before validation.
    """

    @classmethod
    def from_document(cls, doc: Any, *, source: str = "<request>") -> Self:
        """Validate a parsed request document (each request type defines it)."""
        raise NotImplementedError

    def to_document(self) -> dict[str, Any]:
        """The normalised document (each request type defines it)."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Read and validate a request file.

        Raises
        ------
        RequestError
            Unreadable, not JSON, or not a valid request (naming the file).
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise RequestError(f"{path}: cannot read the request ({err.strerror})") from err
        if len(raw) > MAX_BYTES:
            raise RequestError(f"{path}: {len(raw)} bytes; a request is at most {MAX_BYTES}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"{path}: not UTF-8 text ({err.reason})") from err
        return cls.from_json(text, source=str(path))

    @classmethod
    def from_json(cls, text: str, *, source: str = "<request>") -> Self:
        """Parse and validate a request's JSON text.

        Raises
        ------
        RequestError
            Not JSON, repeated keys, too large or deep, or not a valid request.
        """
        if not isinstance(text, str):
            raise RequestError(f"{source}: expected the request's JSON text")
        if len(text.encode("utf-8")) > MAX_BYTES:
            raise RequestError(f"{source}: longer than {MAX_BYTES} bytes; not a request")

        def parse_int(digits: str) -> int:
            if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
                raise RequestError(f"{source}: an integer of {len(digits)} digits; not a request")
            return int(digits)

        def refuse_constant(name: str) -> None:
            raise RequestError(f"{source}: {name} is not a number a request may hold")

        def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise RequestError(f"{source}: key {key!r} appears twice")
                out[key] = value
            return out

        try:
            doc = json.loads(
                text,
                parse_int=parse_int,
                parse_constant=refuse_constant,
                object_pairs_hook=no_repeats,
            )
        except RecursionError as err:
            raise RequestError(f"{source}: nested too deeply; not a request") from err
        except json.JSONDecodeError as err:
            raise RequestError(f"{source}: not valid JSON ({err})") from err
        return cls.from_document(doc, source=source)

    def dumps(self) -> str:
        """The request file's text (indented JSON, final newline)."""
        return json.dumps(self.to_document(), indent=1, allow_nan=False) + "\n"

    @cached_property
    def canonical(self) -> str:
        """The canonical JSON the content hash is taken of."""
        return canonical_json(self.to_document())

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of :meth:`to_document`."""
        return content_hash(self.to_document())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)


@dataclass(frozen=True, eq=False)
class AnalysisRequest(HashedRequest):
    """A validated federated analysis request (see the module docstring for the rules).

    Parameters
    ----------
    request_id : str
        A label, ``[A-Za-z0-9._-]{1,64}``.
    sites : tuple of str
        Public site labels, in slot order.
    response : str
        The regional feature modelled (e.g. ``volume_mm3``).
    numeric : tuple of str
        Numeric covariates.
    categorical : Mapping[str, tuple of str]
        Categorical covariate → its levels, the first the reference.
    regions : tuple of str
        The atlas regions asked for.
    covariate_bounds : Mapping[str, tuple of float]
        Public ``(lo, hi)`` of each numeric covariate.
    region_bounds : Mapping[str, tuple of float]
        Public ``(lo, hi)`` of regions; ``"default"`` for every region not named.
    mode : {"dp", "distributed-dp", "exact"}
    epsilon, delta : float or None
        Per-site privacy loss; None in ``exact`` mode.
    max_dropouts : int
        t, the sites that may drop out or collude (``distributed-dp``), else 0.
    min_sites : int
        The run needs at least this many answers.
    max_participants : int
        Public per-site cohort cap (δ check and the fixed-point grid).
    source : str
        Where the request came from, for error messages (not part of the content).

    Raises
    ------
    RequestError
        Naming ``source`` and the field.
    """

    request_id: str
    sites: tuple[str, ...]
    response: str
    numeric: tuple[str, ...]
    categorical: Mapping[str, tuple[str, ...]]
    regions: tuple[str, ...]
    covariate_bounds: Mapping[str, Bounds]
    region_bounds: Mapping[str, Bounds]
    mode: str
    epsilon: float | None
    delta: float | None
    max_dropouts: int
    min_sites: int
    max_participants: int
    source: str = field(default="<request>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        set_ = object.__setattr__
        set_(self, "request_id", _name(self.request_id, src, "request_id"))
        set_(self, "sites", _names(self.sites, src, "sites", MAX_SITES))
        set_(self, "response", _name(self.response, src, "model/response"))
        set_(self, "numeric", _names(self.numeric, src, "model/numeric", MAX_COVARIATES, 0))
        set_(self, "categorical", _categorical(self.categorical, src))
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            raise RequestError(
                f"{src}: field model: {sorted(overlap)[0]!r} is both numeric and categorical"
            )
        set_(self, "regions", _names(self.regions, src, "regions", MAX_REGIONS))
        set_(self, "covariate_bounds", _covariate_bounds(self, src))
        set_(self, "region_bounds", _region_bounds(self, src))
        _check_mode(self, src)

    # -- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: Any, *, source: str = "<request>") -> AnalysisRequest:
        """Validate a parsed request document.

        Raises
        ------
        RequestError
            Naming ``source`` and the first offending field.
        """
        _check_depth(doc, source)
        obj = _object(doc, source, "(top level)", _KEYS, required=_KEYS)
        if obj["schema"] != REQUEST_SCHEMA:
            raise RequestError(
                f"{source}: field schema: expected {REQUEST_SCHEMA!r}, got {obj['schema']!r}"
            )
        model = _object(obj["model"], source, "model", _MODEL_KEYS, required={"response"})
        bounds = _object(obj["bounds"], source, "bounds", _BOUNDS_KEYS, required={"regions"})
        return cls(
            request_id=obj["request_id"],
            sites=_list(obj["sites"], source, "sites"),
            response=model["response"],
            numeric=_list(model.get("numeric", []), source, "model/numeric"),
            categorical=_mapping(model.get("categorical", {}), source, "model/categorical"),
            regions=_list(obj["regions"], source, "regions"),
            covariate_bounds=_mapping(bounds.get("covariates", {}), source, "bounds/covariates"),
            region_bounds=_mapping(bounds["regions"], source, "bounds/regions"),
            mode=obj["mode"],
            epsilon=obj["epsilon"],
            delta=obj["delta"],
            max_dropouts=obj["max_dropouts"],
            min_sites=obj["min_sites"],
            max_participants=obj["max_participants"],
            source=source,
        )

    def to_document(self) -> dict[str, Any]:
        """The normalised request document (JSON-ready; what the content hash covers)."""
        return {
            "schema": REQUEST_SCHEMA,
            "request_id": self.request_id,
            "sites": list(self.sites),
            "model": {
                "response": self.response,
                "numeric": list(self.numeric),
                "categorical": {k: list(v) for k, v in self.categorical.items()},
            },
            "regions": list(self.regions),
            "bounds": {
                "covariates": {k: list(v) for k, v in self.covariate_bounds.items()},
                "regions": {k: list(v) for k, v in self.region_bounds.items()},
            },
            "mode": self.mode,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "max_dropouts": self.max_dropouts,
            "min_sites": self.min_sites,
            "max_participants": self.max_participants,
        }

    # -- the model -------------------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """``response``, ``numeric`` and ``categorical`` as ``site.design.ModelSpec`` takes them.

        ``ModelSpec(**request.spec).terms == request.terms``.
        """
        return {
            "response": self.response,
            "numeric": tuple(self.numeric),
            "categorical": {k: tuple(v) for k, v in self.categorical.items()},
        }

    @property
    def dummies(self) -> tuple[str, ...]:
        """The ±1-coded dummy terms, ``name[level]`` for every non-reference level."""
        return tuple(f"{c}[{lvl}]" for c, levels in self.categorical.items() for lvl in levels[1:])

    @property
    def terms(self) -> tuple[str, ...]:
        """Columns of the design: intercept, numeric covariates, dummies (as ModelSpec)."""
        return (INTERCEPT, *self.numeric, *self.dummies)

    @property
    def n_terms(self) -> tuple[str, ...]:
        """Terms whose square is 1 for everyone (intercept, dummies): their ZᵀZ diagonal is n."""
        return (INTERCEPT, *self.dummies)

    @property
    def k(self) -> int:
        """Number of sites (slots)."""
        return len(self.sites)

    def bounds_of_region(self, region: str) -> Bounds:
        """Public ``(lo, hi)`` of ``region`` (its own or the default)."""
        if region not in self.regions:
            raise RequestError(f"{self.source}: region {region!r} is not in the request")
        return self.region_bounds.get(region, self.region_bounds.get(DEFAULT_REGION))  # type: ignore[return-value]

    @property
    def scaling(self) -> Scaling:
        """The maps onto [-1, 1] of the public bounds, as a release builds them."""
        return Scaling.from_bounds(
            numeric={c: self.covariate_bounds[c] for c in self.numeric},
            dummies=self.dummies,
            regions={r: self.bounds_of_region(r) for r in self.regions},
        )

    def slot(self, site: str) -> int:
        """The slot index of ``site`` (its position in ``sites``).

        Raises
        ------
        RequestError
            ``site`` is not one of the request's sites.
        """
        try:
            return self.sites.index(site)
        except ValueError:
            raise RequestError(
                f"{self.source}: field sites: site {site!r} is not one of the request's "
                f"{len(self.sites)} sites"
            ) from None

    def __repr__(self) -> str:
        return (
            f"AnalysisRequest({self.request_id!r}, mode={self.mode!r}, sites={len(self.sites)}, "
            f"terms={len(self.terms)}, regions={len(self.regions)}, "
            f"hash={self.content_hash[:12]})"
        )


# -- checks ----------------------------------------------------------------------------------


def _check_depth(doc: Any, source: str) -> None:
    stack = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(f"{source}: nested deeper than {MAX_DEPTH} levels; not a request")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def _object(
    value: Any, source: str, where: str, keys: set[str], *, required: set[str]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{source}: field {where}: expected an object, got {_kind(value)}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise RequestError(
            f"{source}: field {where}: unknown key {unknown[0]!r} "
            f"(known: {', '.join(sorted(keys))})"
        )
    missing = sorted(required - set(value))
    if missing:
        raise RequestError(f"{source}: field {where}: missing key {missing[0]!r}")
    return value


def _list(value: Any, source: str, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise RequestError(f"{source}: field {where}: expected a list, got {_kind(value)}")
    return tuple(value)


def _mapping(value: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise RequestError(f"{source}: field {where}: expected an object, got {_kind(value)}")
    return dict(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _name(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise RequestError(
            f"{source}: field {where}: expected a name of 1-64 characters [A-Za-z0-9._-], "
            f"got {shown}"
        )
    return value


def _names(value: Any, source: str, where: str, limit: int, least: int = 1) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise RequestError(f"{source}: field {where}: expected a list, got {_kind(value)}")
    if not least <= len(value) <= limit:
        raise RequestError(
            f"{source}: field {where}: expected {least} to {limit} names, got {len(value)}"
        )
    out = tuple(_name(v, source, f"{where}/{i}") for i, v in enumerate(value))
    if len(set(out)) != len(out):
        dupe = next(v for v in out if out.count(v) > 1)
        raise RequestError(f"{source}: field {where}: {dupe!r} appears twice")
    return out


def _categorical(value: Any, source: str) -> Mapping[str, tuple[str, ...]]:
    where = "model/categorical"
    if not isinstance(value, Mapping):
        raise RequestError(f"{source}: field {where}: expected an object, got {_kind(value)}")
    if len(value) > MAX_COVARIATES:
        raise RequestError(f"{source}: field {where}: more than {MAX_COVARIATES} covariates")
    out = {}
    for name in sorted(value, key=str):  # sorted: the order the hash sees
        _name(name, source, f"{where}/{name}")
        levels = _names(value[name], source, f"{where}/{name}", MAX_LEVELS, 2)
        out[name] = levels
    return MappingProxyType(out)


def _bounds(value: Any, source: str, where: str) -> Bounds:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(is_number(v) for v in value)
    ):
        raise RequestError(f"{source}: field {where}: expected [lo, hi], two numbers")
    lo, hi = float(value[0]), float(value[1])
    if not all(math.isfinite(v) and abs(v) <= MAX_MAGNITUDE for v in (lo, hi)):
        raise RequestError(
            f"{source}: field {where}: bounds must be finite and at most {MAX_MAGNITUDE:g} in "
            f"magnitude, got [{lo}, {hi}]"
        )
    if not lo < hi:
        raise RequestError(
            f"{source}: field {where}: bounds must satisfy lo < hi, got [{lo}, {hi}]"
        )
    return (lo, hi)


def _covariate_bounds(req: AnalysisRequest, source: str) -> Mapping[str, Bounds]:
    given = _mapping(req.covariate_bounds, source, "bounds/covariates")
    for name in given:
        if name not in req.numeric:
            raise RequestError(
                f"{source}: field bounds/covariates/{name}: not a numeric covariate of the model "
                f"({', '.join(req.numeric) or 'none'})"
            )
    out = {}
    for name in req.numeric:
        if name not in given:
            raise RequestError(f"{source}: field bounds/covariates: no bounds for {name!r}")
        out[name] = _bounds(given[name], source, f"bounds/covariates/{name}")
    return MappingProxyType(out)


def _region_bounds(req: AnalysisRequest, source: str) -> Mapping[str, Bounds]:
    given = _mapping(req.region_bounds, source, "bounds/regions")
    known = set(req.regions)
    out = {}
    for name in sorted(given, key=str):
        if name != DEFAULT_REGION and name not in known:
            raise RequestError(
                f"{source}: field bounds/regions/{name}: not one of the request's regions"
            )
        out[name] = _bounds(given[name], source, f"bounds/regions/{name}")
    if DEFAULT_REGION not in out:
        missing = [r for r in req.regions if r not in out]
        if missing:
            raise RequestError(
                f"{source}: field bounds/regions: no bounds for region {missing[0]!r} and no "
                f"{DEFAULT_REGION!r}"
            )
    return MappingProxyType(out)


def _integer(value: Any, source: str, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(
            f"{source}: field {where}: expected an integer in [{lo}, {hi}], got {value!r}"
        )
    return int(value)


def _check_mode(req: AnalysisRequest, source: str) -> None:
    set_ = object.__setattr__
    if req.mode not in MODES:
        raise RequestError(
            f"{source}: field mode: expected one of {', '.join(MODES)}, got {req.mode!r}"
        )
    k = len(req.sites)
    set_(
        req,
        "max_participants",
        _integer(req.max_participants, source, "max_participants", 1, MAX_PARTICIPANTS),
    )
    set_(req, "min_sites", _integer(req.min_sites, source, "min_sites", 1, k))
    if req.mode == "distributed-dp":
        t = _integer(req.max_dropouts, source, "max_dropouts", 0, k - 1)
        if req.min_sites < k - t:
            raise RequestError(
                f"{source}: field min_sites: {req.min_sites} is below K - max_dropouts = {k - t}; "
                "in distributed-dp the sum carries the central noise only while at least K - t "
                "sites answer"
            )
    else:
        t = _integer(req.max_dropouts, source, "max_dropouts", 0, 0)
    set_(req, "max_dropouts", t)
    if req.mode == "exact":
        if k < MIN_EXACT_SITES:
            raise RequestError(
                f"{source}: field sites: exact mode needs at least {MIN_EXACT_SITES} sites, "
                f"got {k}"
            )
        if req.min_sites < MIN_EXACT_SITES:
            raise RequestError(
                f"{source}: field min_sites: exact mode never sums fewer than "
                f"{MIN_EXACT_SITES} sites, got {req.min_sites}"
            )
        for name in ("epsilon", "delta"):
            if getattr(req, name) is not None:
                raise RequestError(f"{source}: field {name}: must be null in exact mode")
        return
    _check_privacy(req, source)


def _check_privacy(req: Any, source: str) -> None:
    """A request's ``epsilon`` (finite, > 0) and ``delta`` (0 < δ < 1/``max_participants``),
    normalised to floats in place; shared by every request type with a DP mode."""
    try:
        epsilon = check_epsilon(req.epsilon, f"{source}: field epsilon")
        delta = check_delta(req.delta, f"{source}: field delta")
    except PolicyError as err:
        raise RequestError(str(err)) from err
    if epsilon > MAX_MAGNITUDE:
        raise RequestError(f"{source}: field epsilon: {epsilon:g} is beyond {MAX_MAGNITUDE:g}")
    if not 0 < delta < 1.0 / req.max_participants:
        raise RequestError(
            f"{source}: field delta: {delta:g} must be > 0 and below 1/max_participants = "
            f"{1.0 / req.max_participants:g}"
        )
    object.__setattr__(req, "epsilon", epsilon)
    object.__setattr__(req, "delta", delta)
