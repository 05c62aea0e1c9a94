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
from fednipype.cli.errors import ArgumentParser, HelpFormatter, UsageError, exit_epilog, guarded
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
    link = parser.add_argument_group("SuperLink (either --superlink with a CA, or --connection)")
    link.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink's address")
    link.add_argument(
        "--root-certificates", type=Path, metavar="CA.crt",
        help="the consortium CA's certificate (PEM); a private Flower config is written for it",
    )  # fmt: skip
    link.add_argument(
        "--connection", metavar="NAME",
        help="use [superlink.NAME] of an existing Flower config instead",
    )  # fmt: skip
    link.add_argument(
        "--flwr-home", type=Path, metavar="DIR",
        help="the Flower home of --connection (default: $FLWR_HOME, else ~/.flwr)",
    )  # fmt: skip
    run = parser.add_argument_group("run")
    run.add_argument(
        "--timeout", type=float, default=900.0, metavar="S",
        help="seconds the whole run may take; then it is stopped (default: %(default)g)",
    )  # fmt: skip
    run.add_argument(
        "--round-timeout", type=float, default=120.0, metavar="S",
        help="seconds each exchange waits for the sites' replies (default: %(default)g)",
    )  # fmt: skip
    run.add_argument(
        "--connect-timeout", type=float, default=60.0, metavar="S",
        help="seconds to wait for the request's sites to connect (default: %(default)g)",
    )  # fmt: skip
    run.add_argument(
        "--num-shares", type=int, default=3, metavar="N",
        help="SecAgg+ shares per secret, 3 to the number of sites (default: %(default)s)",
    )  # fmt: skip
    run.add_argument(
        "--reconstruction-threshold", type=int, default=2, metavar="T",
        help="SecAgg+ shares needed to rebuild a secret, 2 to N-1 (default: %(default)s)",
    )  # fmt: skip
    run.add_argument(
        "--regions", nargs="+", metavar="R", help="regions with a forest plot (default: all)"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: debugging)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if args.connection is None and (args.superlink is None or args.root_certificates is None):
        raise UsageError("--superlink and --root-certificates are required (or --connection)")
    if args.connection is not None and (args.superlink or args.root_certificates):
        raise UsageError("--connection: give it without --superlink and --root-certificates")
    if args.flwr_home is not None and args.connection is None:
        raise UsageError("--flwr-home: only with --connection")
    for name in ("timeout", "round_timeout", "connect_timeout"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf") or (name != "connect_timeout" and value == 0):
            raise UsageError(f"--{name.replace('_', '-')}: expected seconds > 0, got {value}")


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
    _check_arguments(args)
    # Imported here: the federation's process tools and the hub's report (matplotlib) are
    # needed only once the arguments are known to be usable.
    from fednipype.federated.analysis import check_shares, parse_address, run_federated_analysis

    request = AnalysisRequest.from_file(args.request)
    try:
        check_shares(args.num_shares, args.reconstruction_threshold, request.k)
        if args.superlink is not None:
            parse_address(args.superlink)
    except FederationError as err:
        raise UsageError(str(err)) from None
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
