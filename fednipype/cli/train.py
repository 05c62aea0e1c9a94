"""Entry point of ``fednipype-train``: run a federated training request, write the model file.

::

    fednipype-train REQUEST.json --superlink HOST:PORT --root-certificates ca.crt -o OUTDIR \\
        [--timeout S] [--num-shares N --reconstruction-threshold T] [--patience P] [-v]
    fednipype-train REQUEST.json --connection NAME [--flwr-home DIR] -o OUTDIR
    fednipype-train REQUEST.json --simulate SITES.json -o OUTDIR

runs fednipype's Flower app with ``task = "training"`` on the consortium's SuperLink (or, with
``--simulate``, in Flower's simulation engine on this machine, one simulated SuperNode per
entry of ``SITES.json``: a list of node configs ``{"site", "policy", "bids-dir",
"derivatives"}``). Every site checks the training request first (approved by its data owner,
mode allowed by its policy, budget for the whole run, the regions in its tables); the sites
that accept train ``rounds`` FedAvg rounds whose updates reach the hub only as SecAgg+ sums. It
writes into ``OUTDIR``:

``model.json``
    The model file (``fednipype.learn.modelfile.load_model`` returns the scikit-learn
    estimator) with its provenance: sites and rounds taken part in, request hash, privacy
    spent per site, software versions, feature list and scaling.
``metrics.tsv``, ``training.json``
    One row per round (held-out metrics in mode ``none``); the run's record.

The request and every argument are checked first. ``flwr run`` is bounded by ``--timeout``. A
run that ends with too few sites is one error line naming each site's public reason; the output
folder is then as it was. Exit codes: see ``--help``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from fednipype import __version__
from fednipype.cli.console import setup_logging
from fednipype.cli.errors import ArgumentParser, HelpFormatter, UsageError, exit_epilog, guarded
from fednipype.cli.flower_options import (
    add_engine_arguments,
    add_run_arguments,
    check_engine,
    check_sharing,
    check_timeouts,
)
from fednipype.contract.training import TrainingRequest

PROG = "fednipype-train"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``fednipype-train``."""
    parser = ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
        description=(
            "Run a federated training request (FedAvg through SecAgg+, DP-SGD at each site in "
            "mode dp, FedSGD with each site's discrete Gaussian share in mode distributed-dp) "
            "on the consortium's SuperLink or in simulation; write the model file."
        ),
    )
    parser.add_argument("request", type=Path, metavar="REQUEST.json", help="the training request")
    parser.add_argument(
        "-o", "--output-dir", required=True, type=Path, metavar="OUTDIR",
        help="folder for model.json, metrics.tsv and training.json",
    )  # fmt: skip
    add_engine_arguments(parser, simulate=True)
    run = add_run_arguments(
        parser,
        [
            ("--timeout", 1800.0, "seconds the whole run may take; then it is stopped"),
            ("--round-timeout", 120.0, "seconds each SecAgg+ stage waits for the sites' replies"),
            ("--check-timeout", 120.0, "seconds the data-free check round waits"),
            ("--connect-timeout", 60.0, "seconds to wait for the request's sites to connect"),
        ],
    )
    run.add_argument(
        "--patience", type=int, default=0, metavar="P",
        help="mode none: stop after P rounds without a better held-out loss (default: never)",
    )  # fmt: skip
    run.add_argument(
        "--param-bound", type=float, default=1000.0, metavar="B",
        help="public bound on every parameter a site sends, scaled units (default: %(default)g)",
    )  # fmt: skip
    run.add_argument(
        "--no-evaluate", action="store_true",
        help="mode none: do not ask the sites for held-out metrics",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: debugging)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    check_engine(args)
    check_timeouts(args, ("timeout", "round_timeout", "check_timeout", "connect_timeout"))
    if args.patience < 0:
        raise UsageError(f"--patience: expected an integer >= 0, got {args.patience}")
    if not 0 < args.param_bound < math.inf:
        raise UsageError(f"--param-bound: expected a number > 0, got {args.param_bound}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-train`` and return its exit code (see ``fednipype-train --help``).

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
    check_sharing(args, TrainingRequest.from_file(args.request).k)
    # Imported here: the federation's process tools are needed only for usable arguments.
    from fednipype.federated.training import read_simulated_sites, run_federated_training

    sites = read_simulated_sites(args.simulate) if args.simulate is not None else None
    run = run_federated_training(
        args.request,
        args.output_dir,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        connection=args.connection,
        flwr_home=args.flwr_home,
        sites=sites,
        timeout=args.timeout,
        round_timeout=args.round_timeout,
        check_timeout=args.check_timeout,
        connect_timeout=args.connect_timeout,
        num_shares=args.num_shares,
        reconstruction_threshold=args.reconstruction_threshold,
        param_bound=args.param_bound,
        patience=args.patience,
        evaluate=not args.no_evaluate,
    )
    record = run.record
    took = [row["site"] for row in record["sites"] if row["rounds"]]
    print(
        f"{PROG}: {record['task']} ({record['mode']}) trained by {len(took)} of "
        f"{len(record['sites'])} sites ({', '.join(took)}) in {record['rounds_run']} rounds: "
        f"{run.model}, {run.metrics}"
    )
    for row in record["sites"]:
        if row["status"] != "completed":
            reason = f": {row['reason']}" if row["reason"] else ""
            print(f"{PROG}: note: {row['site']} {row['status']}{reason}", file=sys.stderr)
    if record.get("halted"):
        print(f"{PROG}: note: {record['halted']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
