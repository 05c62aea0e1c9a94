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
from fednipype.site.lifecycle import init_ledger
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
    assert (
        doc["privacy"]["ledger_id"] == ledger.ledger_id == SitePolicy.from_toml(policy).ledger_id
    )
    # siteC has 45 participants, one with age n/a: 44 rows, released with noise
    lm = doc["statistics"]["sufficient_statistics"]
    assert abs(lm["n"] - 44) < 8 * math.sqrt(lm["noise_variance"])


def test_new_output_folder_does_not_reset_the_budget(bundled_features, tmp_path, site_policy):
    """Total ε = 1 at δ = 1e-4: one release at (1, 1e-5) spends 0.84 (its Gaussian composed at
    the policy's δ), two would spend 1.24: the second is refused, whatever its folder."""
    policy = site_policy(tmp_path / "policy", epsilon=1.0)
    _release(bundled_features["siteC"], policy, tmp_path / "a" / "siteC_release.json")
    spent = _spent(policy)[0]
    assert 0.8 < spent < 0.85
    with pytest.raises(PrivacyBudgetExceeded, match="ledger.sqlite"):
        _release(bundled_features["siteC"], policy, tmp_path / "b" / "siteC_release.json")
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
    assert _spent(policy)[0] == spent


def test_too_few_participants_are_withheld_after_the_charge(
    bundled_features, tmp_path, site_policy
):
    """6 participants: the noisy count (σ ≈ 0.3 at ε = 1e4) is more than 5.3 sd below the
    minimum cohort of 10, so the release is withheld; the charge stays (the decision used
    the charged release)."""
    policy = site_policy(tmp_path / "policy", epsilon=1e5, delta=1e-3)
    few = bundled_features["siteC"][:6]
    with pytest.raises(DisclosureError, match=r"withheld: .*all participants: [4-7]\.\d"):
        _release(few, policy, tmp_path / "out" / "x_release.json", epsilon=1e4)
    assert _spent(policy)[0] > 0
    assert not list((tmp_path / "out").glob("*_release.json"))


def test_small_group_cell_is_withheld_after_the_charge(bundled_features, tmp_path, site_policy):
    participants = pd.read_csv(BUNDLED / "siteC" / "participants.tsv", sep="\t", dtype=str)
    patients = set(participants.loc[participants["group"] == "patient", "participant_id"])
    controls = [f for f in bundled_features["siteC"] if f.name.split("_")[0] not in patients]
    some_patients = [f for f in bundled_features["siteC"] if f.name.split("_")[0] in patients][:3]
    policy = site_policy(tmp_path / "policy", epsilon=1e5, delta=1e-3)
    with pytest.raises(DisclosureError, match=r"group = patient: [1-4]\.\d"):
        _release(controls + some_patients, policy, tmp_path / "x_release.json", epsilon=1e4)
    assert _spent(policy)[0] > 0


def test_the_label_subset_attack_gets_nothing_without_a_charge(
    bundled_features, tmp_path, site_policy
):
    """One target plus 9 known controls: the old refusal named an exact cell count before any
    charge, revealing the target's diagnosis. Now each answer (a release, or a withheld one)
    comes after a charge and depends on the data only through the charged noisy release."""
    participants = pd.read_csv(BUNDLED / "siteC" / "participants.tsv", sep="\t", dtype=str)
    group = dict(zip(participants["participant_id"], participants["group"], strict=True))
    files = {f: group[f.name.split("_")[0]] for f in bundled_features["siteC"]}
    controls = [f for f, g in files.items() if g == "control"]
    patient = next(f for f, g in files.items() if g == "patient")
    policy = site_policy(tmp_path / "policy", epsilon=10.0, delta=1e-3)
    for i, target in enumerate((patient, controls[9])):
        before = _spent(policy)[0]
        out = tmp_path / f"attempt{i}" / "x_release.json"
        try:
            path = _release(controls[:9] + [target], policy, out, epsilon=1.0)
        except DisclosureError as err:
            assert "withheld" in str(err)  # a decision on the noisy counts only
        else:
            n = read_release(path)["statistics"]["sufficient_statistics"]["n"]
            assert n != round(n)  # a noisy count, never the exact 10
        assert _spent(policy)[0] > before  # the answer was paid for, either way


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_epsilon_is_refused_without_a_charge(
    bundled_features, tmp_path, epsilon, site_policy
):
    policy = site_policy(tmp_path / "policy")
    with pytest.raises(PolicyError, match="epsilon"):
        _release(bundled_features["siteC"], policy, tmp_path / "x_release.json", epsilon=epsilon)
    assert _spent(policy) == (0.0, 0.0)


