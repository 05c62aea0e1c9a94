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

* **Tight composition.** Charges compose at the dataset's total δ
  (:mod:`fednipype.site.accountant`): Gaussian releases (charged with their noise
  multiplier) by privacy-loss distributions, other mechanisms by adding their (ε, δ). A charge
  is admitted when the composed ε stays within ``total * (1 + 1e-12)``; the relative
  tolerance absorbs the binary rounding of decimal budgets only.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite"
>>> ledger = PrivacyLedger.create(path, "demo-dataset", total_epsilon=1.0, total_delta=1e-6)
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
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fednipype._version import __version__
from fednipype.contract.calibration import check_delta, check_epsilon, check_positive
from fednipype.exceptions import FednipypeError, PolicyError, PrivacyBudgetExceeded
from fednipype.site.accountant import Charge, composed_epsilon
from fednipype.site.ledger_store import (
    SCHEMA_VERSION,
    Budget,
    LedgerRecords,
    connect,
    insert_event,
    now,
    schema_statements,
    write_transaction,
)
from fednipype.site.policy import SitePolicy
from fednipype.site.spend import Spend

LOGGER = logging.getLogger(__name__)

#: Relative slack allowed over the total budget, for binary rounding of decimal budgets only.
RELATIVE_TOLERANCE = 1e-12

_SHA256 = re.compile(r"[0-9a-f]{64}")
_LEDGER_ID = re.compile(r"[0-9a-f]{32}")


def _fits(spent: float, request: float, total: float) -> bool:
    return math.fsum([spent, request]) <= total * (1.0 + RELATIVE_TOLERANCE)


