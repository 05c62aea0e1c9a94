"""A release may ask for the summary feature ``total`` (total grey-matter volume) next to regions.

The expected total is summed independently from the feature tables with pandas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fednipype.contract.document import read_release
from fednipype.exceptions import ReleaseValidationError
from fednipype.site.design import ModelSpec
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy
from fednipype.site.release import TOTAL, make_release

BUNDLED = Path(__file__).resolve().parents[1] / "bids_examples"


def _release(features, policy, out, **kwargs):
    return make_release(
        features=features,
        participants=BUNDLED / "siteC",
        policy=policy,
        delta=1e-5,
        site="siteC",
        out_path=out,
        **kwargs,
    )


@pytest.mark.timeout(180)
def test_total_is_released_with_summed_bounds(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "site", epsilon=1e7)
    path = _release(
        bundled_features["siteC"], policy, tmp_path / "r_release.json", epsilon=1e6,
        regions=["L_P12", TOTAL],
    )  # fmt: skip
    doc = read_release(path)
    assert doc["atlas"]["regions"] == ["L_P12", TOTAL]
    n_regions = 100  # every atlas region, each [0, 12000] in the example policy
    assert doc["privacy"]["bounds"][TOTAL] == [0.0, 12000.0 * n_regions]
    # the released mean total volume (intercept row of ZᵀY, ±1-coded dummies, unscaled)
    block = doc["statistics"]["sufficient_statistics"]
    column = block["regions"].index(TOTAL)
    center, scale = block["scaling"][TOTAL]["center"], block["scaling"][TOTAL]["scale"]
    released_mean = center + scale * block["zty"][0][column] / block["n"]
    # independently: sum each subject's regions (first session of each participant), over the
    # participants whose covariates are all known (the model leaves the others out)
    people = pd.read_csv(BUNDLED / "siteC" / "participants.tsv", sep="\t", na_values="n/a")
    complete = set(people.dropna()["participant_id"])
    totals = {}
    for tsv in bundled_features["siteC"]:
        subject = tsv.name.split("_")[0]
        volume = pd.read_csv(tsv, sep="\t", na_values="n/a")["volume_mm3"].sum()
        if subject in complete:
            totals.setdefault(subject, volume)
    assert 0 < len(totals) < len(people)  # the bundled siteC has one participant without age
    expected = float(np.mean(list(totals.values())))
    assert block["n"] == pytest.approx(len(totals), abs=0.01)
    # Within the release's own noise: zty and n each carry N(0, sd²) in scaled units (the sd the
    # contract checks against the analytic Gaussian), so the mean's error is about
    # scale/n · sd · √(1 + (zty/n)²); 6 of those bound it (false alarm 2e-9).
    mean_scaled = block["zty"][0][column] / block["n"]
    tolerance = 6 * scale / block["n"] * block["scale"] * np.sqrt(1 + mean_scaled**2)
    assert tolerance < 1e-3 * expected  # the check still tells totals apart
    assert abs(released_mean - expected) < tolerance, (released_mean, expected, tolerance)


@pytest.mark.timeout(120)
def test_total_needs_the_volume_response(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "site")
    with pytest.raises(ReleaseValidationError, match="'total' needs the volume_mm3 response"):
        _release(
            bundled_features["siteC"], policy, tmp_path / "x_release.json", epsilon=1.0,
            regions=[TOTAL], spec=ModelSpec(response="mean"),
        )  # fmt: skip
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    assert tuple(ledger.spent()) == (0.0, 0.0)
    assert not (tmp_path / "x_release.json").exists()
