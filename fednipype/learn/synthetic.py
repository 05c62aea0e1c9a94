"""A deterministic synthetic federation at the feature level, from the bundled planted effects.

The bundled example sites are too small (24–45 participants) for DP training to be useful;
this federation has the sizes where it can be (10 sites × 200–500 participants) and the same
generative model as ``bids_examples/generate.py`` at the level of regional volumes
(``planted_effects.json``, copied from the bundled ``ground_truth.json``):

``volume_ir = baseline_r + age_slope_r (age_i − 50) + patient_r [patient_i] + male_r [male_i]
+ offset_s baseline_r + u_ir``, ``u_ir ~ N(0, (sd_subject_fraction · baseline_r)²)``.

Each site draws its size, its age range (18–90 years, at least 20 years wide), its share of
patients (30–50 %) and its offset fraction (uniform over the bundled sites' span, ±3 % of the
baseline). The draws use numpy's seeded generator on purpose: this is reproducible test data,
not privacy noise.

Examples
--------
>>> sites = synthetic_federation(n_sites=2)
>>> [len(s) for s in sites], sites[0]["site"].iloc[0]
([489, 446], 'synth01')
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

import numpy as np
import pandas as pd

from fednipype.exceptions import DataError

__all__ = ["REGION_BOUNDS", "LABEL_BOUNDS", "planted_effects", "regions", "synthetic_federation"]

#: Public bounds for every region's volume (mm3) that hold the planted model's range.
REGION_BOUNDS = (2000.0, 10000.0)
#: Public bounds of age (years).
LABEL_BOUNDS = (18.0, 90.0)

SEED = 20261129


@functools.cache
def planted_effects() -> dict[str, Any]:
    """The planted effects shipped with the package (``planted_effects.json``)."""
    text = importlib.resources.files("fednipype.learn").joinpath("planted_effects.json")
    return json.loads(text.read_text(encoding="utf-8"))


def regions() -> list[str]:
    """The region names, in atlas order."""
    return [r["name"] for r in planted_effects()["regions"]]


def synthetic_federation(
    n_sites: int = 10,
    seed: int = SEED,
    *,
    sizes: tuple[int, int] = (200, 500),
    noise_fraction: float | None = None,
) -> list[pd.DataFrame]:
    """The sites' participant tables with their regional volumes.

    Parameters
    ----------
    n_sites : int
        Number of sites (named ``synth01``, ``synth02``, …).
    seed : int
        Seed of the generator; site k draws from ``default_rng([seed, k])``, so a site's rows
        do not depend on how many sites are asked for.
    sizes : tuple of int
        Inclusive range of the number of participants per site.
    noise_fraction : float, optional
        Subject noise SD as a fraction of each region's baseline (default: the planted
        ``sd_subject_fraction``).

    Returns
    -------
    list of pandas.DataFrame
        One per site; columns ``site``, ``participant_id``, ``age``, ``sex`` (F/M), ``group``
        (patient/control) and one column per region (mm3).
    """
    if int(n_sites) != n_sites or n_sites < 1:
        raise DataError(f"n_sites: expected a whole number >= 1, got {n_sites!r}")
    effects = planted_effects()
    table = pd.DataFrame(effects["regions"])
    names = table["name"].tolist()
    baseline = table["baseline_volume_mm3"].to_numpy()
    slope = table["age_slope_mm3_per_year"].to_numpy()
    patient_effect = table["patient_mm3"].to_numpy()
    male_effect = table["male_mm3"].to_numpy()
    sd = (effects["sd_subject_fraction"] if noise_fraction is None else noise_fraction) * baseline
    offsets = [s["offset_fraction"] for s in effects["sites"].values()]
    out = []
    for k in range(int(n_sites)):
        rng = np.random.default_rng([int(seed), k])
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        lo = rng.uniform(LABEL_BOUNDS[0], 60.0)
        hi = rng.uniform(min(lo + 20.0, LABEL_BOUNDS[1]), LABEL_BOUNDS[1])
        age = np.round(rng.uniform(lo, hi, n), 1)
        male = rng.uniform(size=n) < 0.5
        patient = np.zeros(n, dtype=bool)
        patient[: int(round(n * rng.uniform(0.3, 0.5)))] = True
        rng.shuffle(patient)
        offset = rng.uniform(min(offsets), max(offsets)) * baseline
        volumes = (
            baseline
            + np.outer(age - effects["center_age"], slope)
            + np.outer(patient, patient_effect)
            + np.outer(male, male_effect)
            + offset
            + rng.normal(0.0, 1.0, (n, len(names))) * sd
        )
        frame = pd.DataFrame(
            {
                "site": f"synth{k + 1:02d}",
                "participant_id": [f"sub-{k + 1:02d}{i + 1:04d}" for i in range(n)],
                "age": age,
                "sex": np.where(male, "M", "F"),
                "group": np.where(patient, "patient", "control"),
            }
        )
        out.append(pd.concat([frame, pd.DataFrame(volumes, columns=names)], axis=1))
    return out
