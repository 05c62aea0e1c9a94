"""Helpers shared by the tests: repository paths, the community's bids-examples, and a
simulated consortium whose releases have independent references (numpy and statsmodels).

Fixtures built from these live in ``conftest.py``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pandas as pd

from fednipype.contract.document import new_release, write_release
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
SCALING = {
    "age": {"center": 50.0, "scale": 40.0},
    "sex[M]": {"center": 0.5, "scale": 0.5},
    "group[patient]": {"center": 0.0, "scale": 1.0},
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
    noise_sd: float = 0.0,
    seed: int = 0,
    epsilon: float = 1.0,
    delta: float = 1e-5,
) -> dict:
    """A schema-valid release of ``rows``; DP-like Gaussian noise of sd ``noise_sd`` if > 0.

    The schema requires the mechanism's nominal ``scale``/``noise_variance`` to be > 0; a
    noise-free document declares nominal values there and zero ``noise_variances``, which is
    what the coordinator uses.
    """
    stats = scaled_statistics(rows)
    p, r = len(TERMS), len(REGIONS)
    if noise_sd > 0.0:
        rng = np.random.default_rng(seed)
        upper = np.triu(rng.normal(0.0, noise_sd, (p, p)))
        stats["ztz"] = stats["ztz"] + upper + np.triu(upper, 1).T
        stats["zty"] = stats["zty"] + rng.normal(0.0, noise_sd, (p, r))
        stats["yty"] = stats["yty"] + rng.normal(0.0, noise_sd, r)
        stats["n"] = stats["n"] + rng.normal(0.0, noise_sd)
    var = noise_sd**2
    mechanism = {
        "mechanism": "gaussian",
        "calibration": "analytic Gaussian (Balle and Wang 2018)",
        "epsilon": epsilon,
        "delta": delta,
        "sensitivity": 3.0,
        "sensitivity_norm": "l2",
        "scale": noise_sd if noise_sd > 0 else 1.0,
        "noise_variance": var if var > 0 else 1.0,
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
            "bounds": {"age": [10.0, 90.0], "volume_mm3": [2000.0, 10000.0]},
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
                "noise_variances": {"n": var, "ztz": var, "zty": var, "yty": var},
                "scaling": copy.deepcopy(SCALING),
            }
        },
    )
    return copy.deepcopy(doc)


def write_sites(
    folder: Path, sites=tuple(SITE_DESIGN), *, seed: int = 7, noise_sd: float = 0.0, **kwargs
) -> tuple[list[Path], dict[str, pd.DataFrame]]:
    """Simulate the sites, write one release file each; return the paths and the raw rows."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, raw = [], {}
    for i, site in enumerate(sites):
        raw[site] = simulate_site(site, seed, **kwargs)
        doc = release_doc(site, raw[site], noise_sd=noise_sd, seed=seed * 100 + i)
        paths.append(write_release(doc, folder / f"{site}_release.json"))
    return paths, raw
