"""The MetaAnalysis Nipype interface: same files as the library and the command line."""

from __future__ import annotations

import pytest
from nipype.pipeline import engine as pe

from fednipype.cli import hub as meta
from fednipype.exceptions import ReleaseValidationError
from fednipype.hub.pooling import pool
from fednipype.hub.releases import load_releases
from fednipype.hub.reports import write_results_tsv
from fednipype.interfaces.hub import MetaAnalysis


@pytest.fixture
def releases(three_site_releases):
    return three_site_releases[0]


def test_interface_writes_the_librarys_table(releases, tmp_path):
    node = pe.Node(
        MetaAnalysis(in_releases=[str(p) for p in releases], method="PM", regions=["L_P12"]),
        name="meta",
        base_dir=str(tmp_path / "work"),
    )
    outputs = node.run().outputs
    library = write_results_tsv(
        pool(load_releases(releases), method="PM", regions=["L_P12"]), tmp_path / "lib.tsv"
    )
    with open(outputs.out_tsv, "rb") as produced:
        assert produced.read() == library.read_bytes()
    assert [p.rsplit("/", 1)[1] for p in outputs.out_plots] == [
        "forest_L_P12_age.png",
        "forest_L_P12_sex-M.png",
        "forest_L_P12_group-patient.png",
    ]
    html = open(outputs.out_html, encoding="utf-8").read()
    assert all(p.rsplit("/", 1)[1] in html for p in outputs.out_plots)

    # ... and the command line writes the same table.
    out = tmp_path / "cli"
    argv = [*map(str, releases), "-o", str(out), "--method", "PM", "--regions", "L_P12"]
    assert meta.main([*argv, "--terms", "age"]) == 0
    assert (out / "pooled_results.tsv").read_bytes() == library.read_bytes()


def test_interface_refuses_mismatched_releases(releases, tmp_path):
    bad = tmp_path / "copy_release.json"
    bad.write_bytes(releases[0].read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    node = MetaAnalysis(in_releases=[str(releases[0]), str(bad)])
    with pytest.raises(ReleaseValidationError, match="copy_release.json are the same release"):
        node.run(cwd=str(work))
    assert not list(work.glob("*.tsv")) and not list(work.glob("*.html"))


def test_defaults():
    inputs = MetaAnalysis().inputs
    assert inputs.method == "REML" and inputs.test == "z"
