"""A ledger's life: created once per dataset and bound to its policy; replaced only on purpose."""

from __future__ import annotations

from pathlib import Path

from fednipype.exceptions import FednipypeError, PolicyError
from fednipype.io import atomic_write_text
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy, bind_policy_text

__all__ = ["init_ledger"]


def init_ledger(policy_path: Path, *, reinit: bool = False, reason: str | None = None) -> str:
    """Create the ledger a policy names and bind the policy to it; return the ledger id.

    Parameters
    ----------
    policy_path : Path
        The site policy (TOML); its ``[ledger] id`` is written (or replaced).
    reinit : bool
        Allow replacing a ledger the policy is already bound to (an existing file is kept,
        renamed ``<name>.replaced-<old id>``, and records that it was superseded).
    reason : str, optional
        Why; required with ``reinit``.

    Returns
    -------
    str
        The new ledger id.

    Raises
    ------
    PolicyError
        The policy is bound already (without ``reinit``), the ledger file exists already
        (without ``reinit``), or ``reinit`` has no reason.
    """
    policy = SitePolicy.from_toml(policy_path)
    source, ledger_path = policy.source, policy.ledger_path
    bound = policy.ledger_id is not None or ledger_path.exists()
    if bound and not reinit:
        raise PolicyError(
            f"{source}: the dataset's ledger exists already ({ledger_path}"
            f"{', id ' + policy.ledger_id if policy.ledger_id else ''}); re-initialising starts "
            "a new budget: pass --reinit --reason TEXT if that is the data owner's decision"
        )
    if reinit and not (reason and reason.strip()):
        raise PolicyError(f"{source}: --reinit needs --reason (who decided, and why)")
    text = source.read_text(encoding="utf-8")
    detail = "ledger created"
    if reinit:
        old_id = policy.ledger_id or "unknown"
        detail = f"re-initialised, replacing ledger {old_id}: {reason.strip()}"
        if ledger_path.exists():
            aside = ledger_path.with_name(f"{ledger_path.name}.replaced-{old_id}")
            try:
                old = PrivacyLedger(ledger_path, policy.dataset_id, policy.epsilon, policy.delta)
                old.record_event("superseded", f"replaced by a new ledger: {reason.strip()}")
            except FednipypeError as err:  # an unreadable old ledger is kept as it is
                detail += f" (the old file could not be opened: {err})"
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{ledger_path}{suffix}")
                if part.exists():
                    part.rename(Path(f"{aside}{suffix}"))
    ledger = PrivacyLedger.create(
        ledger_path, policy.dataset_id, policy.epsilon, policy.delta, reason=detail
    )
    atomic_write_text(source, bind_policy_text(text, ledger.ledger_id))
    return ledger.ledger_id
