"""Utility of DP releases against ε: the bundled sites, and a federation where DP can work.

Run from the repository root::

    python bench/privacy_utility.py [--part bundled|federation|all] [--reps 5]
        [--federation-reps 200] [--out bench/results]

``federation``: a deterministic feature-level federation of 10 sites × 500 participants drawn
from the bundled ground truth's planted effects and site effects (each site its own age range
and offset). For each ε per site, ``--federation-reps`` replicate releases of every site go
through the real mechanism (:func:`fednipype.site.mechanisms.prepare_sufficient_statistics`,
OpenDP noise, n released once) and are pooled with site intercepts; two designs side by side:
all 100 regions, and 5 pre-registered regions. It prints, per design and ε, the planner's
predicted SE (:func:`fednipype.plan.predict`), the empirical SD of the pooled age slope of
L_P12, the coverage of its 95 % intervals, and the SD ratio of the two designs; it saves
``privacy_designs.png`` (SD against ε, both designs, with the planner's lines).

``bundled``: for each ε (per site) it makes a real release per bundled site (OpenDP noise,
a throwaway ledger), pools them with :func:`fednipype.hub.regression.pooled_regression` and
compares the pooled age slope of every region with the planted slope in
``bids_examples/ground_truth.json``.
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
FEDERATION_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
PRE_REGISTERED = ("L_P01", "L_P12", "L_P27", "R_P12", "R_P33")
TARGET = "L_P12"
AGE_BOUNDS, VOLUME_BOUNDS, DELTA = (18.0, 90.0), (0.0, 12000.0), 1e-5
TERMS = ("intercept", "age", "sex[M]", "group[patient]")


def _federation_sites(truth: dict, n_sites: int = 10, n: int = 500) -> list[tuple]:
    """Deterministic sites: (age, male, patient, volumes of every region, the site's public
    recruitment age range) drawn from the
    generator's planted effects (age slope, sex, patient), each site its own age range and
    offset, subject variability as the generator's (``sd_subject_fraction``)."""
    rng = np.random.default_rng(truth["seed"])
    regions = truth["regions"]
    base = np.array([r["baseline_volume_mm3"] for r in regions])
    slope = np.array([r["age_slope_mm3_per_year"] for r in regions])
    male_fx = np.array([r["male_mm3"] for r in regions])
    patient_fx = np.array([r["patient_mm3"] for r in regions])
    sites = []
    for _ in range(n_sites):
        low = rng.uniform(20.0, 45.0)
        age = rng.uniform(low, low + 40.0, n)
        male = (rng.random(n) < 0.5).astype(float)
        patient = (rng.random(n) < 0.5).astype(float)
        offset = rng.normal(0.0, 0.02)
        u = rng.normal(0.0, truth["sd_subject_fraction"], (n, 1))
        y = (
            base * (1.0 + offset + u)
            + slope * (age[:, None] - truth["center_age"])
            + male_fx * male[:, None]
            + patient_fx * patient[:, None]
        )
        sites.append((age, male, patient, np.clip(y, *VOLUME_BOUNDS), (low, low + 40.0)))
    return sites


