"""The demo: fednipype's whole job over every site of a folder of BIDS datasets.

``fednipype-demo bids_examples demo_output`` runs, for each bundled site, what a site would run
(enumeration, the participant workflow's regional features, a DP release charged to the site's
own ledger), then what the coordinator would run on the releases (pooled regression and
meta-analysis, forest plots, an HTML page).  Site policies are written by the demo because
the example sites have no data owner; a real site writes its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from nipype import config
from nipype import logging as nipype_logging

from fednipype.atlas import default_atlas
from fednipype.bids import summarize
from fednipype.cli import demo_federated
from fednipype.cli import hub as meta
from fednipype.cli.console import configure_nipype, setup_logging
from fednipype.cli.errors import (
    EXIT_INVALID_INPUT,
    ArgumentParser,
    HelpFormatter,
    UsageError,
    exit_epilog,
    guarded,
    report,
)
from fednipype.cli.participant import format_summary, run_participant_wf
from fednipype.cli.plan import format_plan, format_requirement
from fednipype.exceptions import BIDSError, FednipypeError
from fednipype.hub.reports import TSV_NAME
from fednipype.io import atomic_write_text
from fednipype.participants import read_participants
from fednipype.plan import (
    Covariate,
    Response,
    Scenario,
    predict,
    required_epsilon,
    required_n,
    uniform_moments,
)
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy
from fednipype.site.report import write_site_report
from fednipype.workflows.release import init_site_release_wf

PROG = "fednipype-demo"


def find_sites(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that are BIDS datasets (hold a ``dataset_description.json``)."""
    return sorted(p for p in root.iterdir() if (p / "dataset_description.json").is_file())


def _site_policy(site_dir: Path, site: str, total_epsilon: float) -> Path:
    """The example site's policy, bound to its ledger (created here, once, as a data owner's
    explicit ``fednipype-budget init`` would)."""
    path = site_dir / "policy.toml"
    if not path.exists():
        atomic_write_text(path, example_policy(dataset=site, total_epsilon=total_epsilon))
    if SitePolicy.from_toml(path).ledger_id is None:
        ledger_id = init_ledger(path)
        print(f"  fednipype-budget init: ledger {ledger_id} for dataset {site!r}")
    return path


#: The age-slope standard error (mm3/yr) the demo's plan asks for: the planted slopes are
#: −12 to −29 mm3/yr.
PLAN_TARGET_SE = ("age", 5.0)
#: A pre-registered subset of regions, for comparison: fewer regions, less noise per entry.
PLAN_FEWER_REGIONS = 5


def plan_text(sites: list[Path], epsilon: float, delta: float) -> str:
    """The privacy plan of the demo's releases, printed before anything is spent.

    Public inputs: the example policy's bounds, the default atlas's region count (every region
    is released), ε and δ per site. Assumptions: ages uniform over each site's recruitment
    range, the residual sd and mean volume of the generator's design (``ground_truth.json``,
    when present; otherwise ages over the bounds and a residual sd of 2.5 % of the volume
    bounds). The sites' sizes are read from their ``participants.tsv``: the demo is the data
    owner here.
    """
    bounds = tomllib.loads(example_policy(dataset="plan", total_epsilon=1.0))["bounds"]
    age_bounds, volume_bounds = bounds["age"], bounds["features"]["default"]
    labels = pd.read_csv(default_atlas().labels, sep="\t")
    regions = int((labels["index"] != 0).sum())
    truth_file = sites[0].parent / "ground_truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.is_file() else {}
    design = truth.get("sites", {})
    assumed = [
        {"age": uniform_moments(*design[site.name]["age_range"])} if site.name in design else {}
        for site in sites
    ]
    if truth.get("regions"):
        baseline = statistics.median(r["baseline_volume_mm3"] for r in truth["regions"])
        slope = statistics.median(r["age_slope_mm3_per_year"] for r in truth["regions"])
        response = Response(
            volume_bounds,
            residual_sd=truth["sd_subject_fraction"] * baseline,
            mean=baseline,
            effects={"age": slope},
        )
    else:
        response = Response(
            volume_bounds, residual_sd=0.025 * (volume_bounds[1] - volume_bounds[0])
        )
    scenario = Scenario.of(
        [
            Covariate.numeric("age", age_bounds),
            Covariate.dummy("sex[M]", 0.5),
            Covariate.dummy("group[patient]", 0.5),
        ],
        response,
        n=[len(read_participants(site)) for site in sites],
        epsilon=epsilon,
        delta=delta,
        regions=regions,
        assumed=assumed,
    )
    lines = [format_plan(predict(scenario), "regional grey-matter volume, mm3")]
    lines += [
        format_requirement(find(scenario, *PLAN_TARGET_SE), scenario)
        for find in (required_epsilon, required_n)
    ]
    fewer = dataclasses.replace(scenario, regions=PLAN_FEWER_REGIONS)
    lines += [
        f"releasing {PLAN_FEWER_REGIONS} pre-registered regions instead of {regions}: "
        + format_requirement(find(fewer, *PLAN_TARGET_SE), fewer)
        for find in (required_epsilon, required_n)
    ]
    return "\n".join(lines)


