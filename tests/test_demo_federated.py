"""``fednipype-demo --federated``: the whole federated demo once, as a user runs it.

Slow (a real consortium: TLS SuperLink, three SuperNodes, an exact and a dp run), so the demo
runs once for the module. Checked here: both pooled tables have ``fednipype-meta``'s columns
and the request's regions and terms, the exact estimates the demo prints are the file's, the
exact run equals statsmodels' OLS on the sites' raw rows and recovers the planted effects
(``tests/test_federate_e2e.py`` runs the other modes through ``fednipype-federate`` and the
node), its bad arguments are refused before anything starts, no Flower process is left, and
the wall time (printed) stays well under the 10 minutes the demo promises on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import (
    AGE,
    BUNDLED,
    BUNDLED_REGIONS,
    PLANTED,
    SITES,
    SLOPES,
    VOLUME,
    bundled_rows,
    intercept_contrasts,
    reference_fit,
    relative,
    scaled_site_vector,
)

from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import Grid
from fednipype.hub.pooling import RESULT_COLUMNS

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

REGIONS = {"L_P01", "L_P12", "L_P27", "R_P12", "R_P33"}
TERMS = {"intercept", "age", "group[patient]", "sex[M]"}
#: A printed row of the planted-effects table: region, term, planted, estimate, [lo, hi], inside.
ROW = re.compile(
    r"^\s*(\S+)\s+(age|group\[patient\]|sex\[M\])\s+(-?[\d.]+)\s+(-?[\d.]+)\s+"
    r"\[(-?[\d.]+), (-?[\d.]+)\]\s+(True|False)\s*$"
)


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIPYPE_NO_ET": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "fednipype.cli.demo", "--federated", *args],
        capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True,
    )  # fmt: skip


def flower_processes(marker: str) -> list[str]:
    """Live processes whose command line names ``marker`` (here: the demo's folder)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(cmdline)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--epsilon", "0"], "--epsilon"),
        (["--delta", "0.5"], "--delta"),
        (["--timeout", "5"], "--timeout"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, args, text):
    done = demo(str(BUNDLED), str(tmp_path / "out"), *args, timeout=50)
    assert done.returncode == 2, done.stderr
    assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def federated_demo(tmp_path_factory):
    """``fednipype-demo --federated`` run once for the module: its output folder, the
    finished process and its wall time (seconds)."""
    out = tmp_path_factory.mktemp("federated demo") / "demo out"
    tic = time.monotonic()
    done = demo(str(BUNDLED), str(out), timeout=620)
    wall = time.monotonic() - tic
    print(f"\nfednipype-demo --federated: {wall:.0f} s wall\n{done.stdout[-2500:]}")
    return out, done, wall


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_the_federated_demo_writes_both_tables_and_prints_the_exact_estimates(federated_demo):
    out, done, wall = federated_demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert wall < 600
    tables = {}
    for mode in ("exact", "dp"):
        folder = out / f"federated-{mode}"
        tables[mode] = pd.read_csv(folder / "pooled_results.tsv", sep="\t")
        assert list(tables[mode].columns) == list(RESULT_COLUMNS)
        assert set(tables[mode]["region"]) == REGIONS and set(tables[mode]["term"]) == TERMS
        assert (folder / "index.html").is_file() and (folder / "federation.json").is_file()
    assert (tables["dp"]["se"].to_numpy() > tables["exact"]["se"].to_numpy()).all()

    exact = tables["exact"].set_index(["region", "term"])
    printed = [m.groups() for line in done.stdout.splitlines() if (m := ROW.match(line))]
    assert len(printed) == len(REGIONS) * 3
    for region, term, _, estimate, lo, hi, _ in printed:
        row = exact.loc[(region, term)]
        assert float(estimate) == pytest.approx(row["estimate"], abs=0.006)
        assert float(lo) == pytest.approx(row["ci_low"], abs=0.06)
        assert float(hi) == pytest.approx(row["ci_high"], abs=0.06)
    assert flower_processes(str(out)) == []


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_the_exact_secure_sum_equals_statsmodels_and_recovers_planted_effects(federated_demo):
    """The demo's exact run (TLS SuperLink, node authentication, three SuperNodes, SecAgg+)
    against statsmodels OLS with one intercept per site on the pooled raw rows: the sites'
    feature tables the demo wrote, joined with their ``participants.tsv`` (pandas)."""
    root, done, _ = federated_demo
    assert done.returncode == 0, done.stderr[-3000:]
    features = {s: sorted((root / s / "derivatives").rglob("*_desc-regional_features.tsv"))
                for s in SITES}  # fmt: skip
    rows = pd.concat([bundled_rows(s, features[s]) for s in SITES], ignore_index=True)
    assert rows["age"].between(*AGE).all()
    assert rows[BUNDLED_REGIONS].stack().between(*VOLUME).all()
    out = root / "federated-exact"
    pooled = pd.read_csv(out / "pooled_results.tsv", sep="\t")
    assert list(pooled.columns) == list(RESULT_COLUMNS)
    assert set(pooled["method"]) == {"pooled_regression"}
    per_site = pd.read_csv(out / "site_estimates.tsv", sep="\t")

    worst = 0.0
    truth = {
        r["name"]: r for r in json.loads((BUNDLED / "ground_truth.json").read_text())["regions"]
    }
    inside = []
    for region in BUNDLED_REGIONS:
        fit = reference_fit(rows, region)
        got = pooled[pooled["region"] == region].set_index("term")
        for term in SLOPES:
            for ours, ref in (
                (got.loc[term, "estimate"], fit.params[term]),
                (got.loc[term, "se"], fit.bse[term]),
                (got.loc[term, "ci_low"], fit.conf_int().loc[term, 0]),
                (got.loc[term, "ci_high"], fit.conf_int().loc[term, 1]),
            ):
                worst = max(worst, relative(ours, ref))
            assert got.loc[term, "df"] == pytest.approx(fit.df_resid)
            planted = truth[region][PLANTED[term]]
            inside.append(got.loc[term, "ci_low"] <= planted <= got.loc[term, "ci_high"])
        contrasts = intercept_contrasts(rows)
        pooled_ref = fit.t_test(contrasts["pooled"])
        worst = max(worst, relative(got.loc["intercept", "estimate"], pooled_ref.effect[0]))
        worst = max(worst, relative(got.loc["intercept", "se"], pooled_ref.sd[0, 0]))
        mine = per_site[per_site["region"] == region].set_index("site")
        for site in SITES:
            ref = fit.t_test(contrasts[site])
            worst = max(worst, relative(mine.loc[site, "estimate"], ref.effect[0]))
            worst = max(worst, relative(mine.loc[site, "se"], ref.sd[0, 0]))
            assert mine.loc[site, "n"] == (rows["site"] == site).sum()
    record = json.loads((out / "federation.json").read_text())
    print(
        f"\nexact vs statsmodels: max relative difference {worst:.2e}; "
        f"{sum(inside)}/{len(inside)} planted effects in the 95% CIs; "
        f"flwr run {record['timings_s']['flwr_run']:.1f} s"
    )
    assert worst <= 1e-6
    # every planted age, patient and male effect of the 5 regions lies inside its 95% CI
    assert all(inside), inside

    # the hub held one aggregate, never a site's vector; the sum is the sites' exact sum
    secure = json.loads((out / "secure_sum.json").read_text())
    assert secure["status"] == "completed"
    assert secure["aggregate_fit"] == {"results": 3, "distinct_parameters": 1, "failures": []}
    request = AnalysisRequest.from_file(root / "requests" / "demo-exact.json")
    grid = Grid.for_request(request)
    vectors = [scaled_site_vector(request, rows[rows["site"] == s]) for s in SITES]
    expected = np.sum([np.rint(v / grid.step) for v in vectors], axis=0)
    assert np.max(np.abs(np.asarray(secure["sum"], dtype=float) - expected)) <= len(SITES)
    assert record["contributors"] == list(SITES) and record["not_contributing"] == []
    assert record["request_hash"] == request.content_hash and record["mode"] == "exact"
    assert record["timings_s"]["flwr_run"] > 0 and record["run_id"] is not None
    html = (out / "index.html").read_text()
    assert all(f"forest_{r}_intercept.png" in html for r in BUNDLED_REGIONS)
    assert all((out / f"forest_{r}_intercept.png").is_file() for r in BUNDLED_REGIONS)
