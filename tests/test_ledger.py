"""Tests of the privacy ledger: atomic fail-closed spending across processes, append-only audit."""

import hashlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import fednipype
from fednipype.contract.document import content_hash
from fednipype.exceptions import FednipypeError, PolicyError, PrivacyBudgetExceeded
from fednipype.io import atomic_write
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy

WORKER = Path(__file__).with_name("_ledger_worker.py")
DATASET = "concurrency-test"  # as in the worker
TOTAL = (1.0, 1e-6)


def rows(path: Path, table: str) -> int:
    """Row count read with plain sqlite3, independently of the ledger's code."""
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def start_worker(mode: str, ledger: Path, outdir: Path, attempts: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            mode,
            str(ledger),
            str(outdir),
            str(attempts),
            "0.1",
            "1e-7",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_concurrent_charges_are_fail_closed(tmp_path):
    """200 attempts of (0.1, 1e-7) from 8 processes against (1.0, 1e-6): exactly 10 succeed."""
    ledger_path = tmp_path / "ledger.sqlite"
    outdir = tmp_path / "out"
    outdir.mkdir()
    PrivacyLedger.create(ledger_path, DATASET, *TOTAL)
    workers = [start_worker("race", ledger_path, outdir, attempts=25) for _ in range(8)]
    for w in workers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
    for w in workers:  # release them together
        w.stdin.write("go\n")
        w.stdin.flush()
    summaries = []
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))

    accepted = [c for s in summaries for c in s["accepted"]]
    assert len(accepted) == 10
    assert sum(s["refused"] for s in summaries) == 190
    assert rows(ledger_path, "charge") == 10
    assert rows(ledger_path, "audit") == 10
    with sqlite3.connect(ledger_path) as conn:
        eps, dlt = zip(*conn.execute("SELECT epsilon, delta FROM charge").fetchall(), strict=True)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert math.fsum(eps) <= TOTAL[0] and math.fsum(dlt) <= TOTAL[1]

    releases = sorted(outdir.glob("*_release.json"))
    assert len(releases) == 10
    assert sorted(p.name for p in outdir.iterdir()) == [p.name for p in releases]  # no temp
    ledger = PrivacyLedger(ledger_path, DATASET, *TOTAL)
    recorded = {a.content_sha256 for a in ledger.audit_trail()}
    assert recorded == {content_hash(json.loads(p.read_text())) for p in releases}
    ledger.verify()

    # The 11th charge is refused with a message naming the ledger, spent, remaining, request.
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.charge(0.1, 0.0, "eleventh", {})
    message = str(info.value)
    assert str(ledger_path) in message
    assert "requested epsilon=0.1" in message
    assert "spent epsilon=1" in message and "remaining epsilon=0" in message
    assert rows(ledger_path, "charge") == 10


@pytest.mark.parametrize("mode", ["hang-compute", "hang-write"])
def test_killed_worker_leaves_ledger_consistent(tmp_path, mode):
    """SIGKILL after the charge (while computing, or half-way through writing the release)."""
    ledger_path = tmp_path / "ledger.sqlite"
    outdir = tmp_path / "out"
    outdir.mkdir()
    ledger = PrivacyLedger.create(ledger_path, DATASET, *TOTAL)
    worker = start_worker(mode, ledger_path, outdir)
    line = worker.stdout.readline().split()
    assert line and line[0] in {"charged", "writing"}, worker.stderr.read()
    charge_id = int(line[1])
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL

    # The charge and its audit row are both there; nothing half-recorded.
    assert rows(ledger_path, "charge") == 1
    assert rows(ledger_path, "audit") == 1
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ledger.verify()
    assert ledger.spent() == (0.1, 1e-7)
    (record,) = ledger.audit_trail()
    assert record.charge_id == charge_id and record.purpose == mode
    assert record.content_sha256 is None
    # No release file: at most a hidden temporary file that no release pattern matches.
    assert list(outdir.glob("*_release.json")) == []
    leftovers = list(outdir.iterdir())
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    assert len(leftovers) == (1 if mode == "hang-write" else 0)


def test_float_tolerance_admits_exact_budget_and_nothing_more(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1.0, 1e-6)
    for _ in range(10):
        ledger.charge(0.1, 1e-7, "tenth", {})
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(2e-12, 0.0, "beyond the relative tolerance", {})
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(1e-12, 1e-17, "delta over", {})
    assert rows(tmp_path / "l.sqlite", "charge") == 10
    assert ledger.remaining() == (0.0, 0.0)


def test_pure_dp_ledger_refuses_any_delta(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1.0, 0.0)
    ledger.charge(0.5, 0.0, "laplace", {})
    with pytest.raises(PrivacyBudgetExceeded, match="requested epsilon=0.1, delta=1e-10"):
        ledger.charge(0.1, 1e-10, "gaussian", {})


