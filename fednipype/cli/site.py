"""``fednipype-site``: the data owner reviews, approves and refuses federated analysis requests.

::

    fednipype-site requests --policy policy.toml [--json]
    fednipype-site approve REQUEST --policy policy.toml [--note TEXT]
    fednipype-site refuse REQUEST --policy policy.toml [--note TEXT]

``REQUEST`` is a request file (``fednipype-request/1.0`` JSON) or the content hash (at least
its first 8 hex digits) of a request the ledger has recorded: requests that arrived unapproved
are recorded as pending, with their document, and ``requests`` lists them with the approved,
refused and answered ones. Decisions go into the audit trail of the dataset's privacy ledger
(the one the policy is bound to), keyed by the request's content hash; an altered request has
another hash and needs its own approval. An approval pays for one answer.

Exit codes as every fednipype command (``fednipype-site --help``): 0 success, 2 usage,
3 invalid input (an unreadable or malformed request, an unknown hash), 4 privacy refusal (an
unbound, missing or other ledger) — one line on stderr; nothing is recorded before a refusal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from fednipype.cli.console import setup_logging
from fednipype.cli.errors import ArgumentParser, HelpFormatter, exit_epilog, guarded
from fednipype.contract.request import AnalysisRequest
from fednipype.site.approvals import (
    RequestRecord,
    approve,
    find_request,
    list_requests,
    refuse,
)
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy

PROG = "fednipype-site"
COMMANDS = ("requests", "approve", "refuse")
LOGGER = logging.getLogger("fednipype.cli.site")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of one ``fednipype-site`` command (None: the top-level help)."""
    parser = ArgumentParser(
        prog=PROG if command is None else f"{PROG} {command}",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=exit_epilog(),
        formatter_class=HelpFormatter,
    )
    if command is None:
        parser.add_argument("command", choices=COMMANDS, help="what to do")
        return parser
    if command in ("approve", "refuse"):
        parser.add_argument(
            "request",
            help="the request file, or the first 8+ hex digits of a recorded request's hash",
        )
        parser.add_argument("--note", help="the owner's reason or reference (kept in the ledger)")
    parser.add_argument("--policy", type=Path, required=True, help="the site policy (TOML)")
    if command == "requests":
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="traceback on error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-site`` and return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        ``requests --policy FILE [--json]``, ``approve REQUEST --policy FILE [--note TEXT]``
        or ``refuse REQUEST --policy FILE [--note TEXT]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser(None).parse_args(argv[:1])  # --help, or a one-line usage error
        return 2  # not reached: parse_args exits
    command = argv.pop(0)
    args = build_parser(command).parse_args(argv)
    setup_logging(PROG, args.verbose)
    body = {"requests": _requests, "approve": _decide, "refuse": _decide}[command]
    return guarded(PROG, lambda: body(command, args), verbose=args.verbose)


def _open(policy_path: Path) -> tuple[SitePolicy, PrivacyLedger]:
    policy = SitePolicy.from_toml(policy_path)
    return policy, PrivacyLedger.from_policy(policy)


def _decide(command: str, args: argparse.Namespace) -> int:
    policy, ledger = _open(args.policy)  # refusals first: nothing is recorded before them
    target: AnalysisRequest | RequestRecord
    if Path(args.request).is_file():
        target = AnalysisRequest.from_file(args.request)
        mode, digest, request_id = target.mode, target.content_hash, target.request_id
    else:
        target = find_request(ledger, args.request)
        mode, digest, request_id = target.mode, target.request_hash, target.request_id
    decide = approve if command == "approve" else refuse
    record = decide(ledger, target, args.note)
    cost = (
        "no noise (a non-DP disclosure)"
        if record.epsilon is None
        else f"epsilon={record.epsilon:g}, delta={record.delta:g} per answer"
    )
    verb = "approved (for one answer)" if command == "approve" else "refused"
    print(
        f"{verb}: request {request_id} (hash {digest[:16]}), mode {mode}, {cost}, sites "
        f"{', '.join(record.sites)}; recorded in privacy ledger {ledger.path}"
    )
    if command == "approve" and not policy.allows_mode(mode):
        switch = (
            "[federation] allow_exact_secure_sum = true"
            if mode == "exact"
            else f"'{mode}' in [federation] modes"
        )
        LOGGER.warning(
            "%s does not allow mode %s: the request is refused at answer time until the policy "
            "sets %s",
            policy.source,
            mode,
            switch,
        )
    return 0


def _requests(command: str, args: argparse.Namespace) -> int:
    del command
    _, ledger = _open(args.policy)
    records = list_requests(ledger)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, allow_nan=False))
        return 0
    if not records:
        print(f"no federated requests recorded in privacy ledger {ledger.path}")
        return 0
    header = ("status", "hash", "request", "mode", "epsilon", "delta", "when")
    rows = [
        (
            r.status,
            r.request_hash[:12],
            r.request_id,
            r.mode,
            "-" if r.epsilon is None else f"{r.epsilon:g}",
            "-" if r.delta is None else f"{r.delta:g}",
            r.time,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
