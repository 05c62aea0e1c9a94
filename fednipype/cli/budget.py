"""``fednipype-budget``: what a dataset's privacy ledger has spent, what remains, and why."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fednipype.exceptions import FednipypeError
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy


def main(argv: Sequence[str] | None = None) -> int:
    """Print the budget (total, spent, remaining) and the audit trail of a site's ledger.

    Parameters
    ----------
    argv : sequence of str, optional
        ``--policy FILE [--json]``.

    Returns
    -------
    int
        0 on success, 1 when the policy or the ledger cannot be read.
    """
    parser = argparse.ArgumentParser(prog="fednipype-budget", description=__doc__.split(":")[1])
    parser.add_argument("--policy", type=Path, required=True, help="the site policy (TOML)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        policy = SitePolicy.from_toml(args.policy)
        if not policy.ledger_path.exists():
            raise FednipypeError(
                f"{policy.ledger_path}: no privacy ledger yet (nothing has been released)"
            )
        ledger = PrivacyLedger.from_policy(policy)
        total, spent, remaining = ledger.total, ledger.spent(), ledger.remaining()
        trail = ledger.audit_trail()
    except FednipypeError as err:
        print(f"fednipype-budget: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": policy.dataset_id,
                    "ledger": str(policy.ledger_path),
                    "total": total._asdict(),
                    "spent": spent._asdict(),
                    "remaining": remaining._asdict(),
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
                },
                indent=2,
            )
        )
        return 0
    print(f"dataset   {policy.dataset_id}")
    print(f"ledger    {policy.ledger_path}")
    print(f"total     epsilon={total.epsilon:.6g}  delta={total.delta:.6g}")
    print(f"spent     epsilon={spent.epsilon:.6g}  delta={spent.delta:.6g}")
    print(f"remaining epsilon={remaining.epsilon:.6g}  delta={remaining.delta:.6g}")
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
