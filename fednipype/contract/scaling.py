"""The public value scaling of a release: forward map, inverse, and compatibility between sites.

Before a site computes its statistics, every covariate and every region's response is mapped
affinely onto [-1, 1] with its public bounds, ``x_s = (x − center) / scale`` with
``center = (lo + hi) / 2`` and ``scale = (hi − lo) / 2`` (a 0/1 dummy becomes −1/+1). Values are
clamped to those bounds, which keeps the sensitivity of the statistics small and known. The
release records the maps (``statistics/sufficient_statistics/scaling``); the hub needs the same
maps at every site to add statistics up, and their inverse to report coefficients in original
units. :class:`Scaling` is that one object.

Examples
--------
>>> s = Scaling.from_bounds(numeric={"age": (20.0, 80.0)}, dummies=["sex[M]"],
...                         regions={"L_P01": (0.0, 12000.0)})
>>> s.center("age"), s.scale("age"), s.center("sex[M]"), s.scale("L_P01")
(50.0, 30.0, 0.5, 6000.0)
>>> s.scale_design([[1.0, 80.0, 1.0]], ["intercept", "age", "sex[M]"]).tolist()
[[1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special

from fednipype.exceptions import ReleaseValidationError

if TYPE_CHECKING:  # pandas only as the type of unscale's table (importing it costs ~0.3 s)
    import pandas as pd

__all__ = ["INTERCEPT", "Scaling"]

#: The design's constant column; it is never scaled.
INTERCEPT = "intercept"

Bounds = tuple[float, float]


@dataclass(frozen=True)
class Scaling:
    """Affine maps ``x_s = (x − center) / scale`` by name (covariate terms and regions).

    Parameters
    ----------
    maps : Mapping[str, tuple of float]
        ``name → (center, scale)``, scale > 0. The intercept has no map.
    """

    maps: Mapping[str, tuple[float, float]]

    def __post_init__(self) -> None:
        maps = {}
        for name, (center, scale) in self.maps.items():
            center, scale = float(center), float(scale)
            if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
                raise ReleaseValidationError(
                    f"scaling/{name}: expected a finite center and a scale > 0, got "
                    f"center={center!r}, scale={scale!r}"
                )
            maps[str(name)] = (center, scale)
        object.__setattr__(self, "maps", MappingProxyType(maps))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_bounds(
        cls,
        *,
        numeric: Mapping[str, Bounds],
        dummies: Sequence[str],
        regions: Mapping[str, Bounds],
    ) -> Scaling:
        """The maps that send each public bound interval onto [-1, 1].

        Parameters
        ----------
        numeric : Mapping[str, tuple of float]
            Numeric covariate → its public ``(lo, hi)``.
        dummies : sequence of str
            0/1 indicator terms (mapped to −1/+1).
        regions : Mapping[str, tuple of float]
            Region → public ``(lo, hi)`` of its feature.

        Returns
        -------
        Scaling
        """
        maps: dict[str, tuple[float, float]] = {}
        for name, (lo, hi) in numeric.items():
            maps[name] = ((lo + hi) / 2, (hi - lo) / 2)
        for name in dummies:
            maps[name] = (0.5, 0.5)
        for name, (lo, hi) in regions.items():
            maps[name] = ((lo + hi) / 2, (hi - lo) / 2)
        return cls(maps)

    @classmethod
    def from_document(cls, block: Mapping[str, Mapping[str, Any]]) -> Scaling:
        """Read the ``scaling`` block of a validated release."""
        return cls({name: (m["center"], m["scale"]) for name, m in block.items()})

    def to_document(self) -> dict[str, dict[str, float]]:
        """The ``scaling`` block the release writes."""
        return {name: {"center": c, "scale": s} for name, (c, s) in self.maps.items()}

    # -- forward map -----------------------------------------------------------------------

    def center(self, name: str) -> float:
        """Center of ``name``'s map."""
        return self._map(name)[0]

    def scale(self, name: str) -> float:
        """Scale of ``name``'s map."""
        return self._map(name)[1]

    def _map(self, name: str) -> tuple[float, float]:
        if name == INTERCEPT:
            return (0.0, 1.0)
        if name not in self.maps:
            raise ReleaseValidationError(f"scaling: no center/scale for {name!r}")
        return self.maps[name]

    def _arrays(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._map(name) for name in names]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def scale_design(self, z: Any, terms: Sequence[str]) -> np.ndarray:
        """Map design columns (named by ``terms``; the intercept stays 1) to scaled units."""
        center, scale = self._arrays(terms)
        return (np.asarray(z, dtype=float) - center) / scale

    def scale_response(self, y: Any, regions: Sequence[str]) -> np.ndarray:
        """Map responses (one column per region) to scaled units."""
        center, scale = self._arrays(regions)
        return (np.asarray(y, dtype=float) - center) / scale

    @staticmethod
    def design_bounds(terms: Sequence[str]) -> tuple[list[float], list[float]]:
        """Public bounds of the scaled design columns: 1 for the intercept, [-1, 1] otherwise."""
        lo = [1.0 if t == INTERCEPT else -1.0 for t in terms]
        return lo, [1.0] * len(terms)

    @staticmethod
    def response_bounds(regions: Sequence[str]) -> tuple[list[float], list[float]]:
        """Public bounds of the scaled responses: [-1, 1]."""
        return [-1.0] * len(regions), [1.0] * len(regions)

    # -- inverse ---------------------------------------------------------------------------

    def unscale(self, table: pd.DataFrame) -> pd.DataFrame:
        """Convert regression results from scaled units back to original units.

        A slope becomes ``β = β_s · scale_y / scale_x``; the intercept becomes the expected
        response at the covariates' centers, ``center_y + scale_y · β_s``. Standard errors and
        confidence limits scale the same way (the maps are affine and increasing).

        Parameters
        ----------
        table : pandas.DataFrame
            Columns ``region``, ``term``, ``estimate``, ``se``, ``ci_low``, ``ci_high`` (as
            the hub's regression functions return them).

        Returns
        -------
        pandas.DataFrame
            A copy in original units; where the table has ``t``, ``p`` and ``df`` columns, the
        intercept's t and p test the original-units intercept against 0.
        """
        out = table.copy()
        factor, shift = [], []
        for region, term in zip(out["region"], out["term"], strict=True):
            y_center, y_scale = self._map(region)
            if term == INTERCEPT:
                factor.append(y_scale)
                shift.append(y_center)
            else:
                factor.append(y_scale / self.scale(term))
                shift.append(0.0)
        for column in ("estimate", "ci_low", "ci_high"):
            out[column] = out[column] * factor + shift
        out["se"] = out["se"] * factor
        if {"t", "p", "df"} <= set(out.columns):
            # A slope's test is unchanged by the (increasing) map, but the intercept's shift
            # moves its null hypothesis: test the original-units intercept against 0 again.
            rows = (out["term"] == INTERCEPT).to_numpy()
            t = out.loc[rows, "estimate"] / out.loc[rows, "se"]
            out.loc[rows, "t"] = t
            out.loc[rows, "p"] = 2.0 * special.stdtr(out.loc[rows, "df"], -np.abs(t))
        return out

    # -- per-site units --------------------------------------------------------------------

    @classmethod
    def envelope(cls, scalings: Sequence[Scaling], names: Sequence[str]) -> Scaling:
        """The common maps of several sites: per name, the map of the union of their bounds.

        Sites may declare their own public range of a numeric covariate (e.g. their
        recruitment age range), which keeps their noise small in original units. The hub
        converts their statistics exactly into the units of this envelope
        (:meth:`conversion_to`). Maps outside ``names`` are taken from the first scaling.

        Parameters
        ----------
        scalings : sequence of Scaling
            The sites' maps (at least one).
        names : sequence of str
            The names whose maps may differ between sites.

        Returns
        -------
        Scaling

        Examples
        --------
        >>> a = Scaling({"age": (30.0, 10.0)})
        >>> b = Scaling({"age": (60.0, 20.0)})
        >>> Scaling.envelope([a, b], ["age"]).maps["age"]
        (50.0, 30.0)
        """
        maps = dict(scalings[0].maps)
        for name in names:
            if name == INTERCEPT:
                continue
            lo = min(s.center(name) - s.scale(name) for s in scalings)
            hi = max(s.center(name) + s.scale(name) for s in scalings)
            maps[name] = ((lo + hi) / 2, (hi - lo) / 2)
        return cls(maps)

    def conversion_to(
        self, common: Scaling, terms: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact affine map from these scaled design units to ``common``'s.

        A column scaled here, ``z = (x − c) / s``, is ``d z + e`` in common units
        ``(x − c₀) / s₀``, with ``d = s / s₀`` and ``e = (c − c₀) / s₀``. With one intercept
        per site the shifts ``e`` are absorbed by the site's intercept, so only the ratios
        ``d`` rescale the site's statistics, which keeps their noise independent per entry
        (:func:`fednipype.hub.regression.pooled_regression`, ``units``).

        Parameters
        ----------
        common : Scaling
            The common maps (e.g. :meth:`envelope`).
        terms : sequence of str
            Design columns; the intercept maps to itself (d = 1, e = 0).

        Returns
        -------
        d, e : ndarray
            One entry per term.

        Examples
        --------
        >>> site = Scaling({"age": (30.0, 10.0)})
        >>> d, e = site.conversion_to(Scaling({"age": (50.0, 30.0)}), ["intercept", "age"])
        >>> d.round(4).tolist(), e.round(4).tolist()
        ([1.0, 0.3333], [0.0, -0.6667])
        """
        center, scale = self._arrays(terms)
        center0, scale0 = common._arrays(terms)
        return scale / scale0, (center - center0) / scale0

    # -- compatibility ---------------------------------------------------------------------

    def missing(self, names: Sequence[str]) -> list[str]:
        """The names (other than the intercept) that have no map."""
        return [n for n in names if n != INTERCEPT and n not in self.maps]

    def first_difference(self, other: Scaling, names: Sequence[str]) -> str | None:
        """The first of ``names`` whose map differs between ``self`` and ``other`` (or None).

        Statistics of two sites can be added only when every map is identical: they are then
        in the same units.
        """
        for name in names:
            if name != INTERCEPT and self.maps.get(name) != other.maps.get(name):
                return name
        return None