def _effects_table(meta_dir: Path, truth_file: Path, regions: list[str]) -> str:
    """Pooled age and patient effects next to the planted ones, for the demo's last table."""
    results = pd.read_csv(meta_dir / TSV_NAME, sep="\t")
    pooled = results[results["method"] == "pooled_regression"].set_index(["region", "term"])
    truth = {}
    if truth_file.is_file():
        truth = {r["name"]: r for r in json.loads(truth_file.read_text())["regions"]}
    rows = []
    for region in regions:
        for term, key in (("age", "age_slope_mm3_per_year"), ("group[patient]", "patient_mm3")):
            if (region, term) not in pooled.index:
                continue
            row = pooled.loc[(region, term)]
            rows.append(
                {
                    "region": region,
                    "term": term,
                    "planted": truth.get(region, {}).get(key, float("nan")),
                    "estimate": row["estimate"],
                    "95% CI": f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]",
                }
            )
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo over every BIDS dataset below ``sites_dir``; return the exit code.

    With ``--federated``, run the federated demo instead (:mod:`fednipype.cli.demo_federated`).
    """
    given = list(sys.argv[1:] if argv is None else argv)
    if "--federated" in given:
        return demo_federated.main([a for a in given if a != "--federated"])
    parser = ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
    )
    parser.add_argument("sites_dir", type=Path, help="folder holding one BIDS dataset per site")
    parser.add_argument("output_dir", type=Path, help="folder for the demo's outputs")
    parser.add_argument("--epsilon", type=float, default=1.0, help="privacy loss of each release")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of each release")
    parser.add_argument(
        "--n-procs", "--nprocs", "--n_procs", type=int, default=2, help="MultiProc processes"
    )
    parser.add_argument(
        "--enumerate-only", action="store_true", help="only print the sites' summary table"
    )
    parser.add_argument(
        "--federated",
        action="store_true",
        help="run the federated demo instead: a local Flower consortium (see "
        f"{PROG} --federated --help)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (-vv: debugging)"
    )
    args = parser.parse_args(argv)
    setup_logging(PROG, args.verbose)
    return guarded(PROG, lambda: _main(args), verbose=args.verbose)


def _main(args: argparse.Namespace) -> int:
    if args.n_procs < 1:
        raise UsageError(f"--n-procs: must be an integer >= 1, got {args.n_procs}")
    if not args.sites_dir.is_dir():
        raise BIDSError(f"{args.sites_dir}: not a folder; expected a folder of BIDS datasets")
    sites = find_sites(args.sites_dir)
    if not sites:
        raise BIDSError(f"no BIDS dataset below {args.sites_dir}")
    configure_nipype(args.verbose)
    rows, failed = [], []
    for site in sites:
        try:
            rows.append({"site": site.name, **summarize(site)})
        except FednipypeError as err:
            failed.append(f"{site.name}: {err}")
    print(format_summary(rows))
    for message in failed:
        report(PROG, message)
    if failed or args.enumerate_only:
        return EXIT_INVALID_INPUT if failed else 0
    return _pipeline(args, [s for s in sites if s.name in {r["site"] for r in rows}])


def _pipeline(args: argparse.Namespace, sites: list[Path]) -> int:
    """Participant features, one DP release per site, then the coordinator's meta-analysis."""
    # Nipype reports every node at INFO; the demo prints its own progress.
    config.update_config({"logging": {"workflow_level": "WARNING"}})
    nipype_logging.update_logging(config)
    # Per-region noise notes of each fit; the coordinator prints their summary.
    logging.getLogger("fednipype.hub.regression").setLevel(logging.ERROR)

    print(
        f"\n[plan] what releases at epsilon={args.epsilon} per site can show "
        "(fednipype-plan: public bounds and assumptions only, nothing spent)"
    )
    print(plan_text(sites, args.epsilon, args.delta))

    out = args.output_dir.absolute()
    releases, reports = [], []
    for site in sites:
        site_dir = out / site.name
        print(f"\n[{site.name}] regional features (Nipype MultiProc, {args.n_procs} procs)")
        run = run_participant_wf(
            bids_dir=site,
            output_dir=site_dir / "derivatives",
            work_dir=site_dir / "work",
            plugin="MultiProc",
            plugin_args={"n_procs": args.n_procs},
        )
        print(f"  {len(run.outputs)}/{run.n_jobs} feature tables in {run.elapsed_s:.1f} s")
        for failure in run.failures:
            print(f"  failed: {failure}")
        policy = _site_policy(site_dir, site.name, total_epsilon=10 * args.epsilon)
        print(f"[{site.name}] DP release: epsilon={args.epsilon}, delta={args.delta}")
        graph = init_site_release_wf(
            bids_dir=site,
            derivatives_dir=site_dir / "derivatives",
            policy=policy,
            epsilon=args.epsilon,
            delta=args.delta,
            release_dir=out / "releases",
            work_dir=site_dir / "work",
        ).run(plugin="Linear")
        (node,) = [n for n in graph.nodes() if n.name == "dp_release"]
        release = Path(node.result.outputs.out_release)  # named with its ledger and charge
        print(f"  {release.relative_to(out.parent) if out.parent in release.parents else release}")
        releases.append(release)
        reports.append(
            write_site_report(
                site_dir / "derivatives",
                bids_dir=site,
                policy=policy,
                releases=[release],
                failures=run.failures,
            )
        )

    truth = args.sites_dir / "ground_truth.json"
    regions = ["L_P12", "R_P12", "L_P27", "R_P33", "L_P01"]
    if truth.is_file():
        regions = json.loads(truth.read_text())["patient_regions"] + ["L_P01"]
    print("\n[coordinator] pooled regression and meta-analysis of the releases")
    code = meta.main(
        [
            *map(str, releases),
            "-o",
            str(out / "meta"),
            "--regions",
            *regions,
            "--terms",
            "age",
            "group[patient]",
        ]
    )
    if code:
        return code
    print("\nPooled effects (regional grey-matter volume, mm3) next to the planted ones:")
    print(_effects_table(out / "meta", truth, regions))
    print(
        f"\nAt epsilon={args.epsilon} per site the noise of a release over 24–45 participants "
        "is much larger than these effects: the intervals are honest (they include the DP "
        "noise) and wide. See bench/privacy_utility.py for error against epsilon."
    )
    print("\nReports to open:")
    print(f"  {out / 'meta' / 'index.html'}  (the coordinator's: pooled results, forest plots)")
    for page in reports:
        print(f"  {page}  (private to its site: subjects, QC, budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