@pytest.mark.parametrize(
    ("epsilon", "delta", "purpose", "parameters", "error"),
    [
        (0.0, 0.0, "p", {}, PolicyError),
        (-0.1, 0.0, "p", {}, PolicyError),
        (math.nan, 0.0, "p", {}, PolicyError),
        (math.inf, 0.0, "p", {}, PolicyError),
        ("0.1", 0.0, "p", {}, PolicyError),
        (0.1, 1.0, "p", {}, PolicyError),
        (0.1, -1e-9, "p", {}, PolicyError),
        (0.1, math.nan, "p", {}, PolicyError),
        (0.1, 0.0, "", {}, FednipypeError),
        (0.1, 0.0, "p", {"x": math.nan}, FednipypeError),
        (0.1, 0.0, "p", {"x": object()}, FednipypeError),
    ],
)
def test_invalid_charges_record_nothing(tmp_path, epsilon, delta, purpose, parameters, error):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1.0, 1e-6)
    with pytest.raises(error):
        ledger.charge(epsilon, delta, purpose, parameters)
    assert rows(tmp_path / "l.sqlite", "charge") == 0
    assert rows(tmp_path / "l.sqlite", "audit") == 0


def test_audit_is_append_only(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger.create(path, "d", 1.0, 1e-6)
    first = ledger.charge(0.2, 0.0, "first", {"a": 1})
    ledger.charge(0.3, 0.0, "second", {})
    conn = sqlite3.connect(path, isolation_level=None)
    statements = [
        "UPDATE audit SET purpose = 'other'",
        "UPDATE audit SET epsilon = 0.0",
        f"UPDATE audit SET content_sha256 = '{'a' * 64}', released_time = 'x', purpose = 'y'",
        "DELETE FROM audit",
        "DELETE FROM audit WHERE charge_id = 1",
        "UPDATE charge SET epsilon = 0.01",
        "DELETE FROM charge",
        "UPDATE meta SET value = 'other' WHERE key = 'dataset_id'",
        "DELETE FROM meta",
        "UPDATE budget_history SET total_epsilon = 100",
        "DELETE FROM budget_history",
    ]
    for statement in statements:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    # The one permitted update: filling the release hash, once.
    conn.execute(
        "UPDATE audit SET content_sha256 = ?, released_time = 't' WHERE charge_id = ?",
        ("b" * 64, first),
    )
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(
            "UPDATE audit SET content_sha256 = ?, released_time = 't' WHERE charge_id = ?",
            ("c" * 64, first),
        )
    conn.close()
    assert ledger.spent() == (0.5, 0.0)
    with pytest.raises(FednipypeError, match="already recorded"):
        ledger.record_release(first, "d" * 64)
    assert [a.purpose for a in ledger.audit_trail()] == ["first", "second"]


def test_audit_trail_contents(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 2.0, 1e-6)
    before = datetime.now().astimezone()
    charge_id = ledger.charge(0.25, 1e-7, "release: means", {"regions": ["a", "b"], "n": 3})
    ledger.record_release(charge_id, hashlib.sha256(b"content").hexdigest())
    (record,) = ledger.audit_trail()
    when = datetime.fromisoformat(record.time)
    assert when.utcoffset() == timedelta(0)
    assert abs(when - before) < timedelta(minutes=5)
    assert record.purpose == "release: means"
    assert record.parameters == {"regions": ["a", "b"], "n": 3}
    assert (record.epsilon, record.delta) == (0.25, 1e-7)
    assert record.software_version == fednipype.__version__
    assert record.content_sha256 == hashlib.sha256(b"content").hexdigest()
    with pytest.raises(FednipypeError, match="64 lower-case hex"):
        ledger.record_release(charge_id, "ABC")
    with pytest.raises(FednipypeError, match="no such charge"):
        ledger.record_release(999, "e" * 64)


def test_new_object_and_new_output_folder_see_the_same_budget(tmp_path):
    """The ledger belongs to the dataset: another output folder or object does not reset it."""
    ledger_dir = tmp_path / "dataset" / "code"
    ledger_dir.mkdir(parents=True)
    policy_text = (
        "[budget]\nepsilon = 1.0\ndelta = 1e-6\n"
        f'[ledger]\npath = "{(ledger_dir / "ledger.sqlite").as_posix()}"\ndataset = "ds"\n'
        "[bounds.features]\ndefault = [0, 1]\n"
    )
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy_text)
    init_ledger(policy_path)
    policy = SitePolicy.from_toml(policy_path)

    for run, amount in (("out-run1", 0.3), ("out-run2", 0.4)):
        outdir = tmp_path / run
        outdir.mkdir()
        ledger = PrivacyLedger.from_policy(policy)  # a new object for each run
        with ledger.reserve(amount, 0.0, run, {}) as spend:
            spend.write_release(outdir / "site_release.json", {"run": run})
    again = PrivacyLedger(ledger_dir / "ledger.sqlite", "ds", 1.0, 1e-6)
    assert again.spent().epsilon == pytest.approx(0.7, abs=1e-15)
    assert len(again.audit_trail()) == 2
    with pytest.raises(PrivacyBudgetExceeded):
        PrivacyLedger.from_policy(policy).charge(0.31, 0.0, "too much", {})


