"""The options ``fednipype-federate`` and ``fednipype-train`` share, and their checks.

Both commands reach a Flower SuperLink the same ways (``--superlink`` with the consortium's
CA, or ``--connection`` of an existing Flower config; training may also ``--simulate``), bound
their exchanges with the same timeouts and set SecAgg+'s shares the same way. The checks
refuse unusable values in one line (:class:`~fednipype.cli.errors.UsageError`, exit code 2)
before anything starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from fednipype.cli.errors import UsageError
from fednipype.exceptions import FederationError

__all__ = [
    "add_engine_arguments",
    "add_run_arguments",
    "check_engine",
    "check_sharing",
    "check_timeouts",
]

#: ``(flag, default, help)`` of a timeout option; seconds.
Timeout = tuple[str, float, str]


def add_engine_arguments(parser: argparse.ArgumentParser, *, simulate: bool) -> None:
    """``--superlink``, ``--root-certificates``, ``--connection``, ``--flwr-home`` (and
    ``--simulate`` when ``simulate``)."""
    title = (
        "engine (--superlink with a CA, --connection, or --simulate)"
        if simulate
        else "SuperLink (either --superlink with a CA, or --connection)"
    )
    link = parser.add_argument_group(title)
    link.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink's address")
    link.add_argument(
        "--root-certificates", type=Path, metavar="CA.crt",
        help="the consortium CA's certificate (PEM); a private Flower config is written for it",
    )  # fmt: skip
    link.add_argument(
        "--connection", metavar="NAME", help="use [superlink.NAME] of an existing Flower config"
    )
    link.add_argument(
        "--flwr-home", type=Path, metavar="DIR",
        help="the Flower home of --connection (default: $FLWR_HOME, else ~/.flwr)",
    )  # fmt: skip
    if simulate:
        link.add_argument(
            "--simulate", type=Path, metavar="SITES.json",
            help="simulate the federation here: a JSON list of the sites' node configs",
        )  # fmt: skip


def add_run_arguments(
    parser: argparse.ArgumentParser, timeouts: Sequence[Timeout]
) -> argparse._ArgumentGroup:
    """The ``run`` group: the timeouts (seconds) and SecAgg+'s shares; returned for more."""
    run = parser.add_argument_group("run")
    for flag, default, text in timeouts:
        run.add_argument(flag, type=float, default=default, metavar="S",
                         help=f"{text} (default: %(default)g)")  # fmt: skip
    run.add_argument(
        "--num-shares", type=int, default=3, metavar="N",
        help="SecAgg+ shares per secret, 3 to the number of sites (default: %(default)s)",
    )  # fmt: skip
    run.add_argument(
        "--reconstruction-threshold", type=int, default=2, metavar="T",
        help="SecAgg+ shares needed to rebuild a secret, 2 to N-1 (default: %(default)s)",
    )  # fmt: skip
    return run


def check_engine(args: argparse.Namespace) -> None:
    """Exactly one way to the federation; ``--flwr-home`` only with ``--connection``."""
    simulate = getattr(args, "simulate", None) is not None
    direct = args.superlink is not None or args.root_certificates is not None
    if args.connection is not None and direct:
        raise UsageError("--connection: give it without --superlink and --root-certificates")
    if simulate and (direct or args.connection is not None):
        raise UsageError(
            "give one engine: --superlink with --root-certificates, --connection, or --simulate"
        )
    missing = args.superlink is None or args.root_certificates is None
    if not simulate and args.connection is None and missing:
        others = "--connection, or --simulate" if hasattr(args, "simulate") else "--connection"
        raise UsageError(f"--superlink and --root-certificates are required (or {others})")
    if args.flwr_home is not None and args.connection is None:
        raise UsageError("--flwr-home: only with --connection")


def check_timeouts(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Each of ``names`` (attribute names) finite seconds > 0; ``connect_timeout`` may be 0."""
    for name in names:
        value = getattr(args, name)
        if not value >= 0 or math.isinf(value) or (name != "connect_timeout" and value == 0):
            raise UsageError(f"--{name.replace('_', '-')}: expected seconds > 0, got {value}")


def check_sharing(args: argparse.Namespace, n_sites: int) -> None:
    """SecAgg+'s shares for ``n_sites`` sites and the SuperLink's address, as usage errors."""
    # Imported here: the federation's process tools are needed only for usable arguments.
    from fednipype.federated.analysis import check_shares, parse_address

    try:
        check_shares(args.num_shares, args.reconstruction_threshold, n_sites)
        if args.superlink is not None:
            parse_address(args.superlink)
    except FederationError as err:
        raise UsageError(str(err)) from None