def federation(reps: int, out: Path) -> None:
    """The two designs on the 10 × 500 federation; prints the table, saves the plot."""
    import matplotlib.pyplot as plt

    from fednipype.contract.scaling import Scaling
    from fednipype.hub.regression import pooled_regression
    from fednipype.hub.releases import floor_n
    from fednipype.plan import Covariate, Response, Scenario, predict, uniform_moments
    from fednipype.site.mechanisms import prepare_sufficient_statistics

    truth = json.loads((REPO / "bids_examples" / "ground_truth.json").read_text())
    names = [r["name"] for r in truth["regions"]]
    target = next(r for r in truth["regions"] if r["name"] == TARGET)
    planted = target["age_slope_mm3_per_year"]
    sites = _federation_sites(truth)
    # (regions, whether each site declares its own public age range: its recruitment range)
    designs = {
        "all 100 regions": (names, False),
        "5 pre-registered": (list(PRE_REGISTERED), False),
        "5 + site ages": (list(PRE_REGISTERED), True),
    }
    print(
        f"federation: {len(sites)} sites x {len(sites[0][0])} participants; pooled age slope "
        f"of {TARGET} (planted {planted:.1f} mm3/yr), {reps} replicate releases per cell"
    )
    print(f"{'design':>17} {'eps':>5} {'planned SE':>11} {'empirical SD':>13} {'CI covers':>10}")
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    for label, (regions, own_ages) in designs.items():
        own = [
            Scaling.from_bounds(
                numeric={"age": site[4] if own_ages else AGE_BOUNDS},
                dummies=TERMS[2:],
                regions=dict.fromkeys(regions, VOLUME_BOUNDS),
            )
            for site in sites
        ]
        scaling = Scaling.envelope(own, TERMS)  # the hub's common units
        units = [site_scaling.conversion_to(scaling, TERMS) for site_scaling in own]
        columns = [names.index(r) for r in regions]
        scaled = [
            (
                s.scale_design(np.column_stack([np.ones_like(a), a, m, p]), TERMS),
                s.scale_response(y[:, columns], regions),
            )
            for (a, m, p, y, _), s in zip(sites, own, strict=True)
        ]
        for eps in FEDERATION_EPSILONS:
            scenario = Scenario.of(
                [Covariate.numeric("age", AGE_BOUNDS, within=(20.0, 85.0)),
                 Covariate.dummy("sex[M]", 0.5), Covariate.dummy("group[patient]", 0.5)],
                Response(VOLUME_BOUNDS,
                         residual_sd=truth["sd_subject_fraction"] * target["baseline_volume_mm3"],
                         mean=target["baseline_volume_mm3"],
                         effects={"age": planted, "sex[M]": target["male_mm3"],
                                  "group[patient]": target["patient_mm3"]}),
                n=[len(a) for a, *_ in sites], epsilon=eps, delta=DELTA, regions=len(regions),
                # each site's public recruitment range: its age mean and sd (uniform)
                assumed=[{"age": uniform_moments(*site[4])} for site in sites],
                bounds=[{"age": site[4]} if own_ages else {} for site in sites],
            )  # fmt: skip
            plan = predict(scenario)
            estimates, covered = [], 0
            for _ in range(reps):
                released = [
                    prepare_sufficient_statistics(
                        z, y, scaling.design_bounds(TERMS), scaling.response_bounds(regions),
                        eps, DELTA, terms=TERMS, regions=regions, max_participants=1000,
                        n_terms=("intercept", *TERMS[2:]),
                    )._draw()
                    for z, y in scaled
                ]  # fmt: skip
                released = [floor_n(s) for s in released]  # as the hub on reading a release
                table = scaling.unscale(pooled_regression(released, units=units))
                table = table.set_index(["region", "term"])
                row = table.loc[(TARGET, "age")]
                estimates.append(row["estimate"])
                covered += bool(row["ci_low"] <= planted <= row["ci_high"])
            sd = float(np.std(estimates, ddof=1))
            results.setdefault(label, []).append((eps, plan.se("age"), sd, covered / reps))
            flag = "" if plan.first_order else "  (planner: first order fails)"
            print(
                f"{label:>17} {eps:>5g} {plan.se('age'):>11.2f} {sd:>13.2f} "
                f"{covered / reps:>10.3f}{flag}"
            )
    print("SD ratio, all regions / 5 pre-registered / 5 + site ages:")
    for (eps, _, sd_all, _), (_, _, sd_five, _), (_, _, sd_own, _) in zip(
        results["all 100 regions"],
        results["5 pre-registered"],
        results["5 + site ages"],
        strict=True,
    ):
        print(f"  eps={eps:g}: {sd_all / sd_five:.2f}, {sd_all / sd_own:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        eps = [r[0] for r in rows]
        line = ax.loglog(eps, [r[2] for r in rows], "o-", label=f"{label}: empirical SD")
        ax.loglog(eps, [r[1] for r in rows], "--", color=line[0].get_color(),
                  label=f"{label}: planner")  # fmt: skip
    ax.set_xlabel("ε per site (δ = 1e-5)")
    ax.set_ylabel(f"SD of the pooled age slope of {TARGET} (mm³/yr)")
    ax.set_title("10 sites × 500 participants")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "privacy_designs.png", dpi=120)
    print(f"plot: {out / 'privacy_designs.png'}")


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
    """Run the benchmark; print the tables and save the plots."""
    import matplotlib

    matplotlib.use("Agg")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("bundled", "federation", "all"), default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--federation-reps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    # meta/release log a warning per noisy fit (PSD projection, floored variances): expected here
    logging.getLogger("fednipype").setLevel(logging.ERROR)
    if args.part in ("federation", "all"):
        federation(args.federation_reps, args.out)
    if args.part in ("bundled", "all"):
        bundled_designs(args.federation_reps)
        bundled(args.reps, args.out)
    return 0


