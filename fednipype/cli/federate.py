"""Entry point of ``fednipype-federate``: run a federated request, write the coordinator's report.

::

    fednipype-federate REQUEST.json --superlink HOST:PORT --root-certificates ca.crt -o OUTDIR \\
        [--timeout S] [--num-shares N --reconstruction-threshold T] [-v]
    fednipype-federate REQUEST.json --connection NAME [--flwr-home DIR] -o OUTDIR

runs fednipype's Flower app (``fednipype/federated/app``) on the consortium's SuperLink with
``flwr run``: every site's SuperNode checks the request (approved by its data owner, mode
allowed by its policy, budget), the sites that accept answer through SecAgg+, and the hub
receives only the sum. Run it on the coordinator's machine, where the SuperLink's server app
runs. It writes into ``OUTDIR``:

``pooled_results.tsv``
    The pooled regression with site intercepts (``fednipype-meta``'s columns), original
    units, standard errors that include the mode's noise.
``site_estimates.tsv``, ``forest_<region>_intercept.png``
    Each contributing site's intercept (a secure sum holds no per-site slopes).
``index.html``, ``federation.json``, ``secure_sum.json``
    The summary page; the run's record (contributing, dropped and refusing sites with their
    public reasons, request hash, mode, timings); the server app's output.

The request and every argument are checked, and the SuperLink must answer TLS with the given
CA, before anything runs. ``flwr run`` is bounded by ``--timeout``. A run that ends with too
few sites is one error line naming each site's public reason; the output folder is then as
it was. Exit codes: see ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fednipype import __version__
from fednipype.cli.console import setup_logging
from fednipype.cli.errors import ArgumentParser, HelpFormatter, exit_epilog, guarded
from fednipype.cli.flower_options import (
    add_engine_arguments,
    add_run_arguments,
    check_engine,
    check_sharing,
    check_timeouts,
)
from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import FederationError

PROG = "fednipype-federate"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``fednipype-federate``."""
    parser = ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
        description=(
            "Run a federated analysis request on the consortium's SuperLink (Flower, TLS, "
            "SecAgg+) and write the pooled regression of the secure sum, with its report."
        ),
    )
    parser.add_argument("request", type=Path, metavar="REQUEST.json", help="the analysis request")
    parser.add_argument(
        "-o", "--output-dir", required=True, type=Path, metavar="OUTDIR",
        help="folder for pooled_results.tsv, the report and federation.json",
    )  # fmt: skip
    add_engine_arguments(parser, simulate=False)
    run = add_run_arguments(
        parser,
        [
            ("--timeout", 900.0, "seconds the whole run may take; then it is stopped"),
            ("--round-timeout", 120.0, "seconds each exchange waits for the sites' replies"),
            ("--connect-timeout", 60.0, "seconds to wait for the request's sites to connect"),
        ],
    )
    run.add_argument(
        "--regions", nargs="+", metavar="R", help="regions with a forest plot (default: all)"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: debugging)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-federate`` and return its exit code (see ``fednipype-federate --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    return guarded(PROG, lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> int:
    check_engine(args)
    check_timeouts(args, ("timeout", "round_timeout", "connect_timeout"))
    check_sharing(args, AnalysisRequest.from_file(args.request).k)
    # Imported here: the federation's process tools and the hub's report (matplotlib) are
    # needed only once the arguments are known to be usable.
    from fednipype.federated.analysis import run_federated_analysis

    run = run_federated_analysis(
        args.request,
        args.output_dir,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        connection=args.connection,
        flwr_home=args.flwr_home,
        timeout=args.timeout,
        round_timeout=args.round_timeout,
        connect_timeout=args.connect_timeout,
        num_shares=args.num_shares,
        reconstruction_threshold=args.reconstruction_threshold,
        plot_regions=args.regions,
    )
    record = run.record
    others = record["not_contributing"]
    if not run.result.contributors:
        raise FederationError("the run completed without contributors")  # defensive
    print(
        f"{PROG}: {record['mode']} secure sum of {len(run.result.contributors)} of "
        f"{len(record['sites'])} sites ({', '.join(run.result.contributors)}) in "
        f"{record['timings_s']['flwr_run']:.1f} s: {run.report.tsv}, {run.report.html}"
    )
    for row in others:
        reason = f": {row['reason']}" if row["reason"] else ""
        print(f"{PROG}: note: {row['site']} {row['status']}{reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
