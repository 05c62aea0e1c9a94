"""Shared fixtures: the bundled sites and their features, site policies, simulated releases.

Session-scoped where the work is read-only for the tests using it (features extracted once,
releases written once). Constants and helpers the fixtures use live in ``support.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import BIDS_EXAMPLES, BUNDLED, REPO, SITES, write_sites

from fednipype.features import extract_dataset_features
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import example_policy

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


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


@pytest.fixture(scope="session")
def bundled_derivatives(tmp_path_factory) -> dict[str, Path]:
    """Participant-level derivatives (regional features) of every bundled site, made once."""
    root = tmp_path_factory.mktemp("bundled-features")
    for site in SITES:
        extract_dataset_features(BUNDLED / site, root / site)
    return {site: root / site for site in SITES}


@pytest.fixture(scope="session")
def bundled_features(bundled_derivatives) -> dict[str, list[Path]]:
    """The feature tables of every bundled site, in subject/session order."""
    return {
        site: sorted(folder.rglob("*_desc-regional_features.tsv"))
        for site, folder in bundled_derivatives.items()
    }


@pytest.fixture
def site_policy() -> Callable[..., Path]:
    """Factory of site policies: ``site_policy(folder, dataset=..., epsilon=..., ...)``.

    Writes ``folder/policy.toml`` with the example sites' public bounds and, unless
    ``bind=False``, creates its ledger beside it as ``fednipype-budget init`` does (``extra`` is
    TOML text put first, e.g. ``"min_cohort = 20\\n"``).
    """

    def make(
        folder: Path,
        *,
        dataset: str = "siteC",
        epsilon: float = 10.0,
        delta: float = 1e-4,
        extra: str = "",
        bind: bool = True,
    ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "policy.toml"
        text = example_policy(dataset=dataset, total_epsilon=epsilon, total_delta=delta)
        path.write_text(extra + text, encoding="utf-8")
        if bind:
            init_ledger(path)
        return path

    return make


@pytest.fixture(scope="session")
def three_site_releases(tmp_path_factory):
    """Three simulated sites' noise-free releases and their raw rows (``support.write_sites``)."""
    return write_sites(tmp_path_factory.mktemp("three-site-releases"))
