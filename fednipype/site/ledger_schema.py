"""The privacy ledger's SQLite layout: tables, and the triggers that make them append-only."""

from __future__ import annotations

import sqlite3

__all__ = ["SCHEMA_VERSION", "schema_statements"]

#: Version of the ledger's table layout, stored in the file.
SCHEMA_VERSION = "1"

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
    delta REAL NOT NULL CHECK (delta >= 0 AND delta < 1)
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