def bundled_designs(reps: int) -> None:
    """The bundled sites (24-45 participants): both designs through the real mechanism.

    Per ε and design: the planner's SE of the pooled age slope of ``TARGET`` (or its warning),
    the empirical SD over ``reps`` replicate releases of the three sites, and the share of
    released regions whose pooled age slope has the planted sign.
    """
    from fednipype.contract.scaling import Scaling
    from fednipype.features import extract_dataset_features
    from fednipype.hub.regression import pooled_regression
    from fednipype.hub.releases import floor_n
    from fednipype.participants import read_participants
    from fednipype.plan import Covariate, Response, Scenario, predict, uniform_moments
    from fednipype.site.design import ModelSpec, build_design, load_feature_table
    from fednipype.site.mechanisms import prepare_sufficient_statistics

    truth = json.loads((REPO / "bids_examples" / "ground_truth.json").read_text())
    names = [r["name"] for r in truth["regions"]]
    planted = {r["name"]: r["age_slope_mm3_per_year"] for r in truth["regions"]}
    target = next(r for r in truth["regions"] if r["name"] == TARGET)
    ranges = [tuple(truth["sites"][site]["age_range"]) for site in SITES]
    with tempfile.TemporaryDirectory() as tmp:
        designs_rows = []
        for site in SITES:
            files = extract_dataset_features(REPO / "bids_examples" / site, Path(tmp) / site)
            designs_rows.append(
                build_design(
                    load_feature_table(files),
                    read_participants(REPO / "bids_examples" / site),
                    ModelSpec(),
                )
            )
    terms = designs_rows[0].terms
    sizes = [d.n for d in designs_rows]
    print(f"bundled sites {dict(zip(SITES, sizes, strict=True))}: pooled age slope of {TARGET}")
    print(f"{'design':>17} {'eps':>6} {'planned SE':>34} {'empirical SD':>13} {'signs right':>12}")
    for label, regions, own_ages in (
        ("all 100 regions", names, False),
        ("5 + site ages", list(PRE_REGISTERED), True),
    ):
        own = [
            Scaling.from_bounds(
                numeric={"age": rng_ if own_ages else AGE_BOUNDS},
                dummies=terms[2:],
                regions=dict.fromkeys(regions, VOLUME_BOUNDS),
            )
            for rng_ in ranges
        ]
        scaling = Scaling.envelope(own, terms)
        units = [s.conversion_to(scaling, terms) for s in own]
        columns = [list(designs_rows[0].regions).index(r) for r in regions]
        scaled = [
            (s.scale_design(d.z, terms), s.scale_response(d.y[:, columns], regions))
            for d, s in zip(designs_rows, own, strict=True)
        ]
        signs = np.sign([planted[r] for r in regions])
        for eps in (1.0, 10.0, 100.0, 1000.0):
            plan = predict(
                Scenario.of(
                    [Covariate.numeric("age", AGE_BOUNDS, within=(20.0, 85.0)),
                     Covariate.dummy("sex[M]", 0.5), Covariate.dummy("group[patient]", 0.5)],
                    Response(VOLUME_BOUNDS,
                             residual_sd=truth["sd_subject_fraction"]
                             * target["baseline_volume_mm3"],
                             mean=target["baseline_volume_mm3"],
                             effects={"age": target["age_slope_mm3_per_year"]}),
                    n=sizes, epsilon=eps, delta=DELTA, regions=len(regions),
                    assumed=[{"age": uniform_moments(*r)} for r in ranges],
                    bounds=[{"age": r} if own_ages else {} for r in ranges],
                )
            )  # fmt: skip
            estimates, right = [], []
            for _ in range(reps):
                released = [
                    floor_n(
                        prepare_sufficient_statistics(
                            z, y, scaling.design_bounds(terms), scaling.response_bounds(regions),
                            eps, DELTA, terms=terms, regions=regions, max_participants=1000,
                            n_terms=("intercept", *terms[2:]),
                        )._draw()
                    )
                    for z, y in scaled
                ]  # fmt: skip
                table = scaling.unscale(pooled_regression(released, units=units))
                age = table[table["term"] == "age"].set_index("region")["estimate"]
                estimates.append(age[TARGET])
                right.append(float(np.mean(np.sign(age[regions].to_numpy()) == signs)))
            said = (
                f"{plan.se('age'):.1f}"
                if plan.first_order
                else f"~{plan.se('age'):.0f} (first order fails)"
            )
            print(
                f"{label:>17} {eps:>6g} {said:>34} {np.std(estimates, ddof=1):>13.1f} "
                f"{np.mean(right):>12.2f}"
            )


def bundled(reps: int, out: Path) -> None:
    """The bundled sites: all-region releases through make_release against ε."""
    import matplotlib.pyplot as plt

    from fednipype.features import extract_dataset_features
    from fednipype.hub.regression import pooled_regression
    from fednipype.hub.releases import load_releases
    from fednipype.site.lifecycle import init_ledger
    from fednipype.site.policy import example_policy
    from fednipype.site.release import make_release

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
            for rep in range(reps):
                paths = []
                for site in SITES:
                    folder = tmp / f"eps{eps}-{rep}-{site}"
                    folder.mkdir()
                    # the demo's public bounds, with a budget no run can exhaust
                    policy = example_policy(dataset=site, total_epsilon=1e9)
                    (folder / "policy.toml").write_text(policy)
                    init_ledger(folder / "policy.toml")
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
    out.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(out / "privacy_utility.png", dpi=120)
    print(f"plot: {out / 'privacy_utility.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
