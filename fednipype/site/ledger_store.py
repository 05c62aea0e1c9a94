"""The privacy ledger's storage: SQLite layout, append-only triggers, connections, row types."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from fednipype._version import __version__
from fednipype.exceptions import PolicyError

__all__ = [
    "SCHEMA_VERSION",
    "AuditRecord",
    "Budget",
    "LedgerRecords",
    "connect",
    "insert_event",
    "now",
    "schema_statements",
    "write_transaction",
]

#: Seconds a process waits for another one's charge to finish before giving up.
BUSY_TIMEOUT_SECONDS = 300.0

#: Version of the ledger's table layout, stored in the file.
SCHEMA_VERSION = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS budget_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    total_epsilon REAL NOT NULL CHECK (total_epsilon > 0),
    total_delta REAL NOT NULL CHECK (total_delta >= 0 AND total_delta < 1),
    reason TEXT NOT NULL,
    software_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charge (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta >= 0 AND delta < 1),
    noise_multiplier REAL CHECK (noise_multiplier IS NULL OR noise_multiplier > 0)
);
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    software_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    charge_id INTEGER NOT NULL UNIQUE REFERENCES charge(id),
    time TEXT NOT NULL,
    purpose TEXT NOT NULL,
    parameters TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    software_version TEXT NOT NULL,
    content_sha256 TEXT CHECK (
        content_sha256 IS NULL
        OR (length(content_sha256) = 64 AND content_sha256 NOT GLOB '*[^0-9a-f]*')
    ),
    released_time TEXT
);
CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: meta cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: meta cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS budget_no_update BEFORE UPDATE ON budget_history
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: budget history cannot be changed');
END;
CREATE TRIGGER IF NOT EXISTS budget_no_delete BEFORE DELETE ON budget_history
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: budget history cannot be deleted');
END;
CREATE TRIGGER IF NOT EXISTS charge_no_update BEFORE UPDATE ON charge
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: charges cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS charge_no_delete BEFORE DELETE ON charge
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: charges cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS event_no_update BEFORE UPDATE ON event
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: events cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS event_no_delete BEFORE DELETE ON event
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: events cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: audit rows cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS audit_hash_once BEFORE UPDATE ON audit
WHEN NOT (
    OLD.content_sha256 IS NULL AND NEW.content_sha256 IS NOT NULL
    AND OLD.released_time IS NULL AND NEW.released_time IS NOT NULL
    AND NEW.id IS OLD.id AND NEW.charge_id IS OLD.charge_id AND NEW.time IS OLD.time
    AND NEW.purpose IS OLD.purpose AND NEW.parameters IS OLD.parameters
    AND NEW.epsilon IS OLD.epsilon AND NEW.delta IS OLD.delta
    AND NEW.software_version IS OLD.software_version
)
BEGIN SELECT RAISE(ABORT,
    'privacy ledger is append-only: an audit row only gets its release hash, once'); END;
"""


def schema_statements() -> list[str]:
    """The layout as single SQL statements, to run inside one transaction."""
    # executescript() would commit the open transaction first, so run statement by statement;
    # sqlite3.complete_statement tells where a statement (a trigger body included) ends.
    statements, current = [], ""
    for line in _SCHEMA.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """One short-lived connection per operation: safe across fork and many processes."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error as err:
        raise PolicyError(f"privacy ledger {path}: cannot open ({err})") from err
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def write_transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """A write transaction holding SQLite's write lock from its first statement."""
    with connect(path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def now() -> str:
    """The current time, UTC, ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def insert_event(conn: sqlite3.Connection, kind: str, detail: str) -> None:
    """Append one row to the ledger's event table inside the caller's transaction."""
    conn.execute(
        "INSERT INTO event (time, kind, detail, software_version) VALUES (?, ?, ?, ?)",
        (now(), kind, detail, __version__),
    )


class Budget(NamedTuple):
    """An (epsilon, delta) pair: a total, an amount spent or an amount remaining."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit trail: one charge and what it paid for.

    Attributes
    ----------
    charge_id : int
        The charge this row documents.
    time : str
        When the charge was made (UTC, ISO 8601).
    purpose : str
        What the budget was spent on.
    parameters : dict
        The statistic/model specification and DP parameters (stored as JSON).
    epsilon, delta : float
        The amount charged.
    software_version : str
        fednipype version that made the charge.
    content_sha256 : str or None
        SHA-256 of the released content, once recorded.
    released_time : str or None
        When the release hash was recorded (UTC, ISO 8601).
    """

    charge_id: int
    time: str
    purpose: str
    parameters: dict[str, Any]
    epsilon: float
    delta: float
    software_version: str
    content_sha256: str | None
    released_time: str | None


class LedgerRecords:
    """Reading a ledger's records (the audit trail, budget history and events) by its path."""

    path: Path

    def audit_trail(self) -> list[AuditRecord]:
        """Every charge with what it paid for, oldest first.

        Returns
        -------
        list of AuditRecord
        """
        with connect(self.path) as conn:
            rows = conn.execute(
                "SELECT charge_id, time, purpose, parameters, epsilon, delta, software_version, "
                "content_sha256, released_time FROM audit ORDER BY id"
            ).fetchall()
        return [
            AuditRecord(
                charge_id=r[0],
                time=r[1],
                purpose=r[2],
                parameters=json.loads(r[3]),
                epsilon=r[4],
                delta=r[5],
                software_version=r[6],
                content_sha256=r[7],
                released_time=r[8],
            )
            for r in rows
        ]

    def budget_history(self) -> list[tuple[str, float, float, str]]:
        """The total budget over time: ``(time, total_epsilon, total_delta, reason)`` rows."""
        with connect(self.path) as conn:
            rows = conn.execute(
                "SELECT time, total_epsilon, total_delta, reason FROM budget_history ORDER BY id"
            ).fetchall()
        return [tuple(r) for r in rows]

    def events(self) -> list[tuple[str, str, str]]:
        """The ledger's life: ``(time, kind, detail)`` rows (``init``, ``superseded``, …)."""
        with connect(self.path) as conn:
            rows = conn.execute("SELECT time, kind, detail FROM event ORDER BY id").fetchall()
        return [tuple(r) for r in rows]

    def record_event(self, kind: str, detail: str) -> None:
        """Append an event to the ledger's life (e.g. that it was superseded, and why)."""
        with write_transaction(self.path) as conn:
            insert_event(conn, kind, detail)
