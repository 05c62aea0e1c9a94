"""The site policy: a data owner's privacy budget, disclosure limit, public bounds and ledger.

A site policy is a TOML file written and owned by the data owner. Every privacy-relevant choice
is declared in it explicitly; only ``min_cohort`` has a default (10), and the regional
features' bounds default to the atlas's (below). Nothing is ever read off the data: bounds are
public numbers chosen before the data are looked at, or public facts of the atlas.

Layout::

    min_cohort = 10                 # optional, default 10; top-level keys precede the tables

    [budget]                        # the dataset's total privacy budget, all releases together
    epsilon = 4.0
    delta = 1e-6
    max_participants = 500          # public upper bound on the cohort (δ must be below 1/it)

    [ledger]
    path = "privacy_ledger.sqlite"  # relative paths are resolved against this file's folder
    dataset = "site-a-study-x"      # identity of the dataset the budget belongs to
    id = "…"                        # written by `fednipype-budget init`: binds policy and ledger

    [bounds]                        # public bounds of released quantities, [lo, hi]
    age = [18.0, 95.0]              # covariates by name
    sex = [0, 1]

    [bounds.features]               # regional features
    default = [0.0, 1.0]            # any region without its own entry ([lo, hi] or "atlas")
    "Left-Hippocampus" = [0.0, 0.8] # per-region overrides, by region name

    [federation]                    # optional: how the site answers federated requests
    modes = ["dp", "distributed-dp", "training-dp"]  # DP modes it answers in (default ["dp"])
    allow_exact_secure_sum = false  # answer noise-free sums through SecAgg+ (default false)
    allow_non_dp_training = false   # train models without DP (mode "none"; default false)

``training-dp`` in ``modes`` lets the site take part in federated training with DP-SGD
(:mod:`fednipype.site.training`), ``training-distributed-dp`` in training whose rounds are
SecAgg+ sums of the sites' discrete Gaussian shares (the site's noise alone protects its
gradient only up to its *local floor*; the request's ε holds while at least ``min_sites``
sites' shares are in each sum, the trust assumption the owner opts into); training without
noise needs its own switch, ``allow_non_dp_training = true``.

``features`` is therefore a reserved name in ``[bounds]``, and ``default`` in
``[bounds.features]``. Unknown keys are refused, so a typo cannot silently drop a setting.

``default = "atlas"``, which is also what an absent ``[bounds.features]`` table means, bounds
each region's ``volume_mm3`` by [0, its largest possible volume]: the region's voxel count on
the grid the features were computed on × the voxel volume, recorded in the features' sidecars
(:data:`fednipype.features.ATLAS_MAX_VOLUME`; a public fact of the atlas and the grid, since a
probability is at most 1). When the sidecars disagree (different grids), the largest per region
is used. Per-region entries still override it. A response the atlas does not bound (a mean
intensity) or sidecars that lack the maxima are refused, naming ``bounds.features.default``.

Examples
--------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "policy.toml").write_text('''
... [budget]
... epsilon = 2.0
... delta = 1e-6
... [ledger]
... path = "ledger.sqlite"
... dataset = "demo"
... [bounds]
... age = [18, 90]
... [bounds.features]
... default = [0.0, 1.0]
... ''')
>>> policy = SitePolicy.from_toml(folder / "policy.toml")
>>> policy.epsilon, policy.delta, policy.min_cohort
(2.0, 1e-06, 10)
>>> policy.covariate_bounds("age")
(18.0, 90.0)
>>> policy.feature_bounds("Left-Hippocampus")
(0.0, 1.0)
>>> policy.ledger_path == folder / "ledger.sqlite"
True
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fednipype.contract.calibration import check_delta, check_epsilon, is_number
from fednipype.exceptions import PolicyError

LOGGER = logging.getLogger(__name__)

#: Smallest cohort a statistic may be computed over, unless the policy says otherwise.
DEFAULT_MIN_COHORT = 10

_TOP_KEYS = {"min_cohort", "budget", "ledger", "bounds", "federation"}
_FEDERATION_KEYS = {"modes", "allow_exact_secure_sum", "allow_non_dp_training"}
#: The DP modes of a federated answer a policy may list in ``[federation] modes``.
FEDERATION_DP_MODES = ("dp", "distributed-dp")
#: Federated training with DP-SGD (a training request's mode ``dp``).
TRAINING_DP_MODE = "training-dp"
#: Federated training with distributed discrete Gaussian shares (mode ``distributed-dp``).
TRAINING_DISTRIBUTED_DP_MODE = "training-distributed-dp"
#: The ``[federation] modes`` name that allows each training request mode with noise.
TRAINING_MODES = {"dp": TRAINING_DP_MODE, "distributed-dp": TRAINING_DISTRIBUTED_DP_MODE}
#: Everything ``[federation] modes`` may list.
FEDERATION_MODES = (*FEDERATION_DP_MODES, TRAINING_DP_MODE, TRAINING_DISTRIBUTED_DP_MODE)
#: The mode without noise; allowed only by ``[federation] allow_exact_secure_sum = true``.
EXACT_MODE = "exact"
_BUDGET_KEYS = {"epsilon", "delta", "max_participants"}
_LEDGER_KEYS = {"path", "dataset", "id"}
_LEDGER_ID = re.compile(r"[0-9a-f]{32}")

Bounds = tuple[float, float]
#: ``[bounds.features] default = "atlas"``: each region's bounds are [0, its atlas maximum].
ATLAS_DEFAULT = "atlas"
#: The regional feature the atlas bounds (a region's volume is at most its volume on the grid).
ATLAS_RESPONSE = "volume_mm3"


def _where(source: Path | None, key: str) -> str:
    return f"{source}: '{key}'" if source is not None else f"site policy: '{key}'"


def _check_modes(modes: Any, source: Path | None) -> tuple[str, ...]:
    """``[federation] modes``: distinct names of DP modes (``exact`` has its own switch)."""
    where = _where(source, "federation.modes")
    if isinstance(modes, str | bytes) or not isinstance(modes, Sequence):
        raise PolicyError(f"{where}: expected a list of mode names, got {modes!r}")
    modes = tuple(modes)
    for mode in modes:
        if mode == EXACT_MODE:
            raise PolicyError(
                f"{where}: 'exact' is not a DP mode; a site answers noise-free sums only with "
                "[federation] allow_exact_secure_sum = true"
            )
        if mode not in FEDERATION_MODES:
            raise PolicyError(
                f"{where}: unknown mode {mode!r}; expected some of {list(FEDERATION_MODES)}"
            )
    if len(set(modes)) != len(modes):
        raise PolicyError(f"{where}: lists a mode twice: {list(modes)}")
    return modes


def check_bounds(value: Any, where: str) -> Bounds:
    """Return ``value`` as ``(lo, hi)`` if it is a pair of finite numbers with lo < hi.

    Parameters
    ----------
    value : Any
        The candidate bounds, a sequence of two numbers.
    where : str
        Where the value comes from, used in the error.

    Returns
    -------
    tuple of float
        ``(lo, hi)``.

    Raises
    ------
    PolicyError
        If ``value`` is not two finite numbers, or if lo >= hi.
    """
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(is_number(v) for v in value)
    ):
        raise PolicyError(f"{where}: bounds must be a pair of numbers [lo, hi], got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise PolicyError(f"{where}: bounds must be finite, got [{lo}, {hi}]")
    if not lo < hi:
        raise PolicyError(f"{where}: bounds must satisfy lo < hi, got [{lo}, {hi}]")
    return lo, hi


def _table(data: Mapping[str, Any], key: str, source: Path) -> Mapping[str, Any]:
    if key not in data:
        raise PolicyError(f"{_where(source, key)}: missing table [{key}]")
    value = data[key]
    if not isinstance(value, Mapping):
        raise PolicyError(f"{_where(source, key)}: expected a table [{key}], got {value!r}")
    return value


def _refuse_unknown(table: Mapping[str, Any], allowed: set[str], prefix: str, source: Path):
    unknown = sorted(set(table) - allowed)
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise PolicyError(
            f"{source}: unknown key(s) {names}; expected only {sorted(allowed)} here"
        )


def _required(table: Mapping[str, Any], key: str, dotted: str, source: Path) -> Any:
    if key not in table:
        raise PolicyError(f"{_where(source, dotted)}: missing (no default for this setting)")
    return table[key]


@dataclass(frozen=True)
class SitePolicy:
    """A data owner's privacy policy for one dataset.

    Build it with :meth:`from_toml`; direct construction validates the same way.

    Parameters
    ----------
    epsilon : float
        Total privacy budget epsilon of the dataset (all releases together), finite and > 0.
    delta : float
        Total privacy budget delta, 0 <= delta < 1.
    ledger_path : Path
        The SQLite privacy ledger of the dataset (absolute).
    dataset_id : str
        Identity of the dataset; the ledger is keyed to it.
    feature_bounds_map : Mapping[str, tuple of float]
        Public bounds of regional features by region name (``"default"`` for all others; it
        may be :data:`ATLAS_DEFAULT`, ``"atlas"``).
    covariate_bounds_map : Mapping[str, tuple of float]
        Public bounds of covariates by name.
    min_cohort : int
        Smallest number of participants any statistic may be computed over (default 10).
    source : Path or None
        The policy file, named in error messages.
    ledger_id : str or None
        The id of the ledger the policy is bound to (``fednipype-budget init`` writes it);
        None for a policy that is not bound yet.
    max_participants : int or None
        Public upper bound on the number of participants (``[budget] max_participants``):
        δ is checked against it, never against the data.
    federation_modes : tuple of str
        ``[federation] modes``: the DP modes the site answers federated requests in
        (``"dp"``, ``"distributed-dp"``; default ``("dp",)``).
    allow_exact_secure_sum : bool
        ``[federation] allow_exact_secure_sum``: whether the site answers ``exact`` requests
        (noise-free sums through secure aggregation, a non-DP disclosure; default False).
    allow_non_dp_training : bool
        ``[federation] allow_non_dp_training``: whether the site takes part in training
        requests of mode ``none`` (no noise: its updates and metrics are non-DP disclosures;
        default False).
    """

    epsilon: float
    delta: float
    ledger_path: Path
    dataset_id: str
    feature_bounds_map: Mapping[str, Bounds | str] = field(hash=False)
    covariate_bounds_map: Mapping[str, Bounds] = field(hash=False)
    min_cohort: int = DEFAULT_MIN_COHORT
    source: Path | None = None
    ledger_id: str | None = None
    max_participants: int | None = None
    federation_modes: tuple[str, ...] = ("dp",)
    allow_exact_secure_sum: bool = False
    allow_non_dp_training: bool = False

    def __post_init__(self) -> None:
        src = self.source
        object.__setattr__(self, "federation_modes", _check_modes(self.federation_modes, src))
        for switch in ("allow_exact_secure_sum", "allow_non_dp_training"):
            if not isinstance(getattr(self, switch), bool):
                raise PolicyError(
                    f"{_where(src, f'federation.{switch}')}: must be true or false, "
                    f"got {getattr(self, switch)!r}"
                )
        if self.ledger_id is not None and not (
            isinstance(self.ledger_id, str) and _LEDGER_ID.fullmatch(self.ledger_id)
        ):
            raise PolicyError(
                f"{_where(src, 'ledger.id')}: expected the 32 hex digits `fednipype-budget "
                f"init` wrote, got {self.ledger_id!r}"
            )
        mp = self.max_participants
        if mp is not None and (not isinstance(mp, int) or isinstance(mp, bool) or mp < 1):
            raise PolicyError(
                f"{_where(src, 'budget.max_participants')}: must be an integer >= 1 (a public "
                f"upper bound on the cohort), got {mp!r}"
            )
        object.__setattr__(
            self, "epsilon", check_epsilon(self.epsilon, _where(src, "budget.epsilon"))
        )
        object.__setattr__(self, "delta", check_delta(self.delta, _where(src, "budget.delta")))
        mc = self.min_cohort
        if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
            raise PolicyError(f"{_where(src, 'min_cohort')}: must be an integer >= 1, got {mc!r}")
        if not isinstance(self.dataset_id, str) or not self.dataset_id.strip():
            raise PolicyError(
                f"{_where(src, 'ledger.dataset')}: must be a non-empty string naming the "
                f"dataset, got {self.dataset_id!r}"
            )
        object.__setattr__(self, "ledger_path", Path(self.ledger_path))
        features: dict[str, Bounds | str] = {}
        for name, value in self.feature_bounds_map.items():
            where = _where(src, f"bounds.features.{name}")
            if name == "default" and isinstance(value, str):
                if value != ATLAS_DEFAULT:
                    raise PolicyError(f'{where}: expected [lo, hi] or "atlas", got {value!r}')
                features[name] = value
            else:
                features[str(name)] = check_bounds(value, where)
        covariates = {
            str(name): check_bounds(b, _where(src, f"bounds.{name}"))
            for name, b in self.covariate_bounds_map.items()
        }
        if not features and not covariates:
            raise PolicyError(f"{_where(src, 'bounds')}: no bounds declared")
        object.__setattr__(self, "feature_bounds_map", MappingProxyType(features))
        object.__setattr__(self, "covariate_bounds_map", MappingProxyType(covariates))

    @classmethod
    def from_toml(cls, path: str | Path) -> SitePolicy:
        """Read and validate a site policy file.

        Parameters
        ----------
        path : str or Path
            The TOML policy file.

        Returns
        -------
        SitePolicy
            The validated policy; ``ledger_path`` is absolute.

        Raises
        ------
        PolicyError
            If the file cannot be read, is not valid TOML, or any key is missing, unknown or
            invalid. The message names the file and the key.
        """
        source = Path(path).expanduser().resolve()
        try:
            with source.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError as err:
            raise PolicyError(f"{source}: cannot read site policy ({err.strerror})") from err
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"{source}: not a valid TOML file ({err})") from err

        _refuse_unknown(data, _TOP_KEYS, "", source)
        budget = _table(data, "budget", source)
        _refuse_unknown(budget, _BUDGET_KEYS, "budget.", source)
        epsilon = _required(budget, "epsilon", "budget.epsilon", source)
        delta = _required(budget, "delta", "budget.delta", source)

        ledger = _table(data, "ledger", source)
        _refuse_unknown(ledger, _LEDGER_KEYS, "ledger.", source)
        ledger_path = _required(ledger, "path", "ledger.path", source)
        if not isinstance(ledger_path, str) or not ledger_path.strip():
            raise PolicyError(
                f"{_where(source, 'ledger.path')}: must be a non-empty path string, "
                f"got {ledger_path!r}"
            )
        # Relative to the policy's folder; resolved so that one file has one name.
        resolved = (source.parent / Path(ledger_path).expanduser()).resolve()
        dataset = _required(ledger, "dataset", "ledger.dataset", source)

        bounds = _table(data, "bounds", source)
        features: Mapping[str, Any] = {"default": ATLAS_DEFAULT}  # no table: the atlas's
        if "features" in bounds:
            features = bounds["features"]
            if not isinstance(features, Mapping):
                raise PolicyError(
                    f"{_where(source, 'bounds.features')}: expected a table of region bounds, "
                    f"got {features!r}"
                )
        covariates = {k: v for k, v in bounds.items() if k != "features"}

        federation = data.get("federation", {})
        if not isinstance(federation, Mapping):
            raise PolicyError(
                f"{_where(source, 'federation')}: expected a table [federation], got "
                f"{federation!r}"
            )
        _refuse_unknown(federation, _FEDERATION_KEYS, "federation.", source)

        return cls(
            epsilon=epsilon,
            delta=delta,
            ledger_path=resolved,
            dataset_id=dataset,
            feature_bounds_map=dict(features),
            covariate_bounds_map=covariates,
            min_cohort=data.get("min_cohort", DEFAULT_MIN_COHORT),
            source=source,
            ledger_id=ledger.get("id"),
            max_participants=budget.get("max_participants"),
            federation_modes=federation.get("modes", ("dp",)),
            allow_exact_secure_sum=federation.get("allow_exact_secure_sum", False),
            allow_non_dp_training=federation.get("allow_non_dp_training", False),
        )

    def allows_mode(self, mode: str) -> bool:
        """Whether the site answers federated requests in ``mode``.

        ``exact`` only with ``[federation] allow_exact_secure_sum = true``; a DP mode when it
        is listed in ``[federation] modes``.

        >>> SitePolicy(1.0, 1e-6, Path("l"), "d", {"default": (0, 1)}, {}).allows_mode("dp")
        True
        """
        if mode == EXACT_MODE:
            return self.allow_exact_secure_sum
        return mode in FEDERATION_DP_MODES and mode in self.federation_modes

    def allows_training(self, mode: str) -> bool:
        """Whether the site takes part in federated training requests of ``mode``.

        ``dp`` when ``"training-dp"`` is listed in ``[federation] modes``,
        ``distributed-dp`` when ``"training-distributed-dp"`` is; ``none`` only with
        ``[federation] allow_non_dp_training = true``.

        >>> policy = SitePolicy(1.0, 1e-6, Path("l"), "d", {"default": (0, 1)}, {})
        >>> policy.allows_training("dp"), policy.allows_training("none")
        (False, False)
        """
        if mode == "none":
            return self.allow_non_dp_training
        return mode in TRAINING_MODES and TRAINING_MODES[mode] in self.federation_modes

    @property
    def atlas_default(self) -> bool:
        """Whether regions without their own entry take the atlas's bounds (``"atlas"``)."""
        return self.feature_bounds_map.get("default") == ATLAS_DEFAULT

    def feature_bounds(
        self, region: str, *, response: str = ATLAS_RESPONSE, atlas_max: float | None = None
    ) -> Bounds:
        """Public bounds of a regional feature: its own entry, else ``default``.

        Parameters
        ----------
        region : str
            The region name (as in the atlas's label table).
        response : str
            The feature column released (``volume_mm3``, ``mean``, …); the atlas default
            bounds ``volume_mm3`` only.
        atlas_max : float, optional
            The region's largest possible volume on the features' grid
            (:func:`fednipype.features.read_atlas_max_volumes`); used when ``default`` is
            ``"atlas"`` and the region has no entry of its own.

        Returns
        -------
        tuple of float
            ``(lo, hi)``; ``(0, atlas_max)`` from the atlas default.

        Raises
        ------
        PolicyError
            If neither the region nor a ``default`` is declared in ``[bounds.features]``, or
            the default is ``"atlas"`` and the response is not ``volume_mm3``, the region's
            maximum is unknown, or it is 0 (the region has no voxel on the grid).

        Examples
        --------
        >>> policy = SitePolicy(1.0, 1e-6, Path("l"), "d", {"default": "atlas"}, {})
        >>> policy.feature_bounds("L_P01", atlas_max=13000.0)
        (0.0, 13000.0)
        """
        if region in self.feature_bounds_map:
            return self.feature_bounds_map[region]  # type: ignore[return-value]
        default = self.feature_bounds_map.get("default")
        if default is None:
            raise PolicyError(
                f"{_where(self.source, f'bounds.features.{region}')}: no bounds declared for "
                f"region '{region}' and no [bounds.features] default; bounds are never derived "
                "from the data"
            )
        if default != ATLAS_DEFAULT:
            return default  # type: ignore[return-value]
        where = _where(self.source, "bounds.features.default")
        instead = f'declare default = [lo, hi] or "{region}" = [lo, hi]'
        if response != ATLAS_RESPONSE:
            raise PolicyError(
                f'{where}: "atlas" bounds only the response {ATLAS_RESPONSE!r} (a region\'s '
                f"largest possible volume); for the response {response!r} {instead}"
            )
        if atlas_max is None:
            raise PolicyError(
                f"{where}: \"atlas\" needs region '{region}'s largest possible volume from the "
                "features' sidecars (Atlas.RegionMaxVolumeMm3), which they lack (written by an "
                f"older fednipype?): recompute the features, or {instead}"
            )
        if not atlas_max > 0:
            raise PolicyError(
                f"{where}: \"atlas\" gives region '{region}' no bounds: it has no voxel on the "
                f"features' grid (largest possible volume 0); leave it out, or {instead}"
            )
        return 0.0, float(atlas_max)

    def covariate_bounds(self, name: str) -> Bounds:
        """Public bounds of a covariate declared in ``[bounds]``.

        Parameters
        ----------
        name : str
            The covariate name (e.g. ``"age"``).

        Returns
        -------
        tuple of float
            ``(lo, hi)``.

        Raises
        ------
        PolicyError
            If the covariate has no declared bounds.
        """
        if name in self.covariate_bounds_map:
            return self.covariate_bounds_map[name]
        raise PolicyError(
            f"{_where(self.source, f'bounds.{name}')}: no bounds declared for covariate "
            f"'{name}'; bounds are never derived from the data"
        )

    def feature_bounds_arrays(
        self,
        regions: Sequence[str],
        *,
        response: str = ATLAS_RESPONSE,
        atlas_max: Mapping[str, float] | None = None,
    ) -> tuple[list[float], list[float]]:
        """Lower and upper bounds for several regions, in order.

        Parameters
        ----------
        regions : sequence of str
            Region names.
        response : str
            The feature column released.
        atlas_max : mapping, optional
            Region name → largest possible volume, for the atlas default.

        Returns
        -------
        tuple of list of float
            ``(lows, highs)``, one entry per region.
        """
        atlas_max = atlas_max or {}
        pairs = [
            self.feature_bounds(r, response=response, atlas_max=atlas_max.get(r)) for r in regions
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]


