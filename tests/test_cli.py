"""The command-line entry points: exit codes, messages and outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from support import BUNDLED, SITES

from fednipype.cli import demo, run


def test_participant_then_group_level(tmp_path, capsys):
    out = tmp_path / "derivatives"
    assert run.main([str(BUNDLED / "siteB"), str(out), "participant", "--n-procs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "siteB" in printed and "30/30 feature tables" in printed
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert len(list(out.glob("sub-*/anat/sub-*_desc-regional_features.tsv"))) == 30

    policy = tmp_path / "owner" / "policy.toml"
    policy.parent.mkdir()
    policy.write_text(
        '[budget]\nepsilon = 1.5\ndelta = 1e-4\n[ledger]\npath = "ledger.sqlite"\n'
        'dataset = "siteB"\n[bounds]\nage = [18.0, 90.0]\n'
        "[bounds.features]\ndefault = [0.0, 12000.0]\n"
    )
    group = [str(BUNDLED / "siteB"), str(out), "group", "--policy", str(policy)]
    assert run.main([*group, "--epsilon", "1.0"]) == 0
    from fednipype.contract.document import read_release

    assert read_release(out / "release" / "siteB_release.json")["site"] == "siteB"
    capsys.readouterr()
    assert run.main([*group, "--epsilon", "1.0"]) == 1
    assert "PrivacyBudgetExceeded" in capsys.readouterr().err


def test_group_level_requires_privacy_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main([str(BUNDLED / "siteB"), str(tmp_path), "group", "--policy", "p.toml"])
    assert exit_info.value.code == 2
    assert "--policy and --epsilon" in capsys.readouterr().err


def test_missing_bids_dir_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"])
    assert exit_info.value.code == 2
    assert "BIDS folder does not exist" in capsys.readouterr().err


def test_invalid_dataset_exits_non_zero_naming_the_file(tmp_path, capsys):
    (tmp_path / "ds" / "sub-01" / "anat").mkdir(parents=True)
    assert run.main([str(tmp_path / "ds"), str(tmp_path / "out"), "participant"]) == 1
    err = capsys.readouterr().err
    assert "dataset_description.json" in err and str(tmp_path / "ds") in err
    assert not (tmp_path / "out").exists()


def test_unknown_participant_label_exits_non_zero(tmp_path, capsys):
    code = run.main(
        [str(BUNDLED / "siteB"), str(tmp_path), "participant", "--participant-label", "sub-77"]
    )
    assert code == 1
    assert "sub-77 match no subject" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    result = subprocess.run(
        [sys.executable, "-m", "fednipype.cli.demo", str(BUNDLED), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result, out


def test_demo_prints_one_row_per_site_with_counts_from_disk(demo_run):
    result, _ = demo_run
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()[: 1 + len(SITES)]
    for site, line in zip(SITES, lines[1:], strict=True):
        fields = line.split()
        subjects = len(list((BUNDLED / site).glob("sub-*")))
        images = len(list((BUNDLED / site).glob("sub-*/**/*_T1w.nii.gz")))
        assert fields[0] == site
        assert [int(f) for f in fields[1:4]] == [subjects, images, images]


def test_demo_runs_the_whole_pipeline(demo_run):
    from fednipype.hub.pooling import load_releases
    from fednipype.hub.reports import TSV_NAME

    result, out = demo_run
    assert result.returncode == 0, result.stderr
    for site in SITES:
        images = len(list((BUNDLED / site).rglob("*_label-GM_probseg.nii.gz")))
        assert len(list((out / site / "derivatives").rglob("*_features.tsv"))) == images
        assert (out / site / "ledger.sqlite").is_file()
    releases = load_releases(sorted((out / "releases").glob("*_release.json")))
    assert [r.site for r in releases] == list(SITES)
    table = pd.read_csv(out / "meta" / TSV_NAME, sep="\t")
    assert {"pooled_regression", "fixed_effect"} <= set(table["method"])
    assert len(list((out / "meta").glob("forest_*.png"))) >= 2
    assert "forest_" in (out / "meta" / "index.html").read_text()
    assert "Pooled effects" in result.stdout


def test_demo_enumerate_only(tmp_path, capsys):
    assert demo.main([str(BUNDLED), str(tmp_path / "out"), "--enumerate-only"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + len(SITES)
    assert not (tmp_path / "out").exists()


def test_demo_without_sites_fails_clearly(tmp_path, capsys):
    assert demo.main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no BIDS dataset below" in capsys.readouterr().err
