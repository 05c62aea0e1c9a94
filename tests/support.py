"""Helpers shared by the tests: repository paths, the community's bids-examples, a
simulated consortium whose releases have independent references (numpy and statsmodels), and
the bundled sites' raw rows with their statsmodels references.

Fixtures built from these live in ``conftest.py``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
from dp_accounting import gaussian_mechanism

from fednipype.contract.document import content_hash, new_release, write_release
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import SumLayout
from fednipype.contract.statistics import SufficientStatistics
from fednipype.hub.releases import SiteRelease
from fednipype.site.release import SESSIONS

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "bids_examples"
SITES = ("siteA", "siteB", "siteC")


def _find_bids_examples() -> Path | None:
    """The BIDS community's ``bids-examples`` layouts: ``$BIDS_EXAMPLES_DIR`` or a copy near
    the repository (its parent folder or one of that folder's sub-folders)."""
    env = os.environ.get("BIDS_EXAMPLES_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    parent = REPO.parent
    candidates = [parent / "bids-examples"] + sorted(parent.glob("*/bids-examples"))
    return next((c for c in candidates if c.is_dir()), None)


BIDS_EXAMPLES = _find_bids_examples()
COMMUNITY_DATASETS = (
    sorted(p.name for p in BIDS_EXAMPLES.iterdir() if (p / "dataset_description.json").is_file())
    if BIDS_EXAMPLES
    else []
)


# -- a simulated consortium (release documents with known raw rows) ---------------------------

REGIONS = ("L_P01", "R_P01", "L_P12")
TERMS = ("intercept", "age", "sex[M]", "group[patient]")
COVARIATES = TERMS[1:]
#: Public scaling (from bounds age [10, 90], sex dummy [0, 1], volumes [2000, 10000]).
BOUNDS = {"age": (10.0, 90.0), **dict.fromkeys(REGIONS, (2000.0, 10000.0))}
SCALING = {
    "age": {"center": 50.0, "scale": 40.0},
    "sex[M]": {"center": 0.5, "scale": 0.5},
    "group[patient]": {"center": 0.5, "scale": 0.5},
    **{region: {"center": 6000.0, "scale": 4000.0} for region in REGIONS},
}
#: Planted effects per region: baseline at age 50, age slope, male, patient.
EFFECTS = {
    "L_P01": (6900.0, -17.0, 207.0, 0.0),
    "R_P01": (6700.0, -15.0, 200.0, 0.0),
    "L_P12": (7960.0, -23.7, 239.0, -637.0),
}
SITE_DESIGN = {
    # site: (n, age range, offset, residual sd)
    "siteA": (40, (20.0, 45.0), 0.0, 140.0),
    "siteB": (55, (45.0, 80.0), 140.0, 160.0),
    "siteC": (70, (25.0, 85.0), -200.0, 150.0),
}


def simulate_site(site: str, seed: int = 7, *, patients: bool = True) -> pd.DataFrame:
    """Raw rows of one site: covariates in original units and one volume per region."""
    n, (lo, hi), offset, sd = SITE_DESIGN[site]
    rng = np.random.default_rng([seed, sorted(SITE_DESIGN).index(site)])
    rows = pd.DataFrame(
        {
            "age": rng.uniform(lo, hi, n),
            "sex[M]": (rng.random(n) < 0.5).astype(float),
            "group[patient]": (np.arange(n) % 2 == 0).astype(float) if patients else 0.0,
        }
    )
    for region, (base, age, male, patient) in EFFECTS.items():
        rows[region] = (
            base
            + age * (rows["age"] - 50.0)
            + male * rows["sex[M]"]
            + patient * rows["group[patient]"]
            + offset
            + rng.normal(0.0, sd, n)
        )
    return rows


def scaled_statistics(rows: pd.DataFrame) -> dict:
    """ZᵀZ, Zᵀy, yᵀy, n of the rows in the released (scaled) units, computed with numpy."""
    z = np.column_stack(
        [np.ones(len(rows))]
        + [(rows[t] - SCALING[t]["center"]) / SCALING[t]["scale"] for t in COVARIATES]
    )
    y = np.column_stack([(rows[r] - SCALING[r]["center"]) / SCALING[r]["scale"] for r in REGIONS])
    return {"ztz": z.T @ z, "zty": z.T @ y, "yty": (y * y).sum(axis=0), "n": float(len(rows))}


def release_doc(
    site: str,
    rows: pd.DataFrame,
    *,
    epsilon: float = 1e6,
    delta: float = 1e-5,
    seed: int = 0,
    exact: bool = False,
) -> dict:
    """A release of ``rows`` as a site would write it at (ε, δ), with simulated noise.

    σ comes from dp-accounting's analytic calibration for the L2 sensitivity of the
    statistics on the [-1, 1] scale (not from fednipype), and seeded numpy noise of that sd is
    added to every released entry. ``exact=True`` adds none and declares none (noise
    variances 0): such a document is for in-memory pooling maths only (:func:`exact_release`);
    the release contract refuses it as a file, since its noise does not match its ε.
    """
    stats = scaled_statistics(rows)
    p, r = len(TERMS), len(REGIONS)
    sensitivity = math.sqrt(1 + p * (p + 1) / 2 + p * r + r)
    sigma = gaussian_mechanism.get_sigma_gaussian(epsilon, delta) * sensitivity
    if not exact:
        rng = np.random.default_rng(seed)
        upper = np.triu(rng.normal(0.0, sigma, (p, p)))
        stats["ztz"] = stats["ztz"] + upper + np.triu(upper, 1).T
        stats["zty"] = stats["zty"] + rng.normal(0.0, sigma, (p, r))
        stats["yty"] = stats["yty"] + rng.normal(0.0, sigma, r)
        stats["n"] = stats["n"] + rng.normal(0.0, sigma)
    var = 0.0 if exact else sigma**2
    mechanism = {
        "mechanism": "gaussian",
        "calibration": "analytic Gaussian (Balle and Wang 2018)",
        "epsilon": epsilon,
        "delta": delta,
        "sensitivity": sensitivity,
        "sensitivity_norm": "l2",
        "scale": sigma,
        "noise_variance": sigma**2,
    }
    doc = new_release(
        dataset=f"example {site}",
        site=site,
        atlas={
            "name": "fednipype",
            "space": "MNI152NLin2009cAsym",
            "sha256": "a" * 64,
            "regions": list(REGIONS),
        },
        feature="volume_mm3",
        model={
            "response": "volume_mm3",
            "terms": list(TERMS),
            "reference_levels": {"sex": "F", "group": "control"},
            "sessions": SESSIONS,
        },
        privacy={
            "epsilon": epsilon,
            "delta": delta,
            "min_cohort": 10,
            "budget_split": {"sufficient_statistics": {"epsilon": epsilon, "delta": delta}},
            "bounds": {name: list(b) for name, b in BOUNDS.items()},
            "max_participants": 1000,
            "ledger_id": hashlib.md5(site.encode()).hexdigest(),
            "ledger_charge": 1,
        },
        statistics={
            "sufficient_statistics": {
                **mechanism,
                "terms": list(TERMS),
                "regions": list(REGIONS),
                "ztz": stats["ztz"].tolist(),
                "zty": stats["zty"].tolist(),
                "yty": stats["yty"].tolist(),
                "n": float(stats["n"]),
                "n_terms": [],
                "noise_variances": {"n": var, "ztz": var, "zty": var, "yty": var},
                "scaling": copy.deepcopy(SCALING),
            }
        },
    )
    return copy.deepcopy(doc)


def exact_release(site: str, rows: pd.DataFrame) -> SiteRelease:
    """A noise-free release held in memory: the pooling maths against exact references."""
    doc = release_doc(site, rows, exact=True)
    return SiteRelease(path=Path(f"{site}_release.json"), doc=doc, content_hash=content_hash(doc))


def exact_releases(raw: dict[str, pd.DataFrame]) -> list[SiteRelease]:
    """:func:`exact_release` of every site of ``raw``, in order."""
    return [exact_release(site, rows) for site, rows in raw.items()]


def write_sites(
    folder: Path, sites=tuple(SITE_DESIGN), *, seed: int = 7, epsilon: float = 1e6, **kwargs
) -> tuple[list[Path], dict[str, pd.DataFrame]]:
    """Simulate the sites, write one release file each (noise at ``epsilon``); return the
    paths and the raw rows."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, raw = [], {}
    for i, site in enumerate(sites):
        raw[site] = simulate_site(site, seed, **kwargs)
        doc = release_doc(site, raw[site], epsilon=epsilon, seed=seed * 100 + i)
        paths.append(write_release(doc, folder / f"{site}_release.json"))
    return paths, raw


#: The sites and regions of the federated test requests.
REQUEST_SITES = ["siteA", "siteB", "siteC"]
REQUEST_REGIONS = ["L_P01", "R_P01", "L_P12"]


def request_document(**changes) -> dict:
    """A valid request document (fednipype-request/1.0); ``changes`` replace top-level keys."""
    doc = {
        "schema": "fednipype-request/1.0",
        "request_id": "age-gm-test",
        "sites": list(REQUEST_SITES),
        "model": {
            "response": "volume_mm3",
            "numeric": ["age"],
            "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]},
        },
        "regions": list(REQUEST_REGIONS),
        "bounds": {"covariates": {"age": [10, 90]}, "regions": {"default": [2000, 10000]}},
        "mode": "dp",
        "epsilon": 1.0,
        "delta": 1e-5,
        "max_dropouts": 0,
        "min_sites": 2,
        "max_participants": 1000,
    }
    doc.update(copy.deepcopy(changes))
    return doc


def make_request(**changes) -> AnalysisRequest:
    return AnalysisRequest.from_document(request_document(**changes), source="request.json")


# -- processes, looked up in /proc by the tests themselves (not through the module under test) --


def live_processes(ports: list[int], workdir: Path | None = None) -> dict[int, str]:
    """Live processes whose command line names 127.0.0.1:<one of ports> or ``workdir``."""
    alternatives = "|".join(map(str, ports))
    port_re = re.compile(rf"127\.0\.0\.1:({alternatives})(?!\d)")
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        named = workdir is not None and str(workdir) in cmdline
        if state != "Z" and (named or port_re.search(cmdline)):
            found[int(name)] = cmdline
    return found


def wait_none_left(
    ports: list[int], workdir: Path | None = None, seconds: float = 10.0
) -> dict[int, str]:
    """:func:`live_processes` once none is left, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := live_processes(ports, workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# -- the bundled sites: their rows, and references computed without fednipype's pooling ------

#: The pre-registered regions and slopes of the bundled sites' federated requests (the demo's
#: and the deployment tests'), the example policy's public bounds, and the planted effects'
#: keys in ``bids_examples/ground_truth.json``.
BUNDLED_REGIONS = ["L_P01", "L_P12", "L_P27", "R_P12", "R_P33"]
SLOPES = ["age", "group[patient]", "sex[M]"]
AGE, VOLUME = (18.0, 90.0), (0.0, 12000.0)
PLANTED = {"age": "age_slope_mm3_per_year", "group[patient]": "patient_mm3", "sex[M]": "male_mm3"}


def bundled_rows(site: str, features: list[Path]) -> pd.DataFrame:
    """A site's rows as the model sees them: first session of each participant with a
    complete participants.tsv row; covariates in original units, 0/1 dummies, volumes."""
    rows = []
    for path in features:
        parts = dict(p.split("-", 1) for p in path.name.split("_") if "-" in p)
        table = pd.read_csv(path, sep="\t").set_index("name")["volume_mm3"]
        rows.append({"participant_id": f"sub-{parts['sub']}", "ses": parts.get("ses", ""),
                     **table[BUNDLED_REGIONS].to_dict()})  # fmt: skip
    frame = pd.DataFrame(rows).sort_values(["participant_id", "ses"])
    frame = frame.groupby("participant_id", sort=True).head(1)
    people = pd.read_csv(BUNDLED / site / "participants.tsv", sep="\t", na_values=["n/a"])
    frame = frame.merge(people, on="participant_id", how="inner").dropna(
        subset=["age", "sex", "group"]
    )
    return pd.DataFrame(
        {
            "site": site,
            "age": frame["age"].astype(float),
            "group[patient]": (frame["group"] == "patient").astype(float),
            "sex[M]": (frame["sex"] == "M").astype(float),
            **{r: frame[r].astype(float) for r in BUNDLED_REGIONS},
        }
    ).reset_index(drop=True)


def reference_fit(rows: pd.DataFrame, region: str):
    """statsmodels OLS of the region on site intercepts and the covariates (original units)."""
    x = pd.concat([pd.get_dummies(rows["site"], dtype=float)[list(SITES)], rows[SLOPES]], axis=1)
    return sm.OLS(rows[region], x).fit()


def intercept_contrasts(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Contrasts of the fednipype intercepts: each site's intercept at the covariate centers
    (age at the middle of its public bounds, dummies at 1/2) and their n-weighted mean."""
    centers = np.array([(AGE[0] + AGE[1]) / 2, 0.5, 0.5])
    out = {}
    counts = rows["site"].value_counts()
    for k, site in enumerate(SITES):
        c = np.zeros(len(SITES) + 3)
        c[k], c[len(SITES) :] = 1.0, centers
        out[site] = c
    weights = np.array([counts[s] for s in SITES], dtype=float)
    out["pooled"] = np.concatenate([weights / weights.sum(), centers])
    return out


def scaled_site_vector(request: AnalysisRequest, rows: pd.DataFrame) -> np.ndarray:
    """One site's exact float vector (scaled units), with numpy."""
    columns = {
        "intercept": np.ones(len(rows)),
        "age": (rows["age"].to_numpy() - 54.0) / 36.0,
        "group[patient]": 2.0 * rows["group[patient]"].to_numpy() - 1.0,
        "sex[M]": 2.0 * rows["sex[M]"].to_numpy() - 1.0,
    }
    z = np.column_stack([columns[t] for t in request.terms])
    y = (rows[BUNDLED_REGIONS].to_numpy() - 6000.0) / 6000.0
    stats = SufficientStatistics(
        terms=request.terms, regions=tuple(BUNDLED_REGIONS), ztz=z.T @ z, zty=z.T @ y,
        yty=(y**2).sum(axis=0), n=float(len(rows)), n_terms=request.n_terms,
    )  # fmt: skip
    site = rows["site"].iloc[0]
    return SumLayout.from_request(request).site_vector(stats, request.slot(site))


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
