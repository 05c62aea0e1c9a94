"""The federated demo: a whole consortium on this machine, ``fednipype-demo --federated``.

``fednipype-demo --federated bids_examples OUT`` plays every role of a federated analysis over
the bundled sites:

1. each site computes its participant-level regional features (the participant workflow,
   as ``fednipype-demo`` runs it), writes its policy (``[federation] modes = ["dp"]``,
   ``allow_exact_secure_sum = true``: the example sites have no data owner, a real site
   writes its own) and initialises its ledger (``fednipype-budget init``);
2. the coordinator writes two requests over five pre-registered regions and the bundled
   covariates, with the example policy's public bounds: ``exact`` (no noise, K = 3) and
   ``dp`` (ε per site);
3. each site's data owner approves both (``fednipype-site approve``);
4. a local consortium starts: a SuperLink with TLS and SuperNode authentication and one
   SuperNode per site on 127.0.0.1 (:class:`fednipype.federated.deploy.LocalConsortium`);
5. the coordinator runs both requests (``fednipype-federate``) into ``OUT/federated-exact``
   and ``OUT/federated-dp``, prints the planted effects (``ground_truth.json``) next to the
   exact estimates, and every process is stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fednipype.cli.console import configure_nipype, setup_logging
from fednipype.cli.errors import (
    ArgumentParser,
    HelpFormatter,
    UsageError,
    exit_epilog,
    guarded,
)
from fednipype.cli.participant import run_participant_wf
from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import BIDSError, FednipypeError
from fednipype.federated.analysis import run_federated_analysis
from fednipype.federated.deploy import LocalConsortium
from fednipype.io import atomic_write_text
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy

PROG = "fednipype-demo"

#: Pre-registered regions of the demo's requests: the four with a planted patient effect and
#: one without.
REGIONS = ("L_P01", "L_P12", "L_P27", "R_P12", "R_P33")
#: The policy's federation table (appended to the example policy).
FEDERATION_TABLE = '\n[federation]\nmodes = ["dp"]\nallow_exact_secure_sum = true\n'
#: Planted effects of ``ground_truth.json`` by model term.
PLANTED = {
    "age": "age_slope_mm3_per_year",
    "group[patient]": "patient_mm3",
    "sex[M]": "male_mm3",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fednipype-demo --federated``."""
    parser = ArgumentParser(
        prog=f"{PROG} --federated",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
    )
    parser.add_argument("sites_dir", type=Path, help="folder holding one BIDS dataset per site")
    parser.add_argument("output_dir", type=Path, help="folder for the demo's outputs")
    parser.add_argument(
        "--epsilon", type=float, default=1.0, help="epsilon per site of the dp request"
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of the dp request")
    parser.add_argument(
        "--n-procs", "--nprocs", "--n_procs", type=int, default=2, help="MultiProc processes"
    )
    parser.add_argument(
        "--timeout", type=float, default=420.0, help="seconds each federated run may take"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (-vv: debugging)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the federated demo (arguments without ``--federated``); return the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    return guarded(PROG, lambda: _main(args), verbose=args.verbose)


def _sites(args: argparse.Namespace) -> list[Path]:
    """Check every argument before anything starts; return the sites' datasets."""
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise UsageError(f"--epsilon: expected a number > 0, got {args.epsilon}")
    if not 0 < args.delta < 1e-3:
        raise UsageError(f"--delta: expected 0 < delta < 1e-3, got {args.delta}")
    if args.n_procs < 1:
        raise UsageError(f"--n-procs: must be an integer >= 1, got {args.n_procs}")
    if not (math.isfinite(args.timeout) and args.timeout >= 60):
        raise UsageError(f"--timeout: expected seconds >= 60, got {args.timeout}")
    if not args.sites_dir.is_dir():
        raise BIDSError(f"{args.sites_dir}: not a folder; expected a folder of BIDS datasets")
    sites = sorted(
        p for p in args.sites_dir.iterdir() if (p / "dataset_description.json").is_file()
    )
    if len(sites) < 3:
        raise BIDSError(
            f"{args.sites_dir}: {len(sites)} BIDS dataset(s); an exact secure sum needs 3 sites"
        )
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise FednipypeError(f"{args.output_dir}: exists and is not a folder")
    return sites


def request_documents(sites: Sequence[str], epsilon: float, delta: float) -> dict[str, dict]:
    """The demo's ``exact`` and ``dp`` requests (public bounds of the example policy)."""
    policy = tomllib.loads(example_policy(dataset="demo", total_epsilon=1.0))
    base: dict[str, Any] = {
        "schema": "fednipype-request/1.0",
        "sites": list(sites),
        "model": {
            "response": "volume_mm3",
            "numeric": ["age"],
            "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]},
        },
        "regions": list(REGIONS),
        "bounds": {
            "covariates": {"age": policy["bounds"]["age"]},
            "regions": {"default": policy["bounds"]["features"]["default"]},
        },
        "max_dropouts": 0,
        "max_participants": policy["budget"]["max_participants"],
    }
    return {
        "exact": {**base, "request_id": "demo-exact", "mode": "exact", "epsilon": None,
                  "delta": None, "min_sites": 3},
        "dp": {**base, "request_id": "demo-dp", "mode": "dp", "epsilon": epsilon,
               "delta": delta, "min_sites": 2},
    }  # fmt: skip


def _prepare_site(site: Path, site_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Features, policy and ledger of one site; returns its SuperNode's node config."""
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
    policy = site_dir / "policy.toml"
    if not policy.exists():
        text = example_policy(dataset=site.name, total_epsilon=10 * args.epsilon)
        atomic_write_text(policy, text + FEDERATION_TABLE)
    if SitePolicy.from_toml(policy).ledger_id is None:
        print(f"  fednipype-budget init: ledger {init_ledger(policy)}")
    return {
        "site": site.name,
        "policy": str(policy),
        "bids-dir": str(site),
        "derivatives": str(site_dir / "derivatives"),
    }


def effects_table(pooled_tsv: Path, truth_file: Path) -> pd.DataFrame:
    """Planted effects next to the pooled estimates and intervals (every region and term of
    the table that has a planted value)."""
    results = pd.read_csv(pooled_tsv, sep="\t")
    truth = {}
    if truth_file.is_file():
        truth = {r["name"]: r for r in json.loads(truth_file.read_text())["regions"]}
    rows = []
    for row in results.itertuples(index=False):
        key = PLANTED.get(row.term)
        if key is None or row.region not in truth:
            continue
        planted = float(truth[row.region][key])
        rows.append(
            {
                "region": row.region,
                "term": row.term,
                "planted": planted,
                "estimate": row.estimate,
                "ci_low": row.ci_low,
                "ci_high": row.ci_high,
                "inside": bool(row.ci_low <= planted <= row.ci_high),
            }
        )
    return pd.DataFrame(rows)


def _main(args: argparse.Namespace) -> int:
    sites = _sites(args)
    begin = time.monotonic()
    configure_nipype(args.verbose)
    logging.getLogger("fednipype.hub.regression").setLevel(logging.ERROR)
    out = args.output_dir.absolute()
    nodes = {}
    for site in sites:
        print(f"[{site.name}] regional features (Nipype MultiProc, {args.n_procs} procs)")
        nodes[site.name] = _prepare_site(site, out / site.name, args)

    print("\n[coordinator] requests (public bounds of the example policy):")
    requests = {}
    for mode, doc in request_documents(list(nodes), args.epsilon, args.delta).items():
        path = atomic_write_text(out / "requests" / f"{doc['request_id']}.json",
                                 json.dumps(doc, indent=2) + "\n")  # fmt: skip
        requests[mode] = AnalysisRequest.from_file(path)
        print(f"  {path.name}: {mode}, regions {' '.join(REGIONS)}, "
              f"sha256 {requests[mode].content_hash[:12]}…")  # fmt: skip
    for name, node in nodes.items():
        ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(node["policy"]))
        for request in requests.values():
            approvals.approve(ledger, request, note="fednipype demo")
        ids = ", ".join(r.request_id for r in requests.values())
        print(f"[{name}] fednipype-site approve: {ids}")

    print("\n[consortium] SuperLink (TLS, SuperNode authentication) and 3 SuperNodes on 127.0.0.1")
    timings: dict[str, float] = {}
    # the consortium's keys, SuperLink state and logs are the demo's own: fresh on every run
    shutil.rmtree(out / "consortium", ignore_errors=True)
    with LocalConsortium(out / "consortium", nodes, stop_grace=5.0) as consortium:
        timings["startup"] = consortium.timings["startup_s"]
        print(f"  online at {consortium.superlink_address} in {timings['startup']:.1f} s")
        for mode in ("exact", "dp"):
            print(f"\n[coordinator] fednipype-federate {mode} request")
            tic = time.monotonic()
            run = run_federated_analysis(
                out / "requests" / f"demo-{mode}.json",
                out / f"federated-{mode}",
                superlink=consortium.superlink_address,
                root_certificates=consortium.ca,
                timeout=args.timeout,
            )
            timings[mode] = time.monotonic() - tic
            print(f"  {len(run.result.contributors)} sites ({', '.join(run.result.contributors)})"
                  f" in {timings[mode]:.1f} s: {run.report.tsv}")  # fmt: skip
    print(f"\n[consortium] every process stopped ({consortium.timings['stop_s']:.1f} s)")

    table = effects_table(out / "federated-exact" / "pooled_results.tsv",
                          args.sites_dir / "ground_truth.json")  # fmt: skip
    if not table.empty:
        shown = table.assign(
            ci=[
                f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(table.ci_low, table.ci_high, strict=True)
            ]
        )[["region", "term", "planted", "estimate", "ci", "inside"]]
        print("\nExact secure sum (no noise) next to the planted effects (mm3; 95% CI):")
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"{int(table.inside.sum())} of {len(table)} planted effects inside their CI")
    print(f"\nReports: {out / 'federated-exact' / 'index.html'}, "
          f"{out / 'federated-dp' / 'index.html'}")  # fmt: skip
    print(f"Wall time {time.monotonic() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
