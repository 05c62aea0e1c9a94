"""The privacy ledger: a dataset's budget, spent atomically and fail-closed, with an audit log.

The ledger is one SQLite file that belongs to a dataset (not to an output folder). Every
release or training run is *charged* to it before its result exists: a charge either fits in
the dataset's total (epsilon, delta) and is recorded together with its audit row in one
transaction, or it is refused with :class:`~fednipype.exceptions.PrivacyBudgetExceeded`.
Budgets compose by basic composition (sums of epsilon and of delta).

Guarantees and how they are obtained:

* **Atomic spend across processes.** Each charge runs in one ``BEGIN IMMEDIATE`` transaction
  (SQLite's write lock is taken before the spent budget is read), so concurrent processes on
  one machine are serialised and can never jointly overspend. WAL journal mode lets readers
  proceed during a charge; ``synchronous=FULL`` makes a committed charge survive a power cut.
  WAL needs a local file system: do not put a ledger on a network share.
* **Fail-closed.** A charge is committed before any noise is drawn; a process that dies
  afterwards leaves the charge (and its audit row) in place, so budget is lost, never
  over-spent. A refused or invalid charge records nothing.
* **Append-only.** SQLite triggers abort any UPDATE or DELETE of charges, audit rows, the
  dataset identity and the budget history; the only permitted update fills an audit row's
  release hash once. (Triggers protect against code paths and accidental edits; protecting
  the file itself - permissions, backups - is the data owner's job.)
* **Fixed budget.** The ledger stores the dataset identity and its total budget at creation.
  Opening it for another dataset, or with other totals, raises
  :class:`~fednipype.exceptions.PolicyError`: a budget cannot be changed by editing a call.
  A data owner who decides to change the budget does so explicitly with
  :meth:`PrivacyLedger.amend_budget`, which appends a dated, reasoned row to the budget
  history (kept in the ledger), and then updates the site policy to the same totals.

Floating point: spent amounts are summed with :func:`math.fsum` (correctly rounded), and a
charge is admitted when ``spent + requested <= total * (1 + 1e-12)``. The relative tolerance
absorbs the binary rounding of decimal budgets (ten charges of 0.1 fit a total of 1.0) and
never lets the total be exceeded by more than 1e-12 relative.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite"
>>> ledger = PrivacyLedger(path, "demo-dataset", total_epsilon=1.0, total_delta=1e-6)
>>> charge_id = ledger.charge(0.4, 0.0, purpose="mean", parameters={"regions": 3})
>>> ledger.spent()
Budget(epsilon=0.4, delta=0.0)
>>> ledger.remaining().epsilon
0.6
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from fednipype._version import __version__
from fednipype.contract.calibration import check_delta, check_epsilon
from fednipype.exceptions import FednipypeError, PolicyError, PrivacyBudgetExceeded
from fednipype.site.ledger_schema import SCHEMA_VERSION, schema_statements
from fednipype.site.policy import SitePolicy
from fednipype.site.spend import Spend

LOGGER = logging.getLogger(__name__)

#: Relative slack allowed over the total budget, for binary rounding of decimal budgets only.
RELATIVE_TOLERANCE = 1e-12
#: Seconds a process waits for another one's charge to finish before giving up.
BUSY_TIMEOUT_SECONDS = 300.0

_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _fits(spent: float, request: float, total: float) -> bool:
    return math.fsum([spent, request]) <= total * (1.0 + RELATIVE_TOLERANCE)


class PrivacyLedger:
    """The privacy budget ledger of one dataset, on a SQLite file.

    Creating the object creates the file (and its tables) if it does not exist, or opens it and
    checks it belongs to ``dataset_id`` with the same total budget.

    Parameters
    ----------
    path : str or Path
        The ledger file. Its folder must exist.
    dataset_id : str
        Identity of the dataset whose budget this is.
    total_epsilon : float
        Total epsilon of the dataset (finite, > 0).
    total_delta : float
        Total delta of the dataset (0 <= delta < 1).

    Raises
    ------
    PolicyError
        If the totals are invalid, the folder does not exist, the file is not a ledger, or it
        belongs to another dataset or holds other totals.
    """

    def __init__(
        self, path: str | Path, dataset_id: str, total_epsilon: float, total_delta: float
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        where = f"privacy ledger {self.path}"
        self._total = Budget(
            check_epsilon(total_epsilon, f"{where}: total_epsilon"),
            check_delta(total_delta, f"{where}: total_delta"),
        )
        if not isinstance(dataset_id, str) or not dataset_id.strip():
            raise PolicyError(f"{where}: dataset_id must be a non-empty string")
        self.dataset_id = dataset_id
        if not self.path.parent.is_dir():
            raise PolicyError(
                f"{where}: folder {self.path.parent} does not exist (a ledger is never created "
                "in a folder made on the fly: a mistyped path would start a fresh budget)"
            )
        self._open_or_create()

    @classmethod
    def from_policy(cls, policy: SitePolicy) -> PrivacyLedger:
        """Open the ledger a site policy names, with the policy's dataset and totals.

        Parameters
        ----------
        policy : SitePolicy
            The data owner's policy.

        Returns
        -------
        PrivacyLedger
        """
        return cls(policy.ledger_path, policy.dataset_id, policy.epsilon, policy.delta)

    # -- connection ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across fork and many processes.
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except sqlite3.Error as err:
            raise PolicyError(f"privacy ledger {self.path}: cannot open ({err})") from err
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from its first statement."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _open_or_create(self) -> None:
        where = f"privacy ledger {self.path}"
        try:
            with self._connect() as conn:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise PolicyError(f"{where}: cannot switch to WAL journal mode ({mode})")
            with self._write() as conn:
                for statement in schema_statements():
                    conn.execute(statement)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [
                            ("schema_version", SCHEMA_VERSION),
                            ("dataset_id", self.dataset_id),
                            ("created", _now()),
                            ("created_by", f"fednipype {__version__}"),
                        ],
                    )
                    conn.execute(
                        "INSERT INTO budget_history (time, total_epsilon, total_delta, reason, "
                        "software_version) VALUES (?, ?, ?, ?, ?)",
                        (_now(), *self._total, "ledger created", __version__),
                    )
                    LOGGER.info(
                        "created privacy ledger %s for dataset %r with budget epsilon=%g, "
                        "delta=%g",
                        self.path,
                        self.dataset_id,
                        *self._total,
                    )
                    return
        except sqlite3.DatabaseError as err:
            raise PolicyError(f"{where}: not a usable privacy ledger ({err})") from err
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise PolicyError(
                f"{where}: ledger layout version {meta.get('schema_version')!r}, this "
                f"fednipype reads version {SCHEMA_VERSION!r}"
            )
        if meta.get("dataset_id") != self.dataset_id:
            raise PolicyError(
                f"{where}: belongs to dataset {meta.get('dataset_id')!r}, not "
                f"{self.dataset_id!r}; each dataset has its own ledger"
            )
        stored = self._stored_total()
        if stored != self._total:
            raise PolicyError(
                f"{where}: the dataset's total budget is epsilon={stored.epsilon!r}, "
                f"delta={stored.delta!r}, but epsilon={self._total.epsilon!r}, "
                f"delta={self._total.delta!r} was asked for; a budget is changed only with "
                "PrivacyLedger.amend_budget (recorded in the ledger), then in the site policy"
            )

    def _stored_total(self, conn: sqlite3.Connection | None = None) -> Budget:
        query = "SELECT total_epsilon, total_delta FROM budget_history ORDER BY id DESC LIMIT 1"
        if conn is not None:
            row = conn.execute(query).fetchone()
        else:
            with self._connect() as own:
                row = own.execute(query).fetchone()
        if row is None:
            raise PolicyError(f"privacy ledger {self.path}: has no budget recorded")
        return Budget(float(row[0]), float(row[1]))

    # -- budget ----------------------------------------------------------------------------

    @property
    def total(self) -> Budget:
        """The dataset's total budget."""
        return self._total

    @staticmethod
    def _sum(conn: sqlite3.Connection) -> Budget:
        rows = conn.execute("SELECT epsilon, delta FROM charge").fetchall()
        return Budget(math.fsum(r[0] for r in rows), math.fsum(r[1] for r in rows))

    def spent(self) -> Budget:
        """Budget spent so far, over every process that used this ledger.

        Returns
        -------
        Budget
            ``(epsilon, delta)`` summed over all charges (:func:`math.fsum`).
        """
        with self._connect() as conn:
            return self._sum(conn)

    def remaining(self) -> Budget:
        """Budget still available (never negative).

        Returns
        -------
        Budget
            ``(epsilon, delta)``.
        """
        spent = self.spent()
        return Budget(
            max(0.0, self._total.epsilon - spent.epsilon),
            max(0.0, self._total.delta - spent.delta),
        )

    def charge(
        self,
        epsilon: float,
        delta: float,
        purpose: str,
        parameters: Mapping[str, Any],
    ) -> int:
        """Spend budget atomically, before the result it pays for is computed.

        The check against the total and the recording of the charge and of its audit row
        happen in one transaction holding the write lock, so concurrent processes cannot
        overspend. Invalid arguments raise before the ledger is touched.

        Parameters
        ----------
        epsilon : float
            Epsilon to spend (finite, > 0).
        delta : float
            Delta to spend (0 <= delta < 1).
        purpose : str
            What the budget pays for (e.g. ``"release: sufficient statistics"``).
        parameters : Mapping
            The specification and DP parameters, stored as JSON in the audit row
            (JSON-serialisable, no NaN).

        Returns
        -------
        int
            The charge id, to pass to :meth:`record_release`.

        Raises
        ------
        PrivacyBudgetExceeded
            If the charge does not fit in the remaining budget; nothing is recorded.
        PolicyError
            If epsilon or delta are invalid.
        FednipypeError
            If purpose is empty or parameters are not JSON-serialisable.
        """
        where = f"privacy ledger {self.path}: charge"
        epsilon = check_epsilon(epsilon, f"{where} epsilon")
        delta = check_delta(delta, f"{where} delta")
        if not isinstance(purpose, str) or not purpose.strip():
            raise FednipypeError(f"{where}: purpose must be a non-empty string")
        try:
            params_json = json.dumps(dict(parameters), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise FednipypeError(
                f"{where}: parameters must be a JSON-serialisable mapping without NaN ({err})"
            ) from err

        with self._write() as conn:
            total = self._stored_total(conn)
            spent = self._sum(conn)
            if not (
                _fits(spent.epsilon, epsilon, total.epsilon)
                and _fits(spent.delta, delta, total.delta)
            ):
                remaining = Budget(
                    max(0.0, total.epsilon - spent.epsilon), max(0.0, total.delta - spent.delta)
                )
                raise PrivacyBudgetExceeded(
                    f"privacy ledger {self.path} (dataset {self.dataset_id!r}): refused "
                    f"'{purpose}': requested epsilon={epsilon:g}, delta={delta:g}; spent "
                    f"epsilon={spent.epsilon:g}, delta={spent.delta:g} of epsilon="
                    f"{total.epsilon:g}, delta={total.delta:g}; remaining epsilon="
                    f"{remaining.epsilon:g}, delta={remaining.delta:g}"
                )
            charge_id = conn.execute(
                "INSERT INTO charge (epsilon, delta) VALUES (?, ?)", (epsilon, delta)
            ).lastrowid
            conn.execute(
                "INSERT INTO audit (charge_id, time, purpose, parameters, epsilon, delta, "
                "software_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (charge_id, _now(), purpose, params_json, epsilon, delta, __version__),
            )
        LOGGER.info(
            "privacy ledger %s: charge %d epsilon=%g delta=%g for %s",
            self.path,
            charge_id,
            epsilon,
            delta,
            purpose,
        )
        return int(charge_id)

    def record_release(self, charge_id: int, content_sha256: str) -> None:
        """Attach the SHA-256 of the released content to a charge's audit row (once).

        Parameters
        ----------
        charge_id : int
            The id :meth:`charge` returned.
        content_sha256 : str
            Lower-case hexadecimal SHA-256 of the released bytes.

        Raises
        ------
        FednipypeError
            If the hash is malformed, the charge does not exist or already has a hash.
        """
        where = f"privacy ledger {self.path}: charge {charge_id}"
        if not isinstance(content_sha256, str) or not _SHA256.fullmatch(content_sha256):
            raise FednipypeError(
                f"{where}: content_sha256 must be 64 lower-case hex digits, got {content_sha256!r}"
            )
        try:
            with self._write() as conn:
                cur = conn.execute(
                    "UPDATE audit SET content_sha256 = ?, released_time = ? WHERE charge_id = ?",
                    (content_sha256, _now(), int(charge_id)),
                )
                if cur.rowcount != 1:
                    raise FednipypeError(f"{where}: no such charge")
        except sqlite3.IntegrityError as err:
            raise FednipypeError(f"{where}: release hash already recorded ({err})") from err

    def amend_budget(self, total_epsilon: float, total_delta: float, reason: str) -> None:
        """Change the dataset's total budget: the data owner's explicit, recorded decision.

        The new totals and the reason are appended to the ledger's budget history; spending
        already recorded stays. Afterwards, set the same totals in the site policy, otherwise
        opening the ledger from the policy is refused.

        Parameters
        ----------
        total_epsilon : float
            New total epsilon (finite, > 0).
        total_delta : float
            New total delta (0 <= delta < 1).
        reason : str
            Why, and on whose authority (kept in the ledger).

        Raises
        ------
        PolicyError
            If the totals are invalid or no reason is given.
        """
        where = f"privacy ledger {self.path}: amend_budget"
        new = Budget(
            check_epsilon(total_epsilon, f"{where} total_epsilon"),
            check_delta(total_delta, f"{where} total_delta"),
        )
        if not isinstance(reason, str) or not reason.strip():
            raise PolicyError(f"{where}: a reason (who decided, and why) is required")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO budget_history (time, total_epsilon, total_delta, reason, "
                "software_version) VALUES (?, ?, ?, ?, ?)",
                (_now(), *new, reason, __version__),
            )
        LOGGER.warning(
            "privacy ledger %s: total budget changed from epsilon=%g, delta=%g to "
            "epsilon=%g, delta=%g (%s)",
            self.path,
            *self._total,
            *new,
            reason,
        )
        self._total = new

    # -- reading ---------------------------------------------------------------------------

    def audit_trail(self) -> list[AuditRecord]:
        """Every charge with what it paid for, oldest first.

        Returns
        -------
        list of AuditRecord
        """
        with self._connect() as conn:
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
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT time, total_epsilon, total_delta, reason FROM budget_history ORDER BY id"
            ).fetchall()
        return [tuple(r) for r in rows]

    def verify(self) -> None:
        """Check the ledger file is intact and consistent.

        Checks SQLite's ``integrity_check`` and foreign keys, that every charge has exactly
        one audit row with the same amounts, and that the spent budget is within the total.

        Raises
        ------
        FednipypeError
            Naming the first problem found.
        """
        where = f"privacy ledger {self.path}"
        with self._connect() as conn:
            status = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if status != "ok":
                raise FednipypeError(f"{where}: integrity_check failed: {status}")
            if conn.execute("PRAGMA foreign_key_check").fetchall():
                raise FednipypeError(f"{where}: foreign_key_check failed")
            orphans = conn.execute(
                "SELECT count(*) FROM charge c LEFT JOIN audit a ON a.charge_id = c.id "
                "WHERE a.id IS NULL OR a.epsilon != c.epsilon OR a.delta != c.delta"
            ).fetchone()[0]
            if orphans:
                raise FednipypeError(f"{where}: {orphans} charge(s) without a matching audit row")
            spent = self._sum(conn)
            total = self._stored_total(conn)
        if not (_fits(spent.epsilon, 0.0, total.epsilon) and _fits(spent.delta, 0.0, total.delta)):
            raise FednipypeError(f"{where}: spent {spent} exceeds the total {total}")

    # -- spend, compute, release -----------------------------------------------------------

    @contextlib.contextmanager
    def reserve(
        self,
        epsilon: float,
        delta: float,
        purpose: str,
        parameters: Mapping[str, Any],
    ) -> Iterator[Spend]:
        """Charge, then let the caller compute and write its release atomically.

        The charge is made on entering the block (refused before anything is computed if it
        does not fit). Inside the block the caller draws its noise against the yielded
        :class:`~fednipype.site.spend.Spend` (:meth:`PreparedStatistic.release
        <fednipype.site.mechanisms.PreparedStatistic.release>`) and writes the release with
        :meth:`Spend.write_release <fednipype.site.spend.Spend.write_release>`, which writes a
        hidden temporary file, records the release's content hash in the audit row and only
        then moves it into place. If the block fails, or the process dies, the charge stays
        (fail-closed) and no partial release file appears. When the block ends the spend is
        closed: nothing more can be drawn against it.

        Parameters
        ----------
        epsilon, delta : float
            The amount to charge.
        purpose : str
            What the budget pays for.
        parameters : Mapping
            Specification and DP parameters, recorded in the audit row.

        Yields
        ------
        Spend
            The charge, to draw noise against and to write the release with.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from fednipype.contract.document import content_hash
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> ledger = PrivacyLedger(folder / "ledger.sqlite", "demo", 1.0, 0.0)
        >>> with ledger.reserve(0.5, 0.0, "count", {"statistic": "count"}) as spend:
        ...     doc = {"count": 41.7}   # computed after the charge
        ...     _ = spend.write_release(folder / "site_release.json", doc)
        >>> ledger.audit_trail()[0].content_sha256 == content_hash(doc)
        True
        """
        epsilon = check_epsilon(epsilon, f"privacy ledger {self.path}: charge epsilon")
        delta = check_delta(delta, f"privacy ledger {self.path}: charge delta")
        spend = Spend(self, self.charge(epsilon, delta, purpose, parameters), epsilon, delta)
        try:
            yield spend
        except BaseException:
            LOGGER.warning(
                "privacy ledger %s: charge %d stays spent, its release failed",
                self.path,
                spend.charge_id,
            )
            raise
        finally:
            spend.close()
        if not spend.released:
            LOGGER.warning(
                "privacy ledger %s: charge %d was spent without a release file",
                self.path,
                spend.charge_id,
            )
