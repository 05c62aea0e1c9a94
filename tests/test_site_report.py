"""The site report: real participant outputs, policy, ledger and release; checked with an HTML5
parser against independent computations, and loaded in a real headless browser (chromium)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import html5lib
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageStat
from scipy import optimize, stats
from support import BUNDLED

from fednipype.cli.participant import Failure
from fednipype.site.policy import example_policy
from fednipype.site.release import make_release
from fednipype.site.report import FIGURES_DIR, REPORT_NAME, write_site_report

SITE = "siteC"
#: The scan made an outlier on purpose (its regional volumes scaled by OUTLIER_FACTOR).
OUTLIER, OUTLIER_FACTOR = "07", 0.6
HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)> "quoted" \'single\''
PLAN = {"age": 12.5, "group[patient]": 210.0}
#: A large ε: the release is withheld when a noisy cell count falls below the minimum cohort
#: (10); siteC's smallest cell has 21 participants and at ε = 150 the counts' noise SD is ~1.2,
#: so that never happens here. This test is about the report, not about utility.
TOTAL_EPSILON, RELEASE_EPSILON = 200.0, 150.0
POLICY_DELTA = 1e-4
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_TIMEOUT_S = 60.0


# -- building a real site output --------------------------------------------------------------


def _init_ledger(policy: Path) -> None:
    """Create the policy's ledger as a data owner does: ``fednipype-budget init``."""
    done = subprocess.run(
        [sys.executable, "-m", "fednipype.cli.budget", "init", "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _policy(folder: Path, *, total_epsilon: float = 10.0, init: bool = True) -> Path:
    """The example sites' policy (as conftest's ``site_policy`` writes it), its ledger created
    by ``fednipype-budget init`` unless ``init`` is false."""
    folder.mkdir(parents=True)
    policy = folder / "policy.toml"
    policy.write_text(
        example_policy(dataset=SITE, total_epsilon=total_epsilon, total_delta=POLICY_DELTA),
        encoding="utf-8",
    )
    if init:
        _init_ledger(policy)
    return policy


def _feature_tables(folder: Path) -> list[Path]:
    return sorted(folder.glob("sub-*/**/*_desc-regional_features.tsv"))


@dataclass
class Site:
    output_dir: Path
    policy: Path
    release: Path
    html: Path


@pytest.fixture(scope="module")
def site(bundled_derivatives, tmp_path_factory) -> Site:
    """siteC's participant output (one scan made an outlier), a policy with an initialised
    ledger, one real release, and the report written over them; built once for the module."""
    tmp_path = tmp_path_factory.mktemp("site-report")
    output_dir = tmp_path / "out"
    shutil.copytree(bundled_derivatives[SITE], output_dir)
    tables = _feature_tables(output_dir)
    outlier = next(t for t in tables if t.name.startswith(f"sub-{OUTLIER}_"))
    table = pd.read_csv(outlier, sep="\t", na_values=["n/a"], keep_default_na=False)
    table["volume_mm3"] *= OUTLIER_FACTOR
    table.to_csv(outlier, sep="\t", index=False, na_rep="n/a")

    policy = _policy(tmp_path / "policy", total_epsilon=TOTAL_EPSILON)
    release = make_release(
        features=_feature_tables(bundled_derivatives[SITE]),
        participants=BUNDLED / SITE,
        policy=policy,
        epsilon=RELEASE_EPSILON,
        delta=1e-5,
        site=SITE,
        out_path=tmp_path / "releases" / f"{SITE}_release.json",
    )
    failures = [
        {"subject": "sub-99", "session": "1", "error": HOSTILE},
        Failure("98", None, "in.nii.gz", "regional_features", "ImageError: truncated file"),
    ]
    html = write_site_report(
        output_dir,
        bids_dir=BUNDLED / SITE,
        policy=policy,
        releases=[release],
        failures=failures,
        plan=PLAN,
    )
    return Site(output_dir=output_dir, policy=policy, release=release, html=html)


# -- reading the page -------------------------------------------------------------------------


def _parse(path: Path):
    """The page's element tree; html5lib's strict mode raises on any HTML5 parse error."""
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    return parser.parse(path.read_bytes())


def _text(element) -> str:
    return "".join(element.itertext()).strip()


def _value(tree, key: str) -> str:
    cells = [td for td in tree.iter("td") if td.get("data-key") == key]
    assert len(cells) == 1, f"{key}: {len(cells)} cells"
    return _text(cells[0])


def _section(tree, ident: str):
    return next(s for s in tree.iter("section") if s.get("id") == ident)


def _rows(table) -> list[list[str]]:
    return [[_text(c) for c in tr if c.tag == "td"] for tr in table.iter("tr")][1:]


def _theil_sen_robust_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The documented rule, written out: median pairwise slope, residuals, MAD z-scores."""
    i, j = np.triu_indices(len(x), k=1)
    keep = x[i] != x[j]
    slope = np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep])
    residual = y - slope * x
    centre = np.median(residual)
    return (residual - centre) / (1.4826 * np.median(np.abs(residual - centre)))


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of one Gaussian mechanism with sensitivity/σ = ``mu`` at ``delta``: the exact
    privacy profile δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ) (Balle and Wang 2018), solved."""

    def excess(eps: float) -> float:
        tail = math.exp(stats.norm.logcdf(-mu / 2 - eps / mu) + eps)
        return stats.norm.cdf(mu / 2 - eps / mu) - tail - delta

    return optimize.brentq(excess, 1e-9, 1e3, xtol=1e-12)


# -- the page's content -----------------------------------------------------------------------


def test_report_content_matches_independent_computations(site):
    assert site.html == site.output_dir / REPORT_NAME
    tree = _parse(site.html)
    raw = site.html.read_text(encoding="utf-8")

    # Subjects processed: the feature tables on disk; failures as given.
    tables = _feature_tables(site.output_dir)
    assert _value(tree, "processed-tables") == str(len(tables)) == "45"
    assert _value(tree, "processed-subjects") == "45"
    assert _value(tree, "failed-items") == "2"
    failed = [
        _rows(t) for t in _section(tree, "subjects").iter("table") if t.get("class") is None
    ][-1]
    assert failed == [
        ["sub-99 ses-1", "", HOSTILE],
        ["sub-98", "regional_features", "ImageError: truncated file"],
    ]
    # The hostile error is shown as text, never as markup.
    assert "<script" not in raw and "<img src=x" not in raw
    assert [s for s in tree.iter("script")] == []

    # Feature QC: totals from pandas, ages from participants.tsv, the rule written out.
    participants = pd.read_csv(BUNDLED / SITE / "participants.tsv", sep="\t", na_values=["n/a"])
    ages = dict(zip(participants["participant_id"], participants["age"], strict=True))
    expected = pd.DataFrame(
        {
            "scan": [t.name.split("_")[0] for t in tables],
            "total": [
                pd.read_csv(t, sep="\t", na_values=["n/a"])["volume_mm3"].sum() for t in tables
            ],
        }
    )
    expected["age"] = expected["scan"].map(ages)
    scored = expected["age"].notna()
    expected.loc[scored, "z"] = _theil_sen_robust_z(
        expected.loc[scored, "age"].to_numpy(), expected.loc[scored, "total"].to_numpy()
    )
    qc_table = next(t for t in tree.iter("table") if t.get("class") == "qc")
    shown = pd.DataFrame(_rows(qc_table), columns=["scan", "age", "total", "z", "flag"])
    assert shown["scan"].tolist() == expected["scan"].tolist()
    for row, want in zip(shown.itertuples(), expected.itertuples(), strict=True):
        assert math.isclose(float(row.total), want.total, rel_tol=1e-5), row.scan
        if math.isnan(want.age):
            assert row.age == row.z == "n/a" and row.flag == ""
            continue
        assert float(row.age) == want.age
        assert abs(float(row.z) - want.z) < 0.006, row.scan
        assert (row.flag == "outlier") == (abs(want.z) > 3.5), row.scan
    assert shown.loc[shown["flag"] == "outlier", "scan"].tolist() == [f"sub-{OUTLIER}"]
    assert int(scored.sum()) == 44  # siteC: one participant's age is n/a

    # The release: parameters as in the file, its content hash computed here.
    doc = json.loads(site.release.read_text(encoding="utf-8"))
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    sha = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert _value(tree, "content-sha256") == sha
    assert float(_value(tree, "epsilon")) == doc["privacy"]["epsilon"] == RELEASE_EPSILON
    assert float(_value(tree, "delta")) == doc["privacy"]["delta"] == 1e-5
    assert _value(tree, "site") == SITE
    assert "age: [18, 90]" in _value(tree, "bounds")
    stats_rows = {
        tr.get("data-statistic"): [_text(td) for td in tr.iter("td")]
        for tr in tree.iter("tr")
        if tr.get("data-statistic")
    }
    assert set(stats_rows) == set(doc["statistics"])
    for name, stat in doc["statistics"].items():
        _, mechanism, eps, dlt, sensitivity, sigma, released = stats_rows[name]
        assert mechanism == stat["mechanism"] == "gaussian"
        assert math.isclose(float(eps), stat["epsilon"], rel_tol=1e-5)
        assert math.isclose(float(dlt), stat["delta"], rel_tol=1e-5)
        assert math.isclose(float(sensitivity.split()[0]), stat["sensitivity"], rel_tol=1e-5)
        assert math.isclose(float(sigma), stat["scale"], rel_tol=1e-5)
        if name == "sufficient_statistics":
            noisy_n = float(released.split("=")[1].split(";")[0])
            assert math.isclose(noisy_n, stat["n"], rel_tol=1e-5)

    # The budget: one Gaussian release, whose exact ε at the policy's δ is at most its own.
    assert float(_value(tree, "total-epsilon")) == TOTAL_EPSILON
    (stat,) = doc["statistics"].values()
    spent = _gaussian_epsilon(stat["sensitivity"] / stat["scale"], POLICY_DELTA)
    assert spent <= RELEASE_EPSILON
    assert float(_value(tree, "spent-epsilon")) == pytest.approx(spent, rel=1e-3)
    remaining = TOTAL_EPSILON - float(_value(tree, "spent-epsilon"))
    assert float(_value(tree, "remaining-epsilon")) == pytest.approx(remaining, rel=1e-5)
    assert _value(tree, "charges") == "1"
    audit = next(t for t in tree.iter("table") if t.get("class") == "audit")
    (row,) = _rows(audit)
    assert int(row[0]) == doc["privacy"]["ledger_charge"] and row[5] == sha[:16]

    # The plan, as given.
    plan_table = next(t for t in tree.iter("table") if t.get("class") == "plan")
    assert {term: float(se) for term, se in _rows(plan_table)} == PLAN

    # Self-contained: no script, every link an anchor or a relative file that exists.
    ids = [e.get("id") for e in tree.iter() if e.get("id")]
    assert len(ids) == len(set(ids))
    images = [img.get("src") for img in tree.iter("img")]
    assert images == [
        f"{FIGURES_DIR}/fednipype_report_qc_1.png",
        f"{FIGURES_DIR}/fednipype_report_budget.png",
    ]
    for element in tree.iter():
        for attribute in ("src", "href"):
            link = element.get(attribute)
            if link is None or link.startswith("#"):
                continue
            assert ":" not in link and not link.startswith("/"), link
            assert (site.output_dir / link).is_file(), link
    assert not [p for p in site.output_dir.rglob(".*.tmp")]


# -- when parts are missing or broken ---------------------------------------------------------


def test_missing_or_broken_ledger_and_release_are_shown_not_raised(bundled_derivatives, tmp_path):
    output_dir = bundled_derivatives[SITE]
    out = tmp_path / "report"
    shutil.copytree(output_dir, out)

    # A policy whose ledger was never initialised: a message, and no ledger is created.
    policy = _policy(tmp_path / "uninitialised", init=False)
    page = write_site_report(out, bids_dir=BUNDLED / SITE, policy=policy)
    assert not (tmp_path / "uninitialised" / "ledger.sqlite").exists()
    ledger_error = _text(next(p for p in _parse(page).iter("p") if p.get("id") == "ledger-error"))
    assert "ledger" in ledger_error and "fednipype-budget init" in ledger_error
    assert not (out / FIGURES_DIR / "fednipype_report_budget.png").exists()

    # A ledger file that is not a ledger: the ledger's own error text, escaped.
    policy = _policy(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "ledger.sqlite").write_bytes(b"<not a ledger> " * 100)
    for extra in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
        (tmp_path / "corrupt" / extra).unlink(missing_ok=True)
    page = write_site_report(out, bids_dir=BUNDLED / SITE, policy=policy)
    ledger_error = _text(next(p for p in _parse(page).iter("p") if p.get("id") == "ledger-error"))
    assert "ledger.sqlite" in ledger_error

    # An unreadable policy, a release that is not a release, no participants.tsv.
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("[budget\n", encoding="utf-8")
    bad_release = tmp_path / "x_release.json"
    bad_release.write_text('{"kind": "<b>nope</b>"}', encoding="utf-8")
    no_phenotypes = tmp_path / "bids"
    no_phenotypes.mkdir()
    page = write_site_report(
        out, bids_dir=no_phenotypes, policy=bad_policy, releases=[bad_release]
    )
    tree = _parse(page)
    errors = [_text(p) for p in tree.iter("p") if p.get("class") == "error"]
    assert any("bad.toml" in e for e in errors)
    assert any("x_release.json" in e for e in errors)
    assert any("participants.tsv" in e for e in errors)
    assert "<b>nope" not in page.read_text(encoding="utf-8")
    # No ages: no scan is scored, none is flagged, the scans are still counted.
    assert _value(tree, "processed-tables") == "45"
    assert "outlier" not in [
        r[-1] for r in _rows(next(t for t in tree.iter("table") if t.get("class") == "qc"))
    ]


def test_empty_output_folder_gives_a_page(tmp_path):
    page = write_site_report(tmp_path / "empty", bids_dir=BUNDLED / SITE)
    tree = _parse(page)
    assert _value(tree, "processed-tables") == "0"
    assert list(tree.iter("img")) == []
    assert "planner's prediction appears here when a plan is given" in _text(
        _section(tree, "plan")
    )


# -- a real browser ---------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package)")


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A process in its own group, killed with its children however the block ends."""
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, url: str) -> None:
        import websocket  # websocket-client, a test extra

        self.ws = websocket.create_connection(url, timeout=BROWSER_TIMEOUT_S, suppress_origin=True)
        self.events: list[dict] = []
        self._next = 0

    def call(self, method: str, **params) -> dict:
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._next:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> None:
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {BROWSER_TIMEOUT_S} s"
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _load_in_browser(page: Path, tmp_path: Path) -> tuple[list[dict], list[str]]:
    """Open ``page`` in headless chromium; return its images and every error it reported."""
    profile = tmp_path / "chromium-profile"
    args = [
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    deadline = time.monotonic() + BROWSER_TIMEOUT_S
    with _process(args, tmp_path / "chromium.log") as proc:
        port_file = profile / "DevToolsActivePort"
        while not port_file.is_file() or not port_file.read_text().strip():
            assert proc.poll() is None, (tmp_path / "chromium.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(target["webSocketDebuggerUrl"])
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.call(f"{domain}.enable")
            tools.call("Page.navigate", url=page.as_uri())
            tools.wait_for("Page.loadEventFired", deadline)
            images = tools.call(
                "Runtime.evaluate",
                expression="JSON.stringify(Array.from(document.images).map(i => ({src: "
                "i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})))",
                returnByValue=True,
            )["result"]["value"]
            title = tools.call("Runtime.evaluate", expression="document.title")["result"]
        finally:
            tools.close()
    errors = []
    for event in tools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(json.dumps(params["args"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
        elif method == "Network.loadingFailed":
            errors.append(f"loading failed: {params.get('errorText')}")
    assert title["value"].startswith("fednipype site report")
    return json.loads(images), errors


def test_report_loads_in_chromium_without_errors_and_is_screenshot(site, tmp_path):
    images, errors = _load_in_browser(site.html, tmp_path)
    assert errors == []
    assert len(images) == 2
    assert all(i["complete"] and i["width"] > 0 for i in images), images

    screenshot = tmp_path / "site_report.png"
    args = [
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'screenshot-profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,1600",
        "--hide-scrollbars",
        site.html.as_uri(),
    ]
    with _process(args, tmp_path / "screenshot.log") as proc:
        proc.wait(timeout=BROWSER_TIMEOUT_S)
    assert screenshot.is_file(), (tmp_path / "screenshot.log").read_text()[-2000:]
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 1600)
        grey = shot.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 10.0  # not one flat colour
        dark = sum(grey.histogram()[:128])
        assert dark > 0.005 * 1200 * 1600  # text and figures, not a blank page
    if os.environ.get("FEDNIPYPE_KEEP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["FEDNIPYPE_KEEP_SCREENSHOT"])


def test_browser_check_sees_a_broken_image(site, tmp_path):
    """The check above can fail: with a figure removed, chromium reports it."""
    copy = tmp_path / "copy"
    shutil.copytree(site.output_dir, copy)
    (copy / FIGURES_DIR / "fednipype_report_budget.png").unlink()
    images, errors = _load_in_browser(copy / REPORT_NAME, tmp_path)
    broken = [i for i in images if i["width"] == 0]
    assert [i["src"] for i in broken] == [f"{FIGURES_DIR}/fednipype_report_budget.png"]
    assert errors  # the failed load is reported
