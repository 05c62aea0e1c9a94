"""``fednipype-budget``: create a dataset's privacy ledger, and show what it has spent and why.

::

    fednipype-budget init --policy policy.toml [--reinit --reason TEXT]
    fednipype-budget [show] --policy policy.toml [--json]

``init`` creates the dataset's ledger (the file the policy's ``[ledger] path`` names) with a
random ledger id, and writes that id into the policy (``[ledger] id``): from then on every
command opens exactly that ledger, and refuses when it is missing, moved or another one — a
budget is never restarted by a file operation. Re-initialising (a lost ledger, a new study)
is possible only with ``--reinit`` and a reason; it is recorded in the new ledger, and in the
old one when that still exists (which is kept, renamed aside).

Exit codes as every fednipype command (``fednipype-budget --help``): 0 success, 2 usage,
3 invalid input (an unreadable policy), 4 privacy refusal (an unbound, missing, moved or other
ledger; an init that would start a new budget) — one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fednipype.cli.console import setup_logging
from fednipype.cli.errors import ArgumentParser, HelpFormatter, exit_epilog, guarded
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy

PROG = "fednipype-budget"


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``fednipype-budget init`` or ``fednipype-budget show``."""
    parser = ArgumentParser(
        prog=f"{PROG} {command}",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=exit_epilog(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--policy", type=Path, required=True, help="the site policy (TOML)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="traceback on error")
    if command == "init":
        parser.add_argument(
            "--reinit",
            action="store_true",
            help="replace the ledger the policy is bound to by a new one (a new budget)",
        )
        parser.add_argument("--reason", help="why (required with --reinit; kept in the ledger)")
    else:
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-budget`` and return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        ``init --policy FILE [--reinit --reason TEXT]`` or ``[show] --policy FILE [--json]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("init", "show") else "show"
    args = build_parser(command).parse_args(argv)
    setup_logging(PROG, args.verbose)
    body = _init if command == "init" else _show
    return guarded(PROG, lambda: body(args), verbose=args.verbose)


def _init(args: argparse.Namespace) -> int:
    ledger_id = init_ledger(args.policy, reinit=args.reinit, reason=args.reason)
    policy = SitePolicy.from_toml(args.policy)
    print(
        f"created privacy ledger {policy.ledger_path} (id {ledger_id}) for dataset "
        f"{policy.dataset_id!r}: epsilon={policy.epsilon:g}, delta={policy.delta:g}; "
        f"{policy.source} is bound to it"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    policy = SitePolicy.from_toml(args.policy)
    ledger = PrivacyLedger.from_policy(policy)
    total, spent, remaining = ledger.total, ledger.spent(), ledger.remaining()
    trail, events = ledger.audit_trail(), ledger.events()
    if args.json:
        report = {
            "dataset": policy.dataset_id,
            "ledger": str(policy.ledger_path),
            "ledger_id": ledger.ledger_id,
            "total": total._asdict(),
            "spent": spent._asdict(),
            "remaining": remaining._asdict(),
            "composition": "privacy-loss distributions at the total delta (Gaussian releases)",
            "events": [{"time": t, "kind": k, "detail": d} for t, k, d in events],
            "audit_trail": [
                {
                    "charge_id": r.charge_id,
                    "time": r.time,
                    "purpose": r.purpose,
                    "epsilon": r.epsilon,
                    "delta": r.delta,
                    "content_sha256": r.content_sha256,
                    "software_version": r.software_version,
                    "parameters": r.parameters,
                }
                for r in trail
            ],
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"dataset   {policy.dataset_id}")
    print(f"ledger    {policy.ledger_path} (id {ledger.ledger_id})")
    print(f"total     epsilon={total.epsilon:.6g}  delta={total.delta:.6g}")
    print(f"spent     epsilon={spent.epsilon:.6g}  (composed at delta={total.delta:.6g})")
    print(f"remaining epsilon={remaining.epsilon:.6g}")
    for time, kind, detail in events:
        print(f"event     {time}  {kind}: {detail}")
    print(f"audit trail ({len(trail)} charge(s)):")
    for r in trail:
        digest = (r.content_sha256 or "no release")[:16]
        print(
            f"  #{r.charge_id:<4} {r.time}  epsilon={r.epsilon:.6g} delta={r.delta:.6g}  "
            f"{r.purpose}  [{digest}]  fednipype {r.software_version}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
