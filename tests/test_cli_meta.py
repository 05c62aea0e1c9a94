"""fednipype-meta: the files it writes, what the forest plots show, errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_coordinator import REGIONS, TERMS, release_doc, simulate_site, write_sites

from fednipype.cli import meta
from fednipype.coordinator import pool
from fednipype.reports import plot_filename, write_meta_report
from fednipype.reports.forest import forest_figure

SITES = ("siteA", "siteB", "siteC")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img" and "src" in attrs:
            self.links.append(attrs["src"])


def _links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.links


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> list[Path]:
    return write_sites(tmp_path_factory.mktemp("releases"))[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_writes_table_forest_plots_and_page(releases, tmp_path, capsys):
    out = tmp_path / "meta"
    assert meta.main([*map(str, releases), "-o", str(out)]) == 0
    assert f"pooled 3 release(s) ({', '.join(SITES)})" in capsys.readouterr().out

    # The table holds every region, term and method, and equals the library's result.
    table = pd.read_csv(out / "pooled_results.tsv", sep="\t", na_values="n/a")
    expected = pool(releases).results
    assert len(table) == len(REGIONS) * len(TERMS) * 3
    assert list(table["method"].unique()) == [
        "pooled_regression",
        "fixed_effect",
        "random_effects_REML",
    ]
    for column in ("estimate", "se", "ci_low", "ci_high", "p", "tau2", "i2"):
        np.testing.assert_allclose(table[column], expected[column], rtol=1e-12, equal_nan=True)

    # Default: every region (3 <= 10), every term but the intercept.
    plots = sorted(out.glob("forest_*.png"))
    wanted = {plot_filename(r, t) for r in REGIONS for t in TERMS[1:]}
    assert {p.name for p in plots} == wanted
    for png in plots:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 600
            assert image.text["Description"] == "sites: " + ", ".join(SITES)
    # The page links the table and every plot, and every link resolves inside the folder.
    links = _links(out / "index.html")
    assert "pooled_results.tsv" in links
    assert wanted <= set(links)
    assert all((out / link).is_file() for link in links)
    assert _leftovers(tmp_path) == []


def test_forest_plot_has_one_row_per_site_and_the_pooled_rows(releases):
    result = pool(releases)
    fig = forest_figure(result.sites, result.results, "L_P12", "group[patient]")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[:3] == list(SITES)
    assert labels[3:] == [
        "Fixed effect (inverse variance)",
        "Random effects (REML)",
        "Pooled regression (mega-analysis)",
    ]
    assert "k = 3 of 3 sites" in fig.texts[0].get_text()
    assert fig.axes[0].get_title() == "L_P12 — group[patient]"


def test_regions_and_terms_select_what_is_written(releases, tmp_path):
    out = tmp_path / "meta"
    argv = [*map(str, releases), "-o", str(out), "--regions", "L_P12", "--terms", "group[patient]"]
    assert meta.main([*argv, "--method", "dl", "--test", "knha"]) == 0
    assert [p.name for p in out.glob("*.png")] == ["forest_L_P12_group-patient.png"]
    table = pd.read_csv(out / "pooled_results.tsv", sep="\t")
    assert set(table["region"]) == {"L_P12"}
    assert set(table["method"]) == {"pooled_regression", "fixed_effect", "random_effects_DL"}
    assert set(table.loc[table["method"] == "random_effects_DL", "test"]) == {"knha"}


def test_many_regions_plot_the_first_few_and_say_so(releases, tmp_path):
    report = write_meta_report(pool(releases), tmp_path, terms=["age"], max_plot_regions=2)
    assert [p.name for p in report.plots] == [plot_filename(r, "age") for r in REGIONS[:2]]
    assert "first 2 of 3 regions" in report.notes[0]
    assert "first 2 of 3 regions" in report.html.read_text(encoding="utf-8")


def test_existing_output_folder_is_updated_in_place(releases, tmp_path):
    out = tmp_path / "meta"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = [*map(str, releases), "-o", str(out), "--terms", "age", "--regions"]
    assert meta.main([*argv, "L_P01"]) == 0
    assert meta.main([*argv, "R_P01"]) == 0
    assert (out / "mine.txt").read_text() == "keep me"
    assert (out / "forest_L_P01_age.png").is_file()  # earlier runs' files are left alone
    table = pd.read_csv(out / "pooled_results.tsv", sep="\t")
    assert set(table["region"]) == {"R_P01"}
    assert _leftovers(tmp_path) == [] and _leftovers(out) == []


def _error(argv: list[str], capsys) -> str:
    assert meta.main(argv) == 1
    return capsys.readouterr().err


def test_errors_exit_1_name_the_file_and_write_nothing(releases, tmp_path, capsys):
    out = tmp_path / "out" / "meta"
    good = [str(p) for p in releases]

    broken = tmp_path / "broken_release.json"
    broken.write_text("{not json", encoding="utf-8")
    err = _error([*good, str(broken), "-o", str(out)], capsys)
    assert "fednipype-meta: error:" in err and "broken_release.json" in err

    other_atlas = release_doc("siteD", simulate_site("siteC", seed=3))
    other_atlas["atlas"]["sha256"] = "b" * 64
    mismatch = tmp_path / "siteD_release.json"
    mismatch.write_text(json.dumps(other_atlas), encoding="utf-8")
    err = _error([*good, str(mismatch), "-o", str(out)], capsys)
    assert "siteD_release.json: field atlas/sha256 differs from" in err

    err = _error([*good, good[0], "-o", str(out)], capsys)
    assert "are the same release" in err and Path(good[0]).name in err

    err = _error([*good, "-o", str(out), "--regions", "R_P99"], capsys)
    assert "R_P99" in err
    err = _error([*good, "-o", str(out), "--terms", "handedness"], capsys)
    assert "--terms: 'handedness'" in err

    assert not out.exists() and not out.parent.exists()
    assert _leftovers(tmp_path) == []


def test_usage_error_exits_2(releases, capsys):
    with pytest.raises(SystemExit) as info:
        meta.main([str(releases[0])])
    assert info.value.code == 2
    assert "-o/--output-dir" in capsys.readouterr().err


def test_runs_as_a_module_and_reports_errors_on_stderr(tmp_path):
    missing = tmp_path / "nowhere_release.json"
    result = subprocess.run(
        [sys.executable, "-m", "fednipype.cli.meta", str(missing), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "nowhere_release.json: release file not found" in result.stderr
    assert result.stdout == "" and not (tmp_path / "o").exists()
