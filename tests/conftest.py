"""Shared fixtures: the bundled example sites and the community's bids-examples when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "bids_examples"
SITES = ("siteA", "siteB", "siteC")


def _find_bids_examples() -> Path | None:
    """The BIDS community's ``bids-examples`` layouts: ``$BIDS_EXAMPLES_DIR`` or a copy near
    the repository (its parent folder or one of that folder's sub-folders)."""
    env = os.environ.get("BIDS_EXAMPLES_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    parent = REPO.parent
    candidates = [parent / "bids-examples"] + sorted(parent.glob("*/bids-examples"))
    return next((c for c in candidates if c.is_dir()), None)


BIDS_EXAMPLES = _find_bids_examples()
COMMUNITY_DATASETS = (
    sorted(p.name for p in BIDS_EXAMPLES.iterdir() if (p / "dataset_description.json").is_file())
    if BIDS_EXAMPLES
    else []
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    return BUNDLED


@pytest.fixture(scope="session")
def bids_examples_dir() -> Path:
    if BIDS_EXAMPLES is None:
        pytest.skip(
            "the BIDS community's bids-examples folder is not present "
            "(set BIDS_EXAMPLES_DIR to a checkout to run these tests)"
        )
    return BIDS_EXAMPLES
