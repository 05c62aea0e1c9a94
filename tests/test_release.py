"""Making a site's DP release: fail-closed budget, disclosure rules, bad input, what leaks."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import BUNDLED

from fednipype.contract.document import content_hash, read_release
from fednipype.exceptions import (
    DisclosureError,
    PolicyError,
    PrivacyBudgetExceeded,
    ReleaseValidationError,
)
from fednipype.hub.regression import pooled_regression
from fednipype.hub.releases import load_releases
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy
from fednipype.site.release import make_release

SITES = ("siteB", "siteC")
#: Every release these tests write, for the final leak scan.
WRITTEN: list[Path] = []


def _release(features, policy, out, *, site="siteC", epsilon=1.0, delta=1e-5, **kwargs):
    path = make_release(
        features=features,
        participants=BUNDLED / site,
        policy=policy,
        epsilon=epsilon,
        delta=delta,
        site=site,
        out_path=out,
        **kwargs,
    )
    WRITTEN.append(path)
    return path


def _spent(policy_path: Path) -> tuple[float, float]:
    policy = SitePolicy.from_toml(policy_path)
    if not policy.ledger_path.exists():
        return (0.0, 0.0)
    return tuple(PrivacyLedger.from_policy(policy).spent())


def test_release_is_charged_recorded_and_valid(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "policy")
    path = _release(bundled_features["siteC"], policy, tmp_path / "out" / "siteC_release.json")
    doc = read_release(path)
    assert doc["site"] == "siteC" and doc["privacy"]["epsilon"] == 1.0
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    trail = ledger.audit_trail()
    assert len(trail) == 1 and math.isclose(trail[0].epsilon, 1.0)
    # One content hash: the ledger's audit row, the contract's hash and the hub's agree.
    assert trail[0].content_sha256 == content_hash(doc)
    assert trail[0].content_sha256 == load_releases([path])[0].content_hash
    assert doc["privacy"]["ledger_charge"] == trail[0].charge_id
    # siteC has 45 participants, one with age n/a: 44 rows, released with noise
    lm = doc["statistics"]["sufficient_statistics"]
    assert abs(lm["n"] - 44) < 8 * math.sqrt(lm["noise_variance"])


def test_new_output_folder_does_not_reset_the_budget(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "policy", epsilon=2.5)
    _release(bundled_features["siteC"], policy, tmp_path / "a" / "siteC_release.json")
    _release(bundled_features["siteC"], policy, tmp_path / "b" / "siteC_release.json")
    assert math.isclose(_spent(policy)[0], 2.0)
    with pytest.raises(PrivacyBudgetExceeded, match="ledger.sqlite"):
        _release(bundled_features["siteC"], policy, tmp_path / "c" / "siteC_release.json")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    assert math.isclose(_spent(policy)[0], 2.0)


def test_too_few_participants_is_refused_without_a_charge(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "policy")
    few = bundled_features["siteC"][:9]
    with pytest.raises(DisclosureError, match="fewer than the minimum cohort of 10"):
        _release(few, policy, tmp_path / "out" / "x_release.json")
    assert _spent(policy) == (0.0, 0.0)
    assert not (tmp_path / "out").exists()


def test_small_group_cell_is_refused(bundled_features, tmp_path, site_policy):
    participants = pd.read_csv(BUNDLED / "siteC" / "participants.tsv", sep="\t", dtype=str)
    patients = set(participants.loc[participants["group"] == "patient", "participant_id"])
    controls = [f for f in bundled_features["siteC"] if f.name.split("_")[0] not in patients]
    some_patients = [f for f in bundled_features["siteC"] if f.name.split("_")[0] in patients][:5]
    policy = site_policy(tmp_path / "policy")
    with pytest.raises(DisclosureError, match="patient"):
        _release(controls + some_patients, policy, tmp_path / "out" / "x_release.json")
    assert _spent(policy) == (0.0, 0.0)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_epsilon_is_refused_without_a_charge(
    bundled_features, tmp_path, epsilon, site_policy
):
    policy = site_policy(tmp_path / "policy")
    with pytest.raises(PolicyError, match="epsilon"):
        _release(bundled_features["siteC"], policy, tmp_path / "x_release.json", epsilon=epsilon)
    assert _spent(policy) == (0.0, 0.0)


def test_delta_not_below_one_over_n_is_refused(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "policy", delta=0.5)
    with pytest.raises(DisclosureError, match="1/n"):
        _release(bundled_features["siteC"], policy, tmp_path / "x_release.json", delta=0.05)
    assert _spent(policy) == (0.0, 0.0)


def test_missing_bounds_are_refused(bundled_features, tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    path = folder / "policy.toml"
    path.write_text(
        '[budget]\nepsilon = 5.0\ndelta = 1e-4\n[ledger]\npath = "l.sqlite"\ndataset = "c"\n'
        "[bounds.features]\ndefault = [0.0, 12000.0]\n"
    )
    with pytest.raises(PolicyError, match="bounds.age"):
        _release(bundled_features["siteC"], path, tmp_path / "x_release.json")
    assert not (folder / "l.sqlite").exists() or _spent(path) == (0.0, 0.0)


def test_inverted_bounds_and_unreadable_policy(bundled_features, tmp_path, site_policy):
    folder = tmp_path / "p1"
    folder.mkdir()
    bad = folder / "policy.toml"
    bad.write_text(
        site_policy(tmp_path / "p0").read_text().replace("[0.0, 12000.0]", "[9.0, 1.0]")
    )
    with pytest.raises(PolicyError, match="bounds.features.default"):
        _release(bundled_features["siteC"], bad, tmp_path / "x_release.json")
    broken = tmp_path / "broken.toml"
    broken.write_text("[budget\nepsilon = ")
    with pytest.raises(PolicyError, match="broken.toml"):
        _release(bundled_features["siteC"], broken, tmp_path / "x_release.json")


def test_unknown_statistic_is_refused(bundled_features, tmp_path, site_policy):
    policy = site_policy(tmp_path / "policy")
    with pytest.raises(ReleaseValidationError, match="split"):
        _release(
            bundled_features["siteC"],
            policy,
            tmp_path / "x_release.json",
            split={"sufficient_statistics": 0.5, "median": 0.5},
        )
    assert _spent(policy) == (0.0, 0.0)


def test_feature_rows_with_nan_are_dropped_and_counted(bundled_features, tmp_path, site_policy):
    copies = []
    for tsv in bundled_features["siteB"]:
        target = tmp_path / "feat" / tsv.relative_to(tsv.parents[2])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tsv, target)
        shutil.copy(tsv.with_suffix(".json"), target.with_suffix(".json"))
        copies.append(target)
    table = pd.read_csv(copies[0], sep="\t")
    table.loc[3, "volume_mm3"] = np.nan
    table.to_csv(copies[0], sep="\t", index=False, na_rep="n/a")
    policy = site_policy(tmp_path / "policy", dataset="siteB")
    _release(copies, policy, tmp_path / "siteB_release.json", site="siteB")
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    parameters = ledger.audit_trail()[0].parameters
    assert parameters["dropped"] == {"missing_feature": 1}
    assert parameters["n_rows"] == 29


def test_large_epsilon_recovers_planted_effects(bundled_features, tmp_path, site_policy):
    """With a generous budget the release's noise-aware CIs cover the planted age effect.

    At ε = 1 per site the DP noise of the bundled sites (24–45 participants) is far larger than
    the planted effects (see bench/privacy_utility.py); this checks the statistics themselves.
    """
    truth = json.loads((BUNDLED / "ground_truth.json").read_text())
    policy = site_policy(tmp_path / "policy", epsilon=1e5, delta=1e-2)
    paths = []
    for site in ("siteB", "siteC"):
        out = tmp_path / f"{site}_release.json"
        _release(bundled_features[site], policy, out, site=site, epsilon=2e4, delta=1e-3)
        paths.append(out)
    releases = load_releases(paths)
    stats = {release.site: release.statistics() for release in releases}
    table = releases[1].scaling.unscale(pooled_regression(stats))
    age = table[table["term"] == "age"].set_index("region")
    expected = {r["name"]: r["age_slope_mm3_per_year"] for r in truth["regions"]}
    signs = np.sign(age["estimate"]) == np.sign(pd.Series(expected))
    assert signs.mean() > 0.95
    assert (age["ci_high"] < 0).mean() > 0.9


def test_no_release_holds_identifiers_per_subject_values_or_paths(bundled_features):
    """Scan every release written above (runs last in this module)."""
    assert len(WRITTEN) >= 5
    private_numbers = set()
    for site, tsvs in bundled_features.items():
        for tsv in tsvs:
            private_numbers.update(pd.read_csv(tsv, sep="\t")["volume_mm3"].dropna().tolist())
        ages = pd.read_csv(BUNDLED / site / "participants.tsv", sep="\t", na_values="n/a")["age"]
        private_numbers.update(ages.dropna().tolist())
    for path in WRITTEN:
        text = path.read_text()
        assert not re.search(r"sub-[A-Za-z0-9]", text), path
        assert "/" not in text and "\\" not in text, path

        def numbers(obj):
            if isinstance(obj, dict):
                for key, value in obj.items():
                    if key not in ("bounds", "scaling", "software"):
                        yield from numbers(value)
            elif isinstance(obj, list):
                for value in obj:
                    yield from numbers(value)
            elif isinstance(obj, float):
                yield obj

        leaked = [x for x in numbers(json.loads(text)) if x in private_numbers]
        assert leaked == [], path
