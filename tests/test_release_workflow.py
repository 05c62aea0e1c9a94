"""The DPRelease node, the site-release workflow and the budget command, on a bundled site."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import gaussian_mechanism
from support import BUNDLED

from fednipype.cli import budget, errors
from fednipype.contract.document import read_release
from fednipype.interfaces.release import DPRelease
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy
from fednipype.workflows.release import init_site_release_wf


@pytest.fixture
def derivatives(bundled_derivatives):
    return bundled_derivatives["siteB"]


@pytest.fixture
def policy(site_policy, tmp_path):
    return site_policy(tmp_path / "owner", dataset="siteB", epsilon=1.3)


def test_site_release_workflow_charges_once_per_run(derivatives, policy, tmp_path, capsys):
    wf = init_site_release_wf(
        bids_dir=BUNDLED / "siteB",
        derivatives_dir=derivatives,
        policy=policy,
        epsilon=1.0,
        release_dir=tmp_path / "release",
        work_dir=tmp_path / "work",
    )
    wf.run(plugin="Linear")
    (first,) = (tmp_path / "release").glob("siteB_*_release.json")
    doc = read_release(first)
    assert doc["site"] == "siteB" and len(doc["atlas"]["regions"]) == 100

    assert budget.main(["--policy", str(policy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # One Gaussian release at (1, 1e-5), composed at the policy's δ = 1e-4 (dp-accounting).
    mechanism = report["audit_trail"][0]["parameters"]["mechanisms"]["sufficient_statistics"]
    multiplier = mechanism["noise_scale"] / mechanism["sensitivity"]
    one = gaussian_mechanism.get_epsilon_gaussian(multiplier, 1e-4)
    two = gaussian_mechanism.get_epsilon_gaussian(multiplier / math.sqrt(2), 1e-4)
    assert report["spent"]["epsilon"] == pytest.approx(one, rel=1e-9)
    assert report["remaining"]["epsilon"] == pytest.approx(1.3 - one, rel=1e-9)
    assert len(report["audit_trail"]) == 1
    assert report["audit_trail"][0]["purpose"] == "release siteB"

    # A second run is a second release: charged again, never served from Nipype's cache.
    wf.run(plugin="Linear")
    assert budget.main(["--policy", str(policy)]) == 0
    text = capsys.readouterr().out
    assert f"spent     epsilon={two:.6g}" in text  # 1.24, not 2 (basic composition)
    assert text.count("release siteB") == 2

    # The budget is spent: the third run fails, and the release on disk is the second one.
    before = sorted((tmp_path / "release").iterdir())
    assert len(before) == 2  # the second release did not replace the first
    with pytest.raises(RuntimeError):
        wf.run(plugin="Linear")
    assert sorted((tmp_path / "release").iterdir()) == before
    assert budget.main(["--policy", str(policy), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["audit_trail"]) == 2


def test_dprelease_requires_epsilon(derivatives, policy, tmp_path):
    node = DPRelease(
        in_features=[str(p) for p in sorted(derivatives.rglob("*_features.tsv"))],
        participants_file=str(BUNDLED / "siteB" / "participants.tsv"),
        policy_file=str(policy),
        site="siteB",
        out_file=str(tmp_path / "x_release.json"),
    )
    with pytest.raises(ValueError, match="epsilon"):
        node.run(cwd=str(tmp_path))
    assert PrivacyLedger.from_policy(SitePolicy.from_toml(policy)).spent() == (0.0, 0.0)
    assert not (tmp_path / "x_release.json").exists()


def test_budget_command_errors(site_policy, tmp_path, capsys):
    unbound = site_policy(tmp_path / "owner", dataset="siteB", bind=False)
    assert budget.main(["--policy", str(unbound)]) == errors.EXIT_PRIVACY
    assert "not bound to a privacy ledger" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[budget]\nepsilon = -1\n")
    assert budget.main(["--policy", str(bad)]) == errors.EXIT_PRIVACY
    assert "bad.toml" in capsys.readouterr().err


def test_release_folder_keeps_every_release(derivatives, policy, tmp_path):
    """The group level's default: releases beside the derivatives, each uniquely named."""
    for _ in range(2):
        init_site_release_wf(
            bids_dir=BUNDLED / "siteB",
            derivatives_dir=derivatives,
            policy=policy,
            epsilon=0.5,
            release_dir=tmp_path / "release",
            work_dir=tmp_path / "work",
        ).run(plugin="Linear")
    names = sorted(p.name for p in (tmp_path / "release").iterdir())
    assert [n.split("_charge-")[1] for n in names] == ["0001_release.json", "0002_release.json"]
    assert not list(derivatives.rglob("*_release.json"))
