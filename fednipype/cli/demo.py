"""The demo: fednipype's whole job over every site of a folder of BIDS datasets.

``fednipype-demo bids_examples demo_output`` runs, for each bundled site, what a site would run
(enumeration, the participant workflow's regional features, a DP release charged to the site's
own ledger), then what the coordinator would run on the releases (pooled regression and
meta-analysis, forest plots, an HTML page).  Site policies are written by the demo because
the example sites have no data owner; a real site writes its own.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from nipype import config
from nipype import logging as nipype_logging

from fednipype.bids import summarize
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
from fednipype.exceptions import BIDSError, FednipypeError
from fednipype.hub.reports import TSV_NAME
from fednipype.io import atomic_write_text
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
    """Run the demo over every BIDS dataset below ``sites_dir``; return the exit code."""
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
