"""The command-line entry points: exit codes, messages and outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from support import BUNDLED, SITES

from fednipype.cli import budget, demo, errors, run


def test_participant_then_group_level(tmp_path, capsys, site_policy):
    out = tmp_path / "derivatives"
    code = run.main([str(BUNDLED / "siteB"), str(out), "participant", "--nprocs", "2"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "siteB" in printed and "30/30 feature tables" in printed
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert len(list(out.glob("sub-*/anat/sub-*_desc-regional_features.tsv"))) == 30

    policy = site_policy(
        tmp_path / "owner", dataset="siteB", epsilon=30.0, extra="min_cohort = 2\n", bind=False
    )
    assert budget.main(["init", "--policy", str(policy)]) == 0
    group = [str(BUNDLED / "siteB"), str(out), "group", "--policy", str(policy)]
    assert run.main([*group, "--epsilon", "20"]) == 0, capsys.readouterr().err
    from fednipype.contract.document import read_release

    # The release is outside the derivative dataset: in 'release' beside it.
    releases = sorted((tmp_path / "release").glob("siteB*_release.json"))
    assert len(releases) == 1 and read_release(releases[0])["site"] == "siteB"
    assert not list(out.rglob("*_release.json"))
    capsys.readouterr()
    assert run.main([*group, "--epsilon", "25"]) == errors.EXIT_PRIVACY
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fednipype: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "remaining" in lines[0]


def test_group_level_requires_privacy_choices(tmp_path, capsys):
    code = run.main([str(BUNDLED / "siteB"), str(tmp_path), "group", "--policy", "p.toml"])
    assert code == errors.EXIT_USAGE
    assert "--policy and --epsilon" in capsys.readouterr().err


def test_missing_bids_dir_is_invalid_input(tmp_path, capsys):
    code = run.main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"])
    assert code == errors.EXIT_INVALID_INPUT
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_invalid_dataset_exits_non_zero_naming_the_file(tmp_path, capsys):
    (tmp_path / "ds" / "sub-01" / "anat").mkdir(parents=True)
    code = run.main([str(tmp_path / "ds"), str(tmp_path / "out"), "participant"])
    assert code == errors.EXIT_INVALID_INPUT
    err = capsys.readouterr().err
    assert "dataset_description.json" in err and str(tmp_path / "ds") in err
    assert not (tmp_path / "out").exists()


def test_unknown_participant_label_exits_non_zero(tmp_path, capsys):
    code = run.main(
        [str(BUNDLED / "siteB"), str(tmp_path / "out"), "participant", "--participant-label",
         "sub-77", "--skip-bids-validation"]
    )  # fmt: skip
    assert code == errors.EXIT_INVALID_INPUT
    assert "sub-77 match no subject" in capsys.readouterr().err


def test_help_documents_exit_codes_without_duplicate_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and text.count("(default: all) (default") == 0
    for code, meaning in errors.EXIT_CODES.items():
        assert f"{code:<3} {meaning.split()[0]}" in text


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
    assert demo.main([str(tmp_path), str(tmp_path / "out")]) == errors.EXIT_INVALID_INPUT
    err = capsys.readouterr().err
    assert "no BIDS dataset below" in err and len(err.strip().splitlines()) == 1


def test_group_level_releases_pre_registered_regions(
    bundled_derivatives, tmp_path, site_policy, capsys
):
    """``--regions @FILE``: the release holds exactly the pre-registered regions."""
    import shutil

    from fednipype.contract.document import read_release

    out = tmp_path / "derivatives"
    shutil.copytree(bundled_derivatives["siteB"], out)
    regions = tmp_path / "regions.txt"
    regions.write_text("# pre-registered\nL_P12\nR_P12\n\nL_P27\n")
    policy = site_policy(tmp_path / "owner", dataset="siteB")
    argv = [str(BUNDLED / "siteB"), str(out), "group", "--policy", str(policy)]
    code = run.main(
        [*argv, "--epsilon", "1.0", "--regions", f"@{regions}", "--skip-bids-validation"]
    )
    assert code == 0, capsys.readouterr().err
    (release,) = (tmp_path / "release").glob("siteB_*_release.json")
    assert read_release(release)["atlas"]["regions"] == ["L_P12", "L_P27", "R_P12"]
    code = run.main([*argv, "--epsilon", "1.0", "--regions", "@missing.txt"])
    assert code == errors.EXIT_INVALID_INPUT
    assert "--regions @missing.txt" in capsys.readouterr().err
