"""fMRIPrep's flags on fednipype (the README's parity table), the BIDS validator on the
participant output of every bundled site, and what the BIDS-App prints.

Every flag of the parity table is exercised here or in ``test_cli_hostile.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess

import pytest
from support import BUNDLED, REPO, SITES

from fednipype.cli import errors, run
from fednipype.cli.parser import build_parser

VALIDATOR = shutil.which("bids-validator-deno")
NAME = "_space-MNI152NLin2009cAsym_atlas-fednipype{res}_desc-regional_features.tsv"
FAST = ["--skip-bids-validation", "--nipype-plugin", "Linear"]


def _mini(src, dst, subjects):
    """A copy of a bundled site with only ``subjects``."""
    shutil.copytree(src, dst)
    for folder in (dst, dst / "derivatives" / "segmentation"):
        for sub in folder.glob("sub-*"):
            if sub.name[4:] not in subjects:
                shutil.rmtree(sub)
    return dst


def _tables(out):
    return sorted(p.name for p in out.rglob("*_features.tsv"))


def _validate(folder):
    done = subprocess.run(
        [VALIDATOR, "--format", "json", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    issues = json.loads(done.stdout)["issues"]["issues"]
    return done.returncode, [i for i in issues if i.get("severity") == "error"]


@pytest.mark.skipif(VALIDATOR is None, reason="bids-validator-deno is not installed")
@pytest.mark.parametrize("site", SITES)
def test_participant_output_passes_the_bids_validator(site, tmp_path, capsys):
    """Each bundled site: validated on input (the default), features, then 0 validator errors
    on the derivative dataset; fMRIPrep's performance flags in their other spellings."""
    out = tmp_path / "fednipype"
    argv = [str(BUNDLED / site), str(out), "participant", "--n_cpus", "2"]
    code = run.main([*argv, "--omp_nthreads", "1", "--work_dir", str(tmp_path / "w")])
    assert code == 0, capsys.readouterr().err
    code, errors_found = _validate(out)
    print(f"\nbids-validator-deno on {site}'s participant output: {len(errors_found)} error(s)")
    assert errors_found == [] and code == 0
    description = json.loads((out / "dataset_description.json").read_text())
    assert "/" not in json.dumps(description.get("SourceDatasets"))
    assert (out / "README.md").is_file() and "*_features.tsv" in (out / ".bidsignore").read_text()
    assert not list(out.rglob("*_release.json")) and (tmp_path / "w").is_dir()


def test_fmriprep_spellings_parse_to_the_same_options():
    parse = build_parser().parse_args
    base = ["ds", "out", "participant"]
    for flag in ("--nprocs", "--nthreads", "--n-procs", "--n_procs", "--n-cpus", "--n_cpus"):
        assert parse([*base, flag, "3"]).n_procs == 3
    for flag in ("-w", "--work-dir", "--work_dir"):
        assert parse([*base, flag, "wd"]).work_dir.name == "wd"
    for flag in ("--skip-bids-validation", "--skip_bids_validation"):
        assert parse([*base, flag]).skip_bids_validation
    for flag in ("--omp-nthreads", "--omp_nthreads"):
        assert parse([*base, flag, "1"]).omp_nthreads == 1
    for flag in ("--bids-filter-file", "--bids_filter_file"):
        assert parse([*base, flag, "f.json"]).bids_filter_file.name == "f.json"
    for flag in ("-d", "--derivatives"):
        assert [p.name for p in parse([*base, flag, "a", "smriprep=/x/b"]).derivatives] == [
            "a",
            "b",
        ]
    assert parse([*base, "--res", "res-2"]).res == "2"
    assert parse([*base, "--res", "MNI152NLin2009cAsym:res-1"]).res == "1"
    assert parse([*base, "-vv"]).verbose == 2 and parse([*base, "-v"]).verbose == 1
    assert parse([*base, "--notrack"]).notrack
    assert parse([*base, "--participant_label", "sub-01"]).participant_label == ["01"]


@pytest.fixture
def mini_b(tmp_path):
    return _mini(BUNDLED / "siteB", tmp_path / "siteB", ("01", "02", "03"))


def test_derivatives_elsewhere_and_notrack(mini_b, tmp_path, capsys, monkeypatch):
    """-d/--derivatives: maps from a segmentation's output outside the raw dataset."""
    elsewhere = tmp_path / "smriprep"
    shutil.move(mini_b / "derivatives" / "segmentation", elsewhere)
    shutil.rmtree(mini_b / "derivatives")
    monkeypatch.delenv("NIPYPE_NO_ET", raising=False)
    out = tmp_path / "out"
    argv = [str(mini_b), str(out), "participant", *FAST, "-d", f"smriprep={elsewhere}"]
    assert run.main([*argv, "--notrack"]) == 0, capsys.readouterr().err
    assert os.environ["NIPYPE_NO_ET"] == "1"
    assert _tables(out) == [f"sub-{s}{NAME.format(res='')}" for s in ("01", "02", "03")]


def test_res_maps_next_to_native_ones(mini_b, tmp_path, capsys):
    """fMRIPrep's _res-2_ maps beside native ones: native by default, --res 2 on request."""
    for native in (mini_b / "derivatives" / "segmentation").rglob("*_probseg.nii.gz"):
        shutil.copy(native, native.with_name(native.name.replace("_label-", "_res-2_label-")))
    assert run.main([str(mini_b), str(tmp_path / "a"), "participant", *FAST]) == 0
    assert _tables(tmp_path / "a") == [f"sub-{s}{NAME.format(res='')}" for s in ("01", "02", "03")]
    argv = [str(mini_b), str(tmp_path / "b"), "participant", *FAST, "--res", "2"]
    assert run.main(argv) == 0, capsys.readouterr().err
    assert _tables(tmp_path / "b") == [
        f"sub-{s}{NAME.format(res='_res-2')}" for s in ("01", "02", "03")
    ]


