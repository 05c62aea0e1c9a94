"""A site's feature tables and participants table, read once per process while unchanged.

A SuperNode's client app answers every message of a run in one process (a simulation's
too): the site's tables are read once per process and reused while their files are
unchanged. The key is each file's (path, size, modification time): an edited, added or
removed file is read afresh, so a round sees exactly what reading the files would give.
Callers get the cached frame and copy it before changing it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import pandas as pd

from fednipype.bids import find_feature_files, read_participants
from fednipype.contract.training import FEATURE
from fednipype.site.design import load_feature_table

__all__ = ["read_feature_table", "read_participants_table"]


def _stamp(*paths: str) -> tuple[tuple[str, int, int], ...]:
    """``(path, size, mtime_ns)`` of every file at or below ``paths`` (absent ones left out)."""
    files, seen = [], set()
    for top in paths:
        if not os.path.isdir(top):
            files.append(top)
        for folder, subfolders, names in os.walk(top, followlinks=True):
            if (real := os.path.realpath(folder)) in seen:  # a linked folder's loop
                subfolders[:] = []
                continue
            seen.add(real)
            subfolders.sort()
            files += [os.path.join(folder, name) for name in sorted(names)]
    found = []
    for path in files:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            found.append((path, st.st_size, st.st_mtime_ns))
    return tuple(found)


@functools.lru_cache(maxsize=32)  # a simulation runs its sites in one process
def _feature_table(derivatives: str, stamp: tuple) -> pd.DataFrame:
    return load_feature_table(find_feature_files(derivatives), FEATURE)


@functools.lru_cache(maxsize=32)  # a simulation runs its sites in one process
def _participants(bids_dir: str, stamp: tuple) -> pd.DataFrame:
    return read_participants(bids_dir)


def read_feature_table(derivatives: str) -> pd.DataFrame:
    """The regional-feature table of every ``*_desc-regional_features.tsv`` below
    ``derivatives`` (cached while no file below it changed; do not modify it)."""
    return _feature_table(derivatives, _stamp(derivatives))


def read_participants_table(bids_dir: str, files: Sequence[str]) -> pd.DataFrame:
    """``participants.tsv`` of ``bids_dir`` (cached while ``files`` are unchanged)."""
    return _participants(bids_dir, _stamp(*files))
