"""Reading site releases at the hub and checking that they can be pooled.

A consortium hub receives one release file per site (:mod:`fednipype.contract.document`).
:func:`load_releases` reads and validates every file and refuses to pool releases that do not
describe the same analysis — schema version, atlas (image hash and regions), feature, model
(response, terms, reference levels, sessions) and the public scaling of every covariate and
region — or that count a site twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednipype.contract.document import content_hash, read_release
from fednipype.contract.scaling import INTERCEPT, Scaling
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import MetaAnalysisError, ReleaseValidationError

LOGGER = logging.getLogger(__name__)

__all__ = [
    "COMPATIBLE_FIELDS",
    "STATISTIC",
    "SiteRelease",
    "floor_n",
    "load_releases",
    "short_list",
]

#: The statistic the hub pools.
STATISTIC = "sufficient_statistics"

#: Fields that must be equal across releases, in the order they are checked.
COMPATIBLE_FIELDS = (
    "schema_version",
    "atlas/sha256",
    "atlas/regions",
    "feature",
    "model/response",
    "model/terms",
    "model/reference_levels",
    "model/sessions",
)


@dataclass(frozen=True, eq=False)
class SiteRelease:
    """One validated release file.

    Attributes
    ----------
    path : pathlib.Path
        The file it was read from (named in every error message).
    doc : dict
        The validated document.
    content_hash : str
        :func:`fednipype.contract.document.content_hash` of ``doc``: the hash the site's
        ledger recorded for the charge that paid for it.
    """

    path: Path
    doc: dict[str, Any]
    content_hash: str

    @property
    def site(self) -> str:
        """The site label."""
        return str(self.doc["site"])

    @property
    def dataset(self) -> str:
        """The dataset name."""
        return str(self.doc["dataset"])

    @property
    def epsilon(self) -> float:
        """Total ε the release spent."""
        return float(self.doc["privacy"]["epsilon"])

    @property
    def delta(self) -> float:
        """Total δ the release spent."""
        return float(self.doc["privacy"]["delta"])

    @property
    def block(self) -> dict[str, Any]:
        """The ``statistics/sufficient_statistics`` block."""
        return self.doc["statistics"][STATISTIC]

    @property
    def n(self) -> float:
        """The (noisy) number of participants of the linear model."""
        return float(self.block["n"])

    @property
    def scaling(self) -> Scaling:
        """The public maps the statistics were released in."""
        return Scaling.from_document(self.block["scaling"])

    def statistics(self) -> SufficientStatistics:
        """The linear-model statistics, in the scaled units they were released in.

        A noisy count can fall below the number of parameters (or below zero) at small ε; it
        is raised to ``terms + 1`` here, post-processing of a released value that costs no
        privacy.
        """
        try:
            stats = SufficientStatistics.from_document(self.block)
        except MetaAnalysisError as err:
            raise ReleaseValidationError(
                f"{self.path}: field statistics/{STATISTIC}: {err}"
            ) from err
        return floor_n(stats, f"release of site {self.site!r}")


def floor_n(stats: SufficientStatistics, where: str = "statistics") -> SufficientStatistics:
    """``stats`` with a noisy n below ``terms + 1`` raised to it (post-processing, no cost).

    At small ε a released count can fall below the number of parameters, or below zero; the
    pooled fit needs positive residual degrees of freedom. The released ZᵀZ is kept as it is.
    """
    floor = len(stats.terms) + 1
    if stats.n >= floor:
        return stats
    LOGGER.warning("%s: noisy n = %.1f raised to %d (terms + 1)", where, stats.n, floor)
    return stats.with_n(float(floor))


def load_releases(paths: Iterable[str | os.PathLike[str]]) -> list[SiteRelease]:
    """Read and validate release files and check that they can be pooled.

    Every file is validated against the release schema first
    (:func:`fednipype.contract.document.read_release`). The releases must then agree with the
    first one on :data:`COMPATIBLE_FIELDS` and, for every term except the intercept and every
    region, on the scaling (the affine map the statistics were released in). A site may appear
    once: two files with the same content, or two releases of the same site label, are refused
    (the second would count its participants twice).

    Parameters
    ----------
    paths : iterable of path-like
        Release files, one per site.

    Returns
    -------
    list of SiteRelease
        In the order given.

    Raises
    ------
    ReleaseValidationError
        A file is missing, malformed or invalid (naming it and the field); two files are the
        same release or come from the same site (naming both); a release differs from the
        first on one of the fields above (naming the file, the field and the first file).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReleaseValidationError("no release files given: pass at least one *_release.json")
    releases = []
    for path in paths:
        doc = read_release(path)
        releases.append(SiteRelease(path=path, doc=doc, content_hash=content_hash(doc)))
    _check_unique(releases)
    first = releases[0]
    _check_scaling_complete(first)
    for release in releases[1:]:
        _check_compatible(first, release)
    LOGGER.info(
        "%d release(s) can be pooled: sites %s",
        len(releases),
        ", ".join(r.site for r in releases),
    )
    return releases


