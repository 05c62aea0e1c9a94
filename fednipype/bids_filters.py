"""Choosing among a subject's images: fMRIPrep's BIDS filter files and resolutions.

A BIDS filter file (``--bids-filter-file``) refines fednipype's queries with entity filters;
:func:`choose_resolution` picks one resolution (``res-``) when derivatives hold several, as
fMRIPrep's ``_res-2_`` maps next to native ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from fednipype.exceptions import BIDSError
from fednipype.images import bids_entities

if TYPE_CHECKING:
    from bids import BIDSLayout

#: Queries a BIDS filter file may refine (fMRIPrep's format: query → entity filters).
FILTER_QUERIES = ("probseg", "t1w")
_EXAMPLE = '{"probseg": {"session": "1"}}'


class _HasPath(Protocol):
    path: str


T = TypeVar("T", bound=_HasPath)


def read_bids_filters(path: str | Path) -> dict[str, dict]:
    """Read a BIDS filter file (fMRIPrep's ``--bids-filter-file`` format).

    A JSON object mapping a query (``probseg``: the maps the participant level processes;
    ``t1w``: the raw T1w images the summary counts) to entity filters, e.g.
    ``{"probseg": {"session": "1", "res": "2"}}``.  ``null`` means "entity absent", ``"*"``
    "any value".

    Raises
    ------
    BIDSError
        The file is unreadable, not a JSON object of objects, or names an unknown query.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BIDSError(f"{path}: BIDS filter file is not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise BIDSError(f"{path}: BIDS filter file must hold a JSON object, e.g. " + _EXAMPLE)
    unknown = sorted(set(value) - set(FILTER_QUERIES))
    if unknown:
        raise BIDSError(
            f"{path}: unknown query {unknown[0]!r} in the BIDS filter file; expected "
            f"{' or '.join(FILTER_QUERIES)}, e.g. {_EXAMPLE}"
        )
    for query, filters in value.items():
        if not isinstance(filters, dict) or not all(
            v is None or isinstance(v, str | int | list) for v in filters.values()
        ):
            raise BIDSError(
                f"{path}: query {query!r} must map entities to a string, a list or null, "
                f"e.g. {_EXAMPLE}"
            )
    return {query: dict(filters) for query, filters in value.items()}


def user_filters(layout: BIDSLayout, filters: dict | None, source: str | Path | None) -> dict:
    """Entity filters of a filter file as pybids queries; unknown entities are an error."""
    from bids.layout import Query  # pybids, slow to import (loaded by then: a layout exists)

    if not filters:
        return {}
    known = set(layout.get_entities()) | {"suffix", "extension", "datatype", "scope"}
    out = {}
    for entity, value in filters.items():
        if entity not in known:
            raise BIDSError(
                f"{source or 'BIDS filters'}: unknown entity {entity!r}; the dataset's "
                f"entities are {', '.join(sorted(known))}"
            )
        out[entity] = Query.NONE if value is None else Query.ANY if value == "*" else value
    return out


def choose_resolution(found: list[T], res: str | None, where: str) -> list[T]:
    """The maps of one subject/session at the requested resolution.

    With ``res`` given, those whose ``res-`` entity is it.  Without, maps with no ``res-``
    entity (the native grid, as fMRIPrep names it) when there are some, else those of the one
    resolution present; several resolutions and no native map is an error asking for one.
    """
    by_res: dict[str | None, list[T]] = {}
    for record in found:
        by_res.setdefault(bids_entities(record.path).get("res"), []).append(record)
    if res is not None:
        return by_res.get(res, [])
    if None in by_res:
        return by_res[None]
    if len(by_res) == 1:
        return next(iter(by_res.values()))
    raise BIDSError(
        f"{where}: probability maps at resolutions {', '.join(f'res-{r}' for r in sorted(by_res))}"
        " and none native; choose one with --res"
    )
