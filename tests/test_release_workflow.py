"""The DPRelease node, the site-release workflow and the budget command, on a bundled site."""

from __future__ import annotations

import json
import math

import pytest
from conftest import BUNDLED

from fednipype.cli import budget
from fednipype.contract.document import read_release
from fednipype.features import extract_dataset_features
from fednipype.interfaces.release import DPRelease
from fednipype.workflows.release import init_site_release_wf


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory):
    out = tmp_path_factory.mktemp("siteB") / "derivatives"
    extract_dataset_features(BUNDLED / "siteB", out)
    return out


def _policy(folder, epsilon=2.0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.toml"
    path.write_text(
        f"[budget]\nepsilon = {epsilon}\ndelta = 1e-4\n"
        '[ledger]\npath = "ledger.sqlite"\ndataset = "siteB"\n'
        "[bounds]\nage = [18.0, 90.0]\n[bounds.features]\ndefault = [0.0, 12000.0]\n"
    )
    return path


def test_site_release_workflow_charges_once_per_run(derivatives, tmp_path, capsys):
    policy = _policy(tmp_path / "owner")
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


def test_dprelease_requires_epsilon(derivatives, tmp_path):
    node = DPRelease(
        in_features=[str(p) for p in sorted(derivatives.rglob("*_features.tsv"))],
        participants_file=str(BUNDLED / "siteB" / "participants.tsv"),
        policy_file=str(_policy(tmp_path)),
        site="siteB",
        out_file=str(tmp_path / "x_release.json"),
    )
    with pytest.raises(ValueError, match="epsilon"):
        node.run(cwd=str(tmp_path))
    assert not (tmp_path / "ledger.sqlite").exists()
    assert not (tmp_path / "x_release.json").exists()


def test_budget_command_errors(tmp_path, capsys):
    assert budget.main(["--policy", str(_policy(tmp_path))]) == 1
    assert "no privacy ledger yet" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[budget]\nepsilon = -1\n")
    assert budget.main(["--policy", str(bad)]) == 1
    assert "bad.toml" in capsys.readouterr().err
