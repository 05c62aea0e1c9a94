"""The DPRelease node, the site-release workflow and the budget command, on a bundled site."""

from __future__ import annotations

import json
import math

import pytest
from support import BUNDLED

from fednipype.cli import budget
from fednipype.contract.document import read_release
from fednipype.interfaces.release import DPRelease
from fednipype.workflows.release import init_site_release_wf


@pytest.fixture
def derivatives(bundled_derivatives):
    return bundled_derivatives["siteB"]


@pytest.fixture
def policy(site_policy, tmp_path):
    return site_policy(tmp_path / "owner", dataset="siteB", epsilon=2.0)


def test_site_release_workflow_charges_once_per_run(derivatives, policy, tmp_path, capsys):
    wf = init_site_release_wf(
        bids_dir=BUNDLED / "siteB",
        derivatives_dir=derivatives,
        policy=policy,
        epsilon=1.0,
        release_file=tmp_path / "release" / "siteB_release.json",
        work_dir=tmp_path / "work",
    )
    wf.run(plugin="Linear")
    doc = read_release(tmp_path / "release" / "siteB_release.json")
    assert doc["site"] == "siteB" and len(doc["atlas"]["regions"]) == 100

    assert budget.main(["--policy", str(policy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isclose(report["spent"]["epsilon"], 1.0)
    assert math.isclose(report["remaining"]["epsilon"], 1.0)
    assert len(report["audit_trail"]) == 1
    assert report["audit_trail"][0]["purpose"] == "release siteB"

    # A second run is a second release: charged again, never served from Nipype's cache.
    wf.run(plugin="Linear")
    assert budget.main(["--policy", str(policy)]) == 0
    text = capsys.readouterr().out
    assert "spent     epsilon=2" in text and "remaining epsilon=0 " in text
    assert text.count("release siteB") == 2

    # The budget is spent: the third run fails, and the release on disk is the second one.
    before = (tmp_path / "release" / "siteB_release.json").read_bytes()
    with pytest.raises(RuntimeError):
        wf.run(plugin="Linear")
    assert (tmp_path / "release" / "siteB_release.json").read_bytes() == before
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
    assert not (policy.parent / "ledger.sqlite").exists()
    assert not (tmp_path / "x_release.json").exists()


def test_budget_command_errors(policy, tmp_path, capsys):
    assert budget.main(["--policy", str(policy)]) == 1
    assert "no privacy ledger yet" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[budget]\nepsilon = -1\n")
    assert budget.main(["--policy", str(bad)]) == 1
    assert "bad.toml" in capsys.readouterr().err
