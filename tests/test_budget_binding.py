"""The budget cannot be reset by file operations; the ledger composes releases tightly.

Each attack of the privacy-v2 review is played here with the budget exhausted: deleting the
ledger, moving it aside, copying the policy elsewhere, editing the ledger path — each must be
a refusal, never a fresh budget. Expected compositions come from dp-accounting, called here.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fednipype.cli import budget, errors
from fednipype.contract.calibration import analytic_gaussian_sigma
from fednipype.exceptions import PolicyError, PrivacyBudgetExceeded
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy


@pytest.fixture
def exhausted(tmp_path):
    """A bound policy whose whole budget is spent (ten charges of its ε/10)."""
    folder = tmp_path / "owner"
    folder.mkdir()
    policy = folder / "policy.toml"
    policy.write_text(example_policy(dataset="site-x", total_epsilon=1.0, total_delta=1e-5))
    assert budget.main(["init", "--policy", str(policy)]) == 0
    ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    for _ in range(10):
        ledger.charge(0.1, 1e-6, "release", {})
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(0.1, 1e-6, "one more", {})
    return policy


def _refused(policy, capsys, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    assert budget.main(["--policy", str(policy)]) == errors.EXIT_PRIVACY
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_init_binds_policy_and_ledger(tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(example_policy(dataset="site-x", total_epsilon=2.0))
    assert SitePolicy.from_toml(policy).ledger_id is None
    with pytest.raises(PolicyError, match="not bound to a privacy ledger"):
        PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
    assert budget.main(["init", "--policy", str(policy)]) == 0
    bound = SitePolicy.from_toml(policy)
    assert len(bound.ledger_id) == 32
    ledger = PrivacyLedger.from_policy(bound)
    assert ledger.ledger_id == bound.ledger_id
    assert [kind for _, kind, _ in ledger.events()] == ["init"]
    assert "# An example site" in policy.read_text()  # the owner's comments are kept
    capsys.readouterr()
    assert budget.main(["--policy", str(policy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ledger_id"] == bound.ledger_id
    # A second init is refused: it would start a new budget.
    assert budget.main(["init", "--policy", str(policy)]) == errors.EXIT_PRIVACY
    assert "pass --reinit --reason" in capsys.readouterr().err


def test_deleting_the_ledger_is_a_refusal(exhausted, capsys):
    (exhausted.parent / "ledger.sqlite").unlink()
    _refused(exhausted, capsys, "does not exist")


def test_moving_the_ledger_aside_is_a_refusal(exhausted, capsys):
    ledger = exhausted.parent / "ledger.sqlite"
    for suffix in ("", "-wal", "-shm"):
        if ledger.with_name(ledger.name + suffix).exists():
            ledger.with_name(ledger.name + suffix).rename(ledger.with_name(f"old{suffix}"))
    _refused(exhausted, capsys, "does not exist")


def test_a_copied_policy_is_a_refusal(exhausted, tmp_path, capsys):
    """The everyday case: the policy is in git, the ledger is not; a fresh clone starts over."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(exhausted, clone / "policy.toml")
    _refused(clone / "policy.toml", capsys, "does not exist")


def test_editing_the_ledger_path_is_a_refusal(exhausted, tmp_path, capsys):
    text = exhausted.read_text()
    exhausted.write_text(text.replace('path = "ledger.sqlite"', 'path = "fresh.sqlite"'))
    _refused(exhausted, capsys, "does not exist")
    # Pointing it at another dataset's ledger (another id) is refused too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "policy.toml").write_text(example_policy(dataset="site-x", total_epsilon=1.0,
                                                      total_delta=1e-5))  # fmt: skip
    init_ledger(other / "policy.toml")
    exhausted.write_text(text.replace('path = "ledger.sqlite"', f'path = "{other}/ledger.sqlite"'))
    _refused(exhausted, capsys, "is ledger .* but the site policy is bound to ledger")


def test_reinit_is_explicit_and_audited(exhausted, capsys):
    old_id = SitePolicy.from_toml(exhausted).ledger_id
    assert budget.main(["init", "--policy", str(exhausted), "--reinit"]) == errors.EXIT_PRIVACY
    assert "--reinit needs --reason" in capsys.readouterr().err
    argv = ["init", "--policy", str(exhausted), "--reinit", "--reason", "ethics amendment 9"]
    assert budget.main(argv) == 0
    policy = SitePolicy.from_toml(exhausted)
    assert policy.ledger_id != old_id
    ledger = PrivacyLedger.from_policy(policy)
    assert ledger.spent().epsilon == 0.0
    ((_, kind, detail),) = ledger.events()
    assert kind == "init" and f"replacing ledger {old_id}" in detail and "amendment 9" in detail
    # The old ledger is kept aside, with its charges and the record that it was superseded.
    old = PrivacyLedger(exhausted.parent / f"ledger.sqlite.replaced-{old_id}", "site-x", 1.0, 1e-5)
    assert len(old.audit_trail()) == 10
    assert old.events()[-1][1] == "superseded"
    capsys.readouterr()
    assert budget.main(["--policy", str(exhausted)]) == 0
    assert "ethics amendment 9" in capsys.readouterr().out


@pytest.mark.parametrize("k", [1, 3, 10])
def test_spent_epsilon_is_dp_accountings_composition(tmp_path, k):
    """k releases at (1, 1e-5) against a total δ of 1e-4: the ledger's spent ε is the PLD
    composition of k Gaussian mechanisms with the same noise multiplier."""
    sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)  # noise multiplier σ/Δ
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 50.0, 1e-4)
    for _ in range(k):
        ledger.charge(1.0, 1e-5, "release", {}, noise_multiplier=sigma)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(sigma), k)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_event.GaussianDpEvent(sigma), k)
    # PLD is pessimistic by its discretisation (value interval 1e-4): equal to ~1e-6.
    expected = min(float(pld.get_epsilon(1e-4)), 1.0 * k)
    assert ledger.spent().epsilon == pytest.approx(expected, rel=1e-6)
    assert ledger.spent().epsilon <= expected * (1 + 1e-12)
    assert ledger.spent().epsilon <= rdp.get_epsilon(1e-4)
    if k == 10:
        assert 3.0 < ledger.spent().epsilon < 3.3  # basic composition would say 10


def test_composition_admits_more_releases_than_basic_composition(tmp_path):
    sigma = analytic_gaussian_sigma(1.0, 1e-6, 1.0)
    ledger = PrivacyLedger.create(tmp_path / "l.sqlite", "d", 4.0, 1e-5)
    accepted = 0
    with pytest.raises(PrivacyBudgetExceeded, match="remaining epsilon="):
        for _ in range(40):
            ledger.charge(1.0, 1e-6, "release", {}, noise_multiplier=sigma)
            accepted += 1
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(sigma), accepted + 1)
    assert accepted > 4  # basic composition stops at 4
    assert pld.get_epsilon(1e-5) > 4.0  # the refused one really would not fit
    assert math.isclose(ledger.spent().epsilon, ledger.total.epsilon - ledger.remaining().epsilon)