def test_delta_is_checked_against_the_policys_public_maximum(
    bundled_features, tmp_path, site_policy
):
    """δ = 0.05 is below 1/44 (siteC's rows) but not below 1/1000 (the policy's public
    maximum): refused, with a message that names only the public maximum."""
    policy = site_policy(tmp_path / "policy", delta=0.5)
    with pytest.raises(PolicyError, match="1/max_participants = 0.001") as info:
        _release(bundled_features["siteC"], policy, tmp_path / "x_release.json", delta=0.05)
    assert "44" not in str(info.value) and "45" not in str(info.value)
    assert _spent(policy) == (0.0, 0.0)


def test_missing_bounds_are_refused(bundled_features, tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    path = folder / "policy.toml"
    path.write_text(
        "[budget]\nepsilon = 5.0\ndelta = 1e-4\nmax_participants = 100\n"
        '[ledger]\npath = "l.sqlite"\ndataset = "c"\n'
        "[bounds.features]\ndefault = [0.0, 12000.0]\n"
    )
    init_ledger(path)
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
    paths = []
    for site in ("siteB", "siteC"):  # each site its own dataset, policy and ledger
        policy = site_policy(tmp_path / site, dataset=site, epsilon=1e5, delta=1e-2)
        text = policy.read_text().replace("max_participants = 1000", "max_participants = 500")
        policy.write_text(text)
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


def test_releases_are_named_uniquely_and_never_overwritten(
    bundled_features, tmp_path, site_policy
):
    """Each release is charged: a second one gets its own name (ledger and charge ids), and an
    existing file is refused before anything is charged."""
    policy = site_policy(tmp_path / "policy", epsilon=10.0)
    ledger_id = SitePolicy.from_toml(policy).ledger_id
    out = tmp_path / "releases"
    kwargs = {"participants": BUNDLED / "siteC", "policy": policy, "site": "siteC"}
    first, second = [
        make_release(
            features=bundled_features["siteC"], epsilon=1.0, delta=1e-5, out_dir=out, **kwargs
        )
        for _ in range(2)
    ]
    assert first.name == f"siteC_ledger-{ledger_id[:8]}_charge-0001_release.json"
    assert second.name == f"siteC_ledger-{ledger_id[:8]}_charge-0002_release.json"
    assert first.read_bytes() != second.read_bytes()
    spent = _spent(policy)
    with pytest.raises(ReleaseValidationError, match="never overwritten"):
        _release(bundled_features["siteC"], policy, first)
    assert _spent(policy) == spent


def test_pre_registered_regions_cost_less_noise_per_region(
    bundled_features, tmp_path, site_policy
):
    """Five regions instead of 100: the same ε buys a far smaller σ (sensitivity √(1 + 7 +
    4·5 + 5) = √33 against √508 on the [-1, 1] scale: n once, 7 of ZᵀZ's entries, Zᵀy, yᵀy);
    an unknown name is refused uncharged."""
    policy = site_policy(tmp_path / "policy", epsilon=10.0)
    regions = ["L_P12", "R_P12", "L_P27", "R_P33", "L_P01"]
    path = _release(bundled_features["siteC"], policy, tmp_path / "five_release.json",
                    regions=regions)  # fmt: skip
    doc = read_release(path)
    block = doc["statistics"]["sufficient_statistics"]
    assert block["regions"] == doc["atlas"]["regions"] == sorted(regions, key=_atlas_order)
    assert block["sensitivity"] == pytest.approx(math.sqrt(33))
    full = _release(bundled_features["siteC"], policy, tmp_path / "all_release.json")
    ratio = read_release(full)["statistics"]["sufficient_statistics"]["scale"] / block["scale"]
    assert ratio == pytest.approx(math.sqrt(508 / 33), rel=1e-9)
    spent = _spent(policy)
    with pytest.raises(ReleaseValidationError, match="'L_P99'"):
        _release(bundled_features["siteC"], policy, tmp_path / "x_release.json",
                 regions=["L_P01", "L_P99"])  # fmt: skip
    assert _spent(policy) == spent


def _atlas_order(name: str) -> tuple[str, str]:
    side, parcel = name.split("_")
    return (side, parcel)
