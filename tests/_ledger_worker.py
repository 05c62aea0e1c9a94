"""A separate process spending from a privacy ledger, for the ledger's concurrency tests.

Usage: ``python _ledger_worker.py MODE LEDGER OUTDIR ATTEMPTS EPSILON DELTA``, where the ledger
is opened for dataset ``"concurrency-test"`` with total (1.0, 1e-6).

Modes
-----
race
    Print ``ready``, wait for a line on stdin, then make ATTEMPTS charges of (EPSILON, DELTA);
    each accepted charge writes a release file atomically. Print a JSON summary at the end.
hang-compute
    Charge once, print ``charged <id>``, then block on stdin while "computing".
hang-write
    Charge once, start writing the release, print ``writing <id>``, then block on stdin
    once the content is in the temporary file, before its hash is recorded and it is renamed.
"""

import json
import os
import sys
from pathlib import Path

from fednipype.exceptions import PrivacyBudgetExceeded
from fednipype.site.ledger import PrivacyLedger

DATASET = "concurrency-test"
TOTAL = (1.0, 1e-6)


def main() -> int:
    mode, ledger_path, outdir, attempts, epsilon, delta = sys.argv[1:7]
    ledger = PrivacyLedger(ledger_path, DATASET, *TOTAL)
    outdir = Path(outdir)
    epsilon, delta = float(epsilon), float(delta)
    pid = os.getpid()

    if mode == "race":
        print("ready", flush=True)
        sys.stdin.readline()
        accepted, refused = [], 0
        for i in range(int(attempts)):
            try:
                with ledger.reserve(epsilon, delta, "race", {"pid": pid, "i": i}) as spend:
                    doc = {"pid": pid, "attempt": i, "charge": spend.charge_id}
                    spend.write_release(outdir / f"w{pid}-{i}_release.json", doc)
                    accepted.append(spend.charge_id)
            except PrivacyBudgetExceeded:
                refused += 1
        print(json.dumps({"pid": pid, "accepted": accepted, "refused": refused}), flush=True)
        return 0

    with ledger.reserve(epsilon, delta, mode, {"pid": pid}) as spend:
        if mode == "hang-compute":
            print(f"charged {spend.charge_id}", flush=True)
            sys.stdin.readline()  # the test kills this process here
        elif mode == "hang-write":
            record = ledger.record_release

            def hang_then_record(charge_id: int, digest: str) -> None:
                print(f"writing {charge_id}", flush=True)
                sys.stdin.readline()  # the test kills this process here
                record(charge_id, digest)

            ledger.record_release = hang_then_record
            spend.write_release(outdir / f"w{pid}_release.json", {"partial": True})
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