def test_identity_and_totals_are_fixed(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger.create(path, "dataset-a", 1.0, 1e-6)
    ledger.charge(0.9, 0.0, "p", {})
    with pytest.raises(PolicyError, match="belongs to dataset 'dataset-a', not 'dataset-b'"):
        PrivacyLedger(path, "dataset-b", 1.0, 1e-6)
    with pytest.raises(PolicyError, match="total budget is epsilon=1.0"):
        PrivacyLedger(path, "dataset-a", 5.0, 1e-6)
    with pytest.raises(PolicyError, match="total budget"):
        PrivacyLedger(path, "dataset-a", 1.0, 1e-5)
    # The legitimate way: an explicit, reasoned amendment recorded in the ledger.
    with pytest.raises(PolicyError, match="reason"):
        ledger.amend_budget(2.0, 1e-6, "  ")
    ledger.amend_budget(2.0, 1e-6, "data owner decision 2024-05, ethics amendment 7")
    raised = PrivacyLedger(path, "dataset-a", 2.0, 1e-6)
    assert raised.remaining().epsilon == pytest.approx(1.1)
    with pytest.raises(PolicyError, match="total budget"):
        PrivacyLedger(path, "dataset-a", 1.0, 1e-6)
    history = raised.budget_history()
    assert [h[1] for h in history] == [1.0, 2.0]
    assert "ethics amendment 7" in history[-1][3]


def test_unusable_ledger_locations(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        PrivacyLedger.create(tmp_path / "missing" / "l.sqlite", "d", 1.0, 0.0)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PolicyError, match="junk.sqlite: not a usable privacy ledger"):
        PrivacyLedger(junk, "d", 1.0, 0.0)
    with pytest.raises(PolicyError, match="total_epsilon"):
        PrivacyLedger.create(tmp_path / "l.sqlite", "d", 0.0, 0.0)
    with pytest.raises(PolicyError, match="dataset_id"):
        PrivacyLedger.create(tmp_path / "l.sqlite", "", 1.0, 0.0)
    assert not (tmp_path / "l.sqlite").exists()


def test_reserve_is_fail_closed(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1.0, 0.0)
    target = tmp_path / "site_release.json"
    with pytest.raises(RuntimeError, match="computation failed"):
        with ledger.reserve(0.2, 0.0, "fails", {}):
            raise RuntimeError("computation failed")
    assert ledger.spent().epsilon == 0.2  # the charge stays
    with pytest.raises(ValueError, match="not JSON compliant"):
        with ledger.reserve(0.2, 0.0, "fails while writing", {}) as spend:
            spend.write_release(target, {"value": float("nan")})
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    # A refused charge computes nothing: the block never runs.
    ran = []
    with pytest.raises(PrivacyBudgetExceeded):
        with ledger.reserve(0.7, 0.0, "too much", {}):
            ran.append(True)
    assert ran == []
    with ledger.reserve(0.1, 0.0, "ok", {}) as spend:
        digest = spend.write_release(target, {"a": 1})
        with pytest.raises(FednipypeError, match="already has its release"):
            spend.write_release(target, {"a": 1})
    # The one content hash: SHA-256 of the canonical JSON, independent of indentation.
    assert digest == hashlib.sha256(b'{"a":1}').hexdigest()
    assert json.loads(target.read_text()) == {"a": 1}
    assert ledger.audit_trail()[-1].content_sha256 == digest


def test_noise_is_drawn_only_against_an_open_charge_that_covers_it(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 1.0, 1e-5)
    with ledger.reserve(0.5, 1e-6, "two draws", {}) as spend:
        spend.consume(0.3, 6e-7, "first")
        with pytest.raises(PrivacyBudgetExceeded, match="second needs epsilon=0.3"):
            spend.consume(0.3, 4e-7, "second")
        spend.consume(0.2, 4e-7, "second")
    with pytest.raises(PrivacyBudgetExceeded, match="is closed"):
        spend.consume(0.01, 0.0, "late")


def test_atomic_write_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "file.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_write(target) as (handle, _):
            handle.write(b"new, but failing")
            raise ValueError("boom")
    assert target.read_text() == "old"
    with atomic_write(target) as (handle, _):
        handle.write(b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]
