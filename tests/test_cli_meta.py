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
from support import BUNDLED, REGIONS, SITES, TERMS, release_doc, simulate_site

from fednipype.cli import hub as meta
from fednipype.hub.pooling import pool
from fednipype.hub.reports import plot_filename, write_meta_report
from fednipype.hub.reports.forest import forest_figure
from fednipype.site.release import make_release


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


@pytest.fixture
def releases(three_site_releases) -> list[Path]:
    return three_site_releases[0]


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


def test_common_intercept_option_matches_the_library(releases, tmp_path):
    out = tmp_path / "meta"
    assert meta.main([*map(str, releases), "-o", str(out), "--common-intercept"]) == 0
    table = pd.read_csv(out / "pooled_results.tsv", sep="\t", na_values="n/a")
    pooled = table[table["method"] == "pooled_regression"].reset_index(drop=True)
    common = pool(releases, site_effects=False).results
    common = common[common["method"] == "pooled_regression"].reset_index(drop=True)
    site = pool(releases).results
    site = site[site["method"] == "pooled_regression"].reset_index(drop=True)
    np.testing.assert_allclose(pooled["estimate"], common["estimate"], rtol=1e-9)
    assert not np.allclose(pooled["estimate"], site["estimate"], rtol=1e-6)


def test_many_regions_plot_the_first_few_and_say_so(releases, tmp_path):
    report = write_meta_report(pool(releases), tmp_path, terms=["age"], max_plot_regions=2)
    assert [p.name for p in report.plots] == [plot_filename(r, "age") for r in REGIONS[:2]]
    assert "first 2 of 3 regions" in report.notes[0]
    assert "first 2 of 3 regions" in report.html.read_text(encoding="utf-8")


def test_page_escapes_what_the_releases_say(tmp_path):
    doc = release_doc("siteA", simulate_site("siteA"))
    doc["dataset"] = "<img src=x onerror=alert(1)> & co"
    path = tmp_path / "siteA_release.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    report = write_meta_report(pool([path]), tmp_path / "out", terms=["age"])
    page = report.html.read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt; &amp; co" in page
    assert "one release" in page  # the k = 1 note reaches the reader


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
    assert meta.main(argv) == 3  # invalid input (fednipype.cli.errors)
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
        [sys.executable, "-m", "fednipype.cli.hub", str(missing), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3  # invalid input
    assert "nowhere_release.json: release file not found" in result.stderr
    assert result.stdout == "" and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# End to end: bundled sites → features → DP releases → fednipype-meta → the planted effects
# --------------------------------------------------------------------------------------------

#: Ground-truth keys of the planted effects, by model term.
TRUTH_KEYS = {
    "age": "age_slope_mm3_per_year",
    "sex[M]": "male_mm3",
    "group[patient]": "patient_mm3",
}


@pytest.mark.slow
def test_end_to_end_planted_effects_lie_inside_the_pooled_intervals(
    bundled_features, site_policy, tmp_path, capsys
):
    """Bundled siteA/B/C → regional volumes → one DP release per site → fednipype-meta.

    The budget is deliberately absurd (ε = 1e9 per site, far beyond any privacy guarantee):
    the Gaussian mechanism's noise sd falls only as 1/√ε at large ε, and with 24–45
    participants per site and 100 regions, a realistic ε = 1 buries these effects (tens to
    hundreds of mm³) under noise whose intervals span thousands. At ε = 1e9 the noise is
    negligible, so the test checks the whole chain — features, design, release scaling,
    pooling, back-transformation to mm³ — against the generator's ground truth.

    Each 95% interval misses its truth one time in twenty, so the check uses a few regions:
    the patient regions L_P12, R_P12 and L_P27 (without DP noise all their intervals cover
    the truth; R_P33's REML age interval narrowly misses it even then) and R_P40, which has
    no patient effect. The pooled regression fits one intercept per site, so the site offsets
    (which differ with the sites' age ranges) do not bias its slopes.
    """
    epsilon = 1e9
    releases = []
    for site in SITES:
        policy = site_policy(tmp_path / "policies" / site, dataset=site, epsilon=epsilon)
        releases.append(
            make_release(
                features=bundled_features[site],
                participants=BUNDLED / site,
                policy=policy,
                epsilon=epsilon,
                delta=1e-5,
                site=site,
                out_path=tmp_path / "releases" / f"{site}_release.json",
            )
        )

    regions = ["L_P12", "R_P12", "L_P27", "R_P40"]
    out = tmp_path / "meta"
    argv = [*map(str, releases), "-o", str(out), "--regions", *regions]
    assert meta.main([*argv, "--terms", "group[patient]"]) == 0
    capsys.readouterr()

    truth = {
        r["name"]: r
        for r in json.loads((BUNDLED / "ground_truth.json").read_text(encoding="utf-8"))["regions"]
    }
    table = pd.read_csv(out / "pooled_results.tsv", sep="\t", na_values="n/a")
    assert set(table["region"]) == set(regions)
    checked = 0
    for method in ("pooled_regression", "random_effects_REML"):
        for region in regions:
            for term, key in TRUTH_KEYS.items():
                row = table[
                    (table["region"] == region)
                    & (table["term"] == term)
                    & (table["method"] == method)
                ].iloc[0]
                planted = truth[region][key]
                assert row["ci_low"] <= planted <= row["ci_high"], (method, region, term)
                checked += 1
            if region in ("L_P12", "R_P12"):  # the intervals are informative at this ε
                patient = table[
                    (table["region"] == region)
                    & (table["term"] == "group[patient]")
                    & (table["method"] == method)
                ].iloc[0]
                assert patient["ci_high"] < 0.0
    assert checked == 24
    assert (table.loc[table["method"] == "random_effects_REML", "k"] == 3).all()
    for region in regions:
        with Image.open(out / plot_filename(region, "group[patient]")) as image:
            assert image.text["Description"] == "sites: " + ", ".join(SITES)
    assert {plot_filename(r, "group[patient]") for r in regions} <= set(_links(out / "index.html"))