def test_bids_filter_file_selects_a_session(tmp_path, capsys):
    ds = _mini(BUNDLED / "siteA", tmp_path / "siteA", ("01", "02"))
    filters = tmp_path / "filter.json"
    filters.write_text(json.dumps({"probseg": {"session": "1"}, "t1w": {"session": "1"}}))
    argv = [str(ds), str(tmp_path / "out"), "participant", *FAST, "--bids-filter-file"]
    assert run.main([*argv, str(filters)]) == 0, capsys.readouterr().err
    assert _tables(tmp_path / "out") == [
        f"sub-{s}_ses-1{NAME.format(res='')}" for s in ("01", "02")
    ]
    summary = capsys.readouterr().out.splitlines()[1].split()
    assert summary[3] == "2" and summary[4] == "2"  # T1w and maps of session 1 only


def test_two_atlases_never_overwrite_each_other(mini_b, tmp_path, capsys):
    from fednipype.atlas import default_atlas

    atlas = default_atlas(2)
    other = tmp_path / "tpl-MNI152NLin2009cAsym_atlas-Copy_dseg.nii.gz"
    shutil.copy(atlas.image, other)
    out = tmp_path / "out"
    assert run.main([str(mini_b), str(out), "participant", *FAST]) == 0
    argv = [str(mini_b), str(out), "participant", *FAST, "--atlas", str(other)]
    assert run.main([*argv, "--atlas-labels", str(atlas.labels)]) == 0
    names = _tables(out)
    assert len(names) == 6 and sum("_atlas-Copy_" in n for n in names) == 3
    capsys.readouterr()


def test_documented_results_on_odd_datasets(mini_b, tmp_path, capsys):
    """A broken unrelated derivative is named and skipped (one warning); sub-emptyroom is not
    a subject; a preprocessed T1w is not counted; INFO lines only with -v."""
    broken = mini_b / "derivatives" / "brainvisa"
    broken.mkdir()
    (broken / "dataset_description.json").write_text("")
    prep = mini_b / "derivatives" / "fmriprep"
    (prep / "sub-01" / "anat").mkdir(parents=True)
    (prep / "dataset_description.json").write_text(
        json.dumps({"Name": "p", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                    "GeneratedBy": [{"Name": "fMRIPrep"}]})
    )  # fmt: skip
    t1w = mini_b / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    for name in ("sub-01_desc-preproc_T1w.nii.gz", "sub-01_space-MNI_desc-preproc_T1w.nii.gz"):
        shutil.copy(t1w, prep / "sub-01" / "anat" / name)
    (mini_b / "sub-emptyroom" / "ses-1" / "meg").mkdir(parents=True)
    (mini_b / "sub-emptyroom" / "ses-1" / "meg" / "x.txt").write_text("x")

    assert run.main([str(mini_b), str(tmp_path / "out"), "participant", *FAST]) == 0
    printed, err = capsys.readouterr()
    row = printed.splitlines()[1].split()
    assert row[1:5] == ["3", "3", "3", "3"]  # subjects, sessions, raw T1w, maps
    warnings = [line for line in err.splitlines() if "brainvisa" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fednipype: warning: ")
    assert "fednipype: info" not in err and "nipype.workflow" not in err

    assert run.main([str(mini_b), str(tmp_path / "out2"), "participant", *FAST, "-v"]) == 0
    assert "fednipype: info" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal(mini_b, tmp_path, capsys, monkeypatch):
    argv = [str(mini_b), str(tmp_path / "a"), "participant", *FAST]
    assert run.main(argv) == 0
    assert "subjects done" not in capsys.readouterr().err
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    argv = [str(mini_b), str(tmp_path / "b"), "participant", *FAST]
    assert run.main(argv) == 0
    shown = terminal.getvalue()
    assert "participant: 3/3 subjects done" in shown and "s elapsed" in shown


def test_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = capsys.readouterr().out
    for code in (errors.EXIT_USAGE, errors.EXIT_INVALID_INPUT, errors.EXIT_PRIVACY):
        assert f"  {code:<3} " in text


def test_every_flag_of_the_readme_parity_table_is_exercised():
    """The README's fMRIPrep-flag table: each flag fednipype accepts appears in these tests."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## fMRIPrep flags", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    tests = "".join(
        (REPO / "tests" / name).read_text(encoding="utf-8")
        for name in ("test_cli_flags.py", "test_cli_hostile.py")
    )
    accepted = build_parser()._option_string_actions
    flags = set()
    for row in rows:
        ours = row.split("|")[2]
        flags |= set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", ours)) & set(accepted)
    flags |= {f for f in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", table) if f in accepted}
    missing = sorted(f for f in flags if f'"{f}"' not in tests and f"'{f}'" not in tests)
    print(f"\n{len(flags)} flags in the README's parity table, each used by a test")
    assert len(flags) >= 20 and missing == []


def test_version(capsys):
    from fednipype import __version__

    with pytest.raises(SystemExit) as exit_info:
        run.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == (
        f"fednipype {__version__}"
    )