#: The policy the bundled example sites run under: public bounds chosen a priori (ages of adult
#: cohorts; regional grey-matter volumes of the default atlas's ~13 cm³ parcels).
_EXAMPLE_POLICY = """# An example site's policy; a real site's data owner writes their own.
[budget]
epsilon = {total_epsilon!r}
delta = {total_delta!r}
max_participants = {max_participants!r}

[ledger]
path = "{ledger}"
dataset = "{dataset}"

[bounds]
age = [18.0, 90.0]

[bounds.features]
default = [0.0, 12000.0]
"""


def example_policy(
    *,
    dataset: str,
    total_epsilon: float,
    total_delta: float = 1e-4,
    max_participants: int = 1000,
    ledger: str = "ledger.sqlite",
) -> str:
    """The TOML text of a site policy for the bundled example sites (demo, benchmarks, tests).

    Parameters
    ----------
    dataset : str
        The dataset the budget belongs to.
    total_epsilon, total_delta : float
        The dataset's total budget.
    max_participants : int
        Public upper bound on the cohort (the example sites hold 24–45 participants).
    ledger : str
        The ledger's path, relative to the policy file.

    Returns
    -------
    str

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "policy.toml"
    >>> _ = path.write_text(example_policy(dataset="siteA", total_epsilon=10.0))
    >>> SitePolicy.from_toml(path).covariate_bounds("age")
    (18.0, 90.0)
    """
    return _EXAMPLE_POLICY.format(
        dataset=dataset,
        total_epsilon=total_epsilon,
        total_delta=total_delta,
        max_participants=max_participants,
        ledger=ledger,
    )


def bind_policy_text(text: str, ledger_id: str) -> str:
    """The policy text with ``[ledger] id`` set to ``ledger_id`` (added or replaced).

    The data owner's file is edited in place of one line, keeping its comments and layout
    (tomllib reads TOML but does not write it).

    >>> print(bind_policy_text('[ledger]\\npath = "l.sqlite"\\n', "a" * 32), end="")
    [ledger]
    id = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    path = "l.sqlite"
    """
    if not _LEDGER_ID.fullmatch(ledger_id):
        raise PolicyError(f"ledger id: expected 32 lower-case hex digits, got {ledger_id!r}")
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if line.strip() == "[ledger]"), None)
    if header is None:
        raise PolicyError("site policy: no [ledger] table to bind")
    end = next(
        (i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")),
        len(lines),
    )
    entry = f'id = "{ledger_id}"\n'
    for i in range(header + 1, end):
        if re.match(r"\s*id\s*=", lines[i]):
            lines[i] = entry
            return "".join(lines)
    lines.insert(header + 1, entry)
    return "".join(lines)
