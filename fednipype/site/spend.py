"""A charge in progress: what it may still pay for, and the writing of the release it paid for."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fednipype.contract.document import content_hash, dumps
from fednipype.exceptions import FednipypeError, PrivacyBudgetExceeded
from fednipype.io import atomic_write

if TYPE_CHECKING:  # the ledger creates spends; importing it here would be circular
    from fednipype.site.ledger import PrivacyLedger

LOGGER = logging.getLogger(__name__)

__all__ = ["Spend"]

#: Relative slack when checking draws against their charge (binary rounding of splits).
_TOLERANCE = 1e-12


class Spend:
    """An open charge, made by :meth:`fednipype.site.ledger.PrivacyLedger.reserve`.

    Noise is drawn against it (:meth:`consume`, called by
    :meth:`fednipype.site.mechanisms.PreparedStatistic.release`) until its (ε, δ) is used up,
    and the release it paid for is written through it (:meth:`write_release`). It closes when
    the ``reserve`` block ends; a closed spend pays for nothing more.

    Attributes
    ----------
    ledger : PrivacyLedger
        The ledger charged.
    charge_id : int
        The charge's id in the ledger.
    epsilon, delta : float
        The amount charged.
    released : bool
        Whether the release has been written.
    """

    def __init__(self, ledger: PrivacyLedger, charge_id: int, epsilon: float, delta: float):
        self.ledger = ledger
        self.charge_id = charge_id
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.released = False
        self._used = [0.0, 0.0]
        self._open = True

    def consume(self, epsilon: float, delta: float, what: str) -> None:
        """Pay for one noisy draw of (ε, δ) out of this charge.

        Raises
        ------
        PrivacyBudgetExceeded
            If the charge is closed, or what is left of it does not cover (ε, δ).
        """
        where = f"privacy ledger {self.ledger.path}: charge {self.charge_id}"
        if not self._open:
            raise PrivacyBudgetExceeded(f"{where} is closed; {what} needs a charge of its own")
        eps = math.fsum([self._used[0], epsilon])
        dlt = math.fsum([self._used[1], delta])
        if eps > self.epsilon * (1 + _TOLERANCE) or dlt > self.delta * (1 + _TOLERANCE):
            raise PrivacyBudgetExceeded(
                f"{where}: {what} needs epsilon={epsilon:g}, delta={delta:g}, but only "
                f"epsilon={self.epsilon - self._used[0]:g}, delta={self.delta - self._used[1]:g} "
                "of the charge is left"
            )
        self._used = [eps, dlt]

    def close(self) -> None:
        """End the charge: nothing more can be drawn against it."""
        self._open = False

    def write_release(self, path: str | os.PathLike[str], doc: Mapping[str, Any]) -> str:
        """Write the release document atomically, recording its content hash first.

        The document is serialised (:func:`fednipype.contract.document.dumps`) into a hidden
        temporary file; its content hash (:func:`fednipype.contract.document.content_hash`,
        the one hash the hub's report shows too) is recorded in the charge's audit row, and only
        then is the file moved into place, so any release file that exists has its hash in the
        ledger.

        Parameters
        ----------
        path : path-like
            Final path of the release file.
        doc : Mapping
            The release document (already validated by the caller).

        Returns
        -------
        str
            The content hash recorded.
        """
        if self.released:
            raise FednipypeError(
                f"privacy ledger {self.ledger.path}: charge {self.charge_id} already has its "
                "release; each release needs its own charge"
            )
        text = dumps(dict(doc))
        digest = content_hash(dict(doc))
        with atomic_write(Path(path)) as (handle, _):
            handle.write(text.encode("utf-8"))
            handle.flush()
            self.ledger.record_release(self.charge_id, digest)
        self.released = True
        return digest
