"""``fednipype-demo --federated``: the whole federated demo once, as a user runs it.

Slow (a real consortium: TLS SuperLink, three SuperNodes, an exact and a dp run). Checked
here: both pooled tables have ``fednipype-meta``'s columns and the request's regions and
terms, the exact estimates the demo prints are the file's, its bad arguments are refused
before anything starts, no Flower process is left, and the wall time (printed) stays well
under the 10 minutes the demo promises on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from support import BUNDLED

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


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_the_federated_demo_writes_both_tables_and_prints_the_exact_estimates(tmp_path):
    out = tmp_path / "demo out"
    tic = time.monotonic()
    done = demo(str(BUNDLED), str(out), timeout=620)
    wall = time.monotonic() - tic
    print(f"\nfednipype-demo --federated: {wall:.0f} s wall\n{done.stdout[-2500:]}")
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
