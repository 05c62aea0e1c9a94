"""Utility of DP releases against ε on the bundled sites: error of the pooled age slopes.

Run from the repository root::

    python bench/privacy_utility.py [--reps 5] [--out bench/results]

For each ε (per site) it makes a real release per bundled site (OpenDP noise, a throwaway
ledger), pools them with :func:`fednipype.hub.regression.pooled_regression` and compares the pooled
age slope of every region with the planted slope in ``bids_examples/ground_truth.json``.
The baseline, measured in the same run, is the noise-free pooled OLS fit of the same features
(ε = ∞). It prints, per ε, the median over repetitions of the RMSE across regions, its ratio
to the noise-free RMSE, the share of regions whose sign is right, and the share whose 95 % CI
covers the planted slope; it saves the plot ``privacy_utility.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SITES = ("siteA", "siteB", "siteC")
EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)


def _noise_free(features: dict[str, list[Path]]):
    """Pooled OLS (site intercepts) of the rows the releases use: the ε = ∞ baseline."""
    import statsmodels.api as sm

    from fednipype.bids import read_participants
    from fednipype.site.design import ModelSpec, build_design, load_feature_table

    zs, ys = [], []
    for k, (site, files) in enumerate(features.items()):
        design = build_design(
            load_feature_table(files),
            read_participants(REPO / "bids_examples" / site),
            ModelSpec(),
        )
        # as the releases' pooled regression: one intercept per site, common slopes
        dummies = np.zeros((design.n, len(features)))
        dummies[:, k] = 1.0
        zs.append(np.column_stack([design.z[:, 1:], dummies]))
        ys.append(design.y)
    z, y = np.vstack(zs), np.vstack(ys)
    return np.array([sm.OLS(y[:, r], z).fit().params[0] for r in range(y.shape[1])])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and save the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fednipype.features import extract_dataset_features
    from fednipype.hub.regression import pooled_regression
    from fednipype.hub.releases import load_releases
    from fednipype.site.policy import example_policy
    from fednipype.site.release import make_release

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    # meta/release log a warning per noisy fit (PSD projection, floored variances): expected here
    logging.getLogger("fednipype").setLevel(logging.ERROR)
    truth = json.loads((REPO / "bids_examples" / "ground_truth.json").read_text())
    planted = np.array([r["age_slope_mm3_per_year"] for r in truth["regions"]])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        features = {
            site: extract_dataset_features(REPO / "bids_examples" / site, tmp / "features" / site)
            for site in SITES
        }
        baseline = _noise_free(features)
        base_rmse = float(np.sqrt(np.mean((baseline - planted) ** 2)))
        print(
            f"noise-free pooled OLS: RMSE of age slopes {base_rmse:.2f} mm3/year "
            f"(mean |planted slope| {np.mean(np.abs(planted)):.1f})"
        )
        print(f"{'eps/site':>9} {'RMSE':>10} {'ratio':>8} {'sign ok':>8} {'CI covers':>9}")
        rows = []
        for eps in EPSILONS:
            rmse, sign, cover = [], [], []
            for rep in range(args.reps):
                paths = []
                for site in SITES:
                    folder = tmp / f"eps{eps}-{rep}-{site}"
                    folder.mkdir()
                    # the demo's public bounds, with a budget no run can exhaust
                    policy = example_policy(dataset=site, total_epsilon=1e9)
                    (folder / "policy.toml").write_text(policy)
                    path = make_release(
                        features=features[site],
                        participants=REPO / "bids_examples" / site,
                        policy=folder / "policy.toml",
                        epsilon=eps,
                        delta=1e-5,
                        site=site,
                        out_path=folder / f"{site}_release.json",
                    )
                    paths.append(path)
                releases = load_releases(paths)
                stats = {r.site: r.statistics() for r in releases}
                table = releases[0].scaling.unscale(pooled_regression(stats))
                age = table[table["term"] == "age"]
                est = age["estimate"].to_numpy()
                rmse.append(float(np.sqrt(np.mean((est - planted) ** 2))))
                sign.append(float(np.mean(np.sign(est) == np.sign(planted))))
                cover.append(
                    float(np.mean((age["ci_low"] <= planted) & (planted <= age["ci_high"])))
                )
            row = (eps, np.median(rmse), np.median(sign), np.median(cover))
            rows.append(row)
            print(
                f"{eps:>9g} {row[1]:>10.1f} {row[1] / base_rmse:>8.1f} {row[2]:>8.2f} "
                f"{row[3]:>9.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    eps_arr = np.array([r[0] for r in rows])
    ax.loglog(eps_arr, [r[1] for r in rows], "o-", label="DP releases (pooled)")
    ax.axhline(base_rmse, color="grey", ls="--", label="noise-free pooled OLS")
    ax.axhline(np.mean(np.abs(planted)), color="red", ls=":", label="mean |planted slope|")
    ax.set_xlabel("ε per site (δ = 1e-5)")
    ax.set_ylabel("RMSE of age slopes (mm³/year)")
    ax.set_title("Bundled sites (n = 24, 30, 45): error vs ε")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "privacy_utility.png", dpi=120)
    print(f"plot: {args.out / 'privacy_utility.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