class PrivacyLedger(LedgerRecords):
    """The privacy budget ledger of one dataset, on a SQLite file.

    Creating the object opens an existing ledger and checks it belongs to ``dataset_id`` with
    the same total budget (and, when given, that it is ledger ``ledger_id``); it never creates
    one: :meth:`create` does, once per dataset (``fednipype-budget init``), and
    :meth:`from_policy` opens the ledger a site policy is bound to. A missing, moved or other
    ledger is a refusal, never a fresh budget.

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
    ledger_id : str, optional
        The ledger's id as recorded in the site policy; checked when given.

    Raises
    ------
    PolicyError
        If the totals are invalid, the file does not exist, is not a ledger, or it belongs to
        another dataset, holds other totals or has another id.
    """

    def __init__(
        self,
        path: str | Path,
        dataset_id: str,
        total_epsilon: float,
        total_delta: float,
        *,
        ledger_id: str | None = None,
    ) -> None:
        self._setup(path, dataset_id, total_epsilon, total_delta)
        if not self.path.is_file():
            raise PolicyError(
                f"privacy ledger {self.path}: does not exist (missing or moved); a missing "
                "ledger is never replaced by a fresh budget: restore it, or create the dataset's "
                "ledger once with `fednipype-budget init --policy POLICY`"
            )
        self._check_existing(ledger_id)

    def _setup(
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

    @classmethod
    def create(
        cls,
        path: str | Path,
        dataset_id: str,
        total_epsilon: float,
        total_delta: float,
        *,
        ledger_id: str | None = None,
        reason: str = "ledger created",
    ) -> PrivacyLedger:
        """Create a dataset's ledger: a new file with a random ledger id (the explicit ``init``).

        Parameters
        ----------
        path : str or Path
            The ledger file; it must not exist, its folder must.
        dataset_id : str
            Identity of the dataset whose budget this is.
        total_epsilon, total_delta : float
            The dataset's total budget.
        ledger_id : str, optional
            32 lower-case hex digits (default: a random UUID4).
        reason : str
            Recorded in the ledger's events (e.g. why a ledger is re-initialised).

        Returns
        -------
        PrivacyLedger

        Raises
        ------
        PolicyError
            If the file exists already (a ledger is never overwritten), or an argument is
            invalid.
        """
        ledger = cls.__new__(cls)
        ledger._setup(path, dataset_id, total_epsilon, total_delta)
        ledger_id = uuid.uuid4().hex if ledger_id is None else ledger_id
        if not _LEDGER_ID.fullmatch(str(ledger_id)):
            raise PolicyError(f"ledger id: expected 32 lower-case hex digits, got {ledger_id!r}")
        if ledger.path.exists():
            raise PolicyError(
                f"privacy ledger {ledger.path}: exists already; a ledger is never overwritten"
            )
        ledger._create(ledger_id, reason)
        ledger._check_existing(ledger_id)
        return ledger

    @classmethod
    def from_policy(cls, policy: SitePolicy) -> PrivacyLedger:
        """Open the ledger a site policy is bound to, with the policy's dataset and totals.

        Parameters
        ----------
        policy : SitePolicy
            The data owner's policy; ``fednipype-budget init`` bound it to its ledger
            (``[ledger] id``).

        Returns
        -------
        PrivacyLedger

        Raises
        ------
        PolicyError
            The policy is not bound to a ledger; the ledger is missing or moved; or it is
            another ledger (other id, dataset or totals).
        """
        if policy.ledger_id is None:
            source = policy.source or "the site policy"
            raise PolicyError(
                f"{source}: 'ledger.id' missing: the policy is not bound to a privacy ledger; "
                f"create the dataset's ledger once with `fednipype-budget init --policy {source}`"
            )
        return cls(
            policy.ledger_path,
            policy.dataset_id,
            policy.epsilon,
            policy.delta,
            ledger_id=policy.ledger_id,
        )

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self.path)

    def _create(self, ledger_id: str, reason: str) -> None:
        where = f"privacy ledger {self.path}"
        try:
            with self._connect() as conn:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise PolicyError(f"{where}: cannot switch to WAL journal mode ({mode})")
            with self._write() as conn:
                for statement in schema_statements():
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", SCHEMA_VERSION),
                        ("dataset_id", self.dataset_id),
                        ("ledger_id", ledger_id),
                        ("created", now()),
                        ("created_by", f"fednipype {__version__}"),
                    ],
                )
                conn.execute(
                    "INSERT INTO budget_history (time, total_epsilon, total_delta, reason, "
                    "software_version) VALUES (?, ?, ?, ?, ?)",
                    (now(), *self._total, "ledger created", __version__),
                )
                insert_event(conn, "init", reason)
        except sqlite3.DatabaseError as err:
            raise PolicyError(f"{where}: cannot create a privacy ledger ({err})") from err
        LOGGER.info(
            "created privacy ledger %s (id %s) for dataset %r with budget epsilon=%g, delta=%g",
            self.path,
            ledger_id,
            self.dataset_id,
            *self._total,
        )

    def _check_existing(self, ledger_id: str | None) -> None:
        where = f"privacy ledger {self.path}"
        try:
            with self._connect() as conn:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
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
        self.ledger_id = str(meta.get("ledger_id"))
        if ledger_id is not None and ledger_id != self.ledger_id:
            raise PolicyError(
                f"{where}: is ledger {self.ledger_id}, but the site policy is bound to ledger "
                f"{ledger_id}; a ledger is never swapped for another (restore the right file)"
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
    def _charges(conn: sqlite3.Connection) -> list[Charge]:
        rows = conn.execute("SELECT epsilon, delta, noise_multiplier FROM charge").fetchall()
        return [Charge(r[0], r[1], r[2]) for r in rows]

    def _spent(self, charges: list[Charge], total: Budget) -> Budget:
        """ε spent at the total δ (composed, :mod:`fednipype.site.accountant`); Σ declared δ."""
        return Budget(composed_epsilon(charges, total.delta), math.fsum(c.delta for c in charges))

    def spent(self) -> Budget:
        """Budget spent so far, over every process that used this ledger.

        Returns
        -------
        Budget
            ``epsilon``: the charges composed at the dataset's total δ
            (:func:`fednipype.site.accountant.composed_epsilon`: PLD composition of the
            Gaussian releases, basic composition for other mechanisms); ``delta``: the sum of
            the charges' own δ.
        """
        with self._connect() as conn:
            charges = self._charges(conn)
            total = self._stored_total(conn)
        return self._spent(charges, total)

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
        *,
        noise_multiplier: float | None = None,
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
        noise_multiplier : float, optional
            σ/Δ when the charge pays for one Gaussian mechanism calibrated to (ε, δ): the
            ledger then composes it tightly with the other Gaussian charges
            (:mod:`fednipype.site.accountant`); without it the charge is composed by adding its
            (ε, δ).

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
        if noise_multiplier is not None:
            noise_multiplier = check_positive(noise_multiplier, f"{where} noise_multiplier")
        try:
            params_json = json.dumps(dict(parameters), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise FednipypeError(
                f"{where}: parameters must be a JSON-serialisable mapping without NaN ({err})"
            ) from err

        with self._write() as conn:
            total = self._stored_total(conn)
            charges = self._charges(conn)
            spent = self._spent(charges, total)
            after = self._spent([*charges, Charge(epsilon, delta, noise_multiplier)], total)
            if not _fits(after.epsilon, 0.0, total.epsilon):
                remaining = max(0.0, total.epsilon - spent.epsilon)
                raise PrivacyBudgetExceeded(
                    f"privacy ledger {self.path} (dataset {self.dataset_id!r}): refused "
                    f"'{purpose}': requested epsilon={epsilon:g}, delta={delta:g}; spent "
                    f"epsilon={spent.epsilon:g} of epsilon={total.epsilon:g} (at delta="
                    f"{total.delta:g}); remaining epsilon={remaining:g}"
                )
            charge_id = conn.execute(
                "INSERT INTO charge (epsilon, delta, noise_multiplier) VALUES (?, ?, ?)",
                (epsilon, delta, noise_multiplier),
            ).lastrowid
            conn.execute(
                "INSERT INTO audit (charge_id, time, purpose, parameters, epsilon, delta, "
                "software_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (charge_id, now(), purpose, params_json, epsilon, delta, __version__),
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
                    (content_sha256, now(), int(charge_id)),
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
                (now(), *new, reason, __version__),
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
            total = self._stored_total(conn)
            spent = self._spent(self._charges(conn), total)
        if not _fits(spent.epsilon, 0.0, total.epsilon):
            raise FednipypeError(f"{where}: spent {spent} exceeds the total {total}")

    # -- spend, compute, release -----------------------------------------------------------

    @contextlib.contextmanager
    def reserve(
        self,
        epsilon: float,
        delta: float,
        purpose: str,
        parameters: Mapping[str, Any],
        *,
        noise_multiplier: float | None = None,
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
        noise_multiplier : float, optional
            As for :meth:`charge`.

        Yields
        ------
        Spend
            The charge, to draw noise against and to write the release with.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from fednipype.contract.document import content_hash
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> ledger = PrivacyLedger.create(folder / "ledger.sqlite", "demo", 1.0, 0.0)
        >>> with ledger.reserve(0.5, 0.0, "count", {"statistic": "count"}) as spend:
        ...     doc = {"count": 41.7}   # computed after the charge
        ...     _ = spend.write_release(folder / "site_release.json", doc)
        >>> ledger.audit_trail()[0].content_sha256 == content_hash(doc)
        True
        """
        epsilon = check_epsilon(epsilon, f"privacy ledger {self.path}: charge epsilon")
        delta = check_delta(delta, f"privacy ledger {self.path}: charge delta")
        charge_id = self.charge(
            epsilon, delta, purpose, parameters, noise_multiplier=noise_multiplier
        )
        spend = Spend(self, charge_id, epsilon, delta)
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