def _check_unique(releases: Sequence[SiteRelease]) -> None:
    seen_hash: dict[str, SiteRelease] = {}
    seen_site: dict[str, SiteRelease] = {}
    seen_dataset: dict[str, SiteRelease] = {}
    seen_ledger: dict[str, SiteRelease] = {}
    for release in releases:
        for seen, key, what in (
            (seen_dataset, release.dataset, "dataset"),
            (seen_ledger, release.doc["privacy"]["ledger_id"], "privacy ledger"),
        ):
            earlier = seen.get(key)
            if earlier is not None and earlier.site != release.site:
                raise ReleaseValidationError(
                    f"{earlier.path} and {release.path} come from the same {what} ({key!r}) "
                    f"under two site labels ({earlier.site!r}, {release.site!r}): the same "
                    "participants would be counted twice"
                )
            seen[key] = release
        earlier = seen_hash.get(release.content_hash)
        if earlier is not None:
            raise ReleaseValidationError(
                f"{earlier.path} and {release.path} are the same release (identical content, "
                f"sha256 {release.content_hash[:12]}…): pass each site's release once"
            )
        earlier = seen_site.get(release.site)
        if earlier is not None:
            raise ReleaseValidationError(
                f"{earlier.path} and {release.path} are both releases of site "
                f"{release.site!r}: pool one release per site (the same participants would be "
                "counted twice)"
            )
        seen_hash[release.content_hash] = release
        seen_site[release.site] = release


def _scaled_names(release: SiteRelease) -> list[str]:
    """Every name the scaling must cover: non-intercept terms, then regions."""
    terms = [t for t in release.doc["model"]["terms"] if t != INTERCEPT]
    return [*terms, *release.doc["atlas"]["regions"]]


def _check_scaling_complete(release: SiteRelease) -> None:
    missing = release.scaling.missing(_scaled_names(release))
    if missing:
        raise ReleaseValidationError(
            f"{release.path}: field statistics/{STATISTIC}/scaling: no center/scale for "
            f"{short_list(missing)}; every term except the intercept and every region needs one"
        )
    if release.doc["model"]["terms"][0] != INTERCEPT:
        raise ReleaseValidationError(
            f"{release.path}: field model/terms: the first term must be 'intercept'; got "
            f"{release.doc['model']['terms'][0]!r}"
        )


def _get(doc: dict[str, Any], field_path: str) -> Any:
    node: Any = doc
    for key in field_path.split("/"):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _check_compatible(first: SiteRelease, release: SiteRelease) -> None:
    for field_path in COMPATIBLE_FIELDS:
        expected, found = _get(first.doc, field_path), _get(release.doc, field_path)
        if found != expected:
            raise ReleaseValidationError(
                f"{release.path}: field {field_path} differs from {first.path}: "
                f"{_difference(found, expected)}; releases can only be pooled when they "
                "describe the same analysis"
            )
    # A site may declare its own public range of a covariate (the hub converts its statistics
    # to common units exactly), but the responses must share one map: converting a response
    # would mix the noise of ZᵀZ into ZᵀY.
    name = first.scaling.first_difference(release.scaling, first.doc["atlas"]["regions"])
    if name is not None:
        found = release.block["scaling"].get(name)
        expected = first.block["scaling"][name]
        raise ReleaseValidationError(
            f"{release.path}: field statistics/{STATISTIC}/scaling/{name} differs from "
            f"{first.path}: {found!r} vs {expected!r}; the sites declared different public "
            "bounds for a region, so their responses are in different units"
        )


def _difference(found: Any, expected: Any) -> str:
    """A short description of how ``found`` differs from ``expected``."""
    if isinstance(found, list) and isinstance(expected, list):
        if len(found) != len(expected):
            return f"{len(found)} entries vs {len(expected)}"
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            if a != b:
                return f"entry {i} is {a!r}, not {b!r}"
    return f"{found!r} vs {expected!r}"


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """At most ``limit`` quoted names, then how many there are in all."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" … ({len(names)} in all)" if len(names) > limit else "")
