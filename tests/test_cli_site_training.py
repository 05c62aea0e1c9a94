"""``fednipype-site`` on training requests: approve a file, list pending ones by hash, refuse;
the listing shows the task, ε, δ and rounds; on a real ledger, through ``main`` and a process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from support import make_request

from fednipype.cli.site import main
from fednipype.contract.training import TRAINING_SCHEMA, TrainingRequest
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy

DOC = {
    "schema": TRAINING_SCHEMA,
    "request_id": "brain-age-2026",
    "sites": ["siteA", "siteB", "siteC"],
    "task": "brain-age",
    "regions": ["L_P01", "R_P01"],
    "bounds": {"regions": {"default": [0, 12000]}, "label": [18, 90]},
    "mode": "dp",
    "epsilon": 4.0,
    "delta": 1e-5,
    "rounds": 20,
    "local_steps": 5,
    "learning_rate": 0.5,
    "l2": 1e-3,
    "sampling_rate": 0.1,
    "clip": 1.0,
    "holdout_fraction": 0.2,
    "min_sites": 2,
    "max_participants": 1000,
}


@pytest.fixture
def policy(tmp_path, site_policy):
    return site_policy(tmp_path / "site")


def _ledger(policy) -> PrivacyLedger:
    return PrivacyLedger.from_policy(SitePolicy.from_toml(policy))


def _write(tmp_path, **changes):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**DOC, **changes}, indent=1), encoding="utf-8")
    return path


def test_approve_a_training_file_then_list_it(policy, tmp_path, capsys):
    request = TrainingRequest.from_document(DOC)
    path = _write(tmp_path)
    assert main(["approve", str(path), "--policy", str(policy), "--note", "irb 7"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(
        "approved (for one run of 20 rounds): training request brain-age-2026"
    )
    assert request.content_hash[:16] in captured.out
    assert "task brain-age, 20 rounds, mode dp, epsilon=4, delta=1e-05 for the whole run" in (
        captured.out
    )
    # The example policy lists no training-dp: the owner is told what the policy needs.
    assert "'training-dp' in [federation] modes" in captured.err
    assert main(["requests", "--policy", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "training requests (epsilon, delta: the whole run's):"
    assert lines[1].split() == [
        "status", "hash", "request", "task", "mode", "epsilon", "delta", "rounds", "when",
    ]  # fmt: skip
    assert lines[2].split()[:8] == [
        "approved", request.content_hash[:12], "brain-age-2026", "brain-age", "dp", "4",
        "1e-05", "20",
    ]  # fmt: skip
    assert main(["requests", "--policy", str(policy), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["kind"], record["task"], record["rounds"]) == ("training", "brain-age", 20)
    assert record["document"] == request.to_document() and record["note"] == "irb 7"


def test_pending_training_and_analysis_requests_listed_apart(policy, capsys):
    ledger = _ledger(policy)
    training = TrainingRequest.from_document(
        {**DOC, "mode": "none", "epsilon": None, "delta": None, "sampling_rate": None,
         "clip": None, "task": "diagnosis", "bounds": {"regions": {"default": [0, 12000]}}}
    )  # fmt: skip
    analysis = make_request()
    approvals.record_pending(ledger, analysis)
    approvals.record_pending(ledger, training)
    assert main(["requests", "--policy", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["status", "hash", "request", "mode", "epsilon", "delta", "when"]
    assert lines[1].split()[:6] == ["pending", analysis.content_hash[:12], "age-gm-test", "dp",
                                    "1", "1e-05"]  # fmt: skip
    assert lines[2] == "" and lines[3].startswith("training requests")
    assert lines[5].split()[:8] == [
        "pending", training.content_hash[:12], "brain-age-2026", "diagnosis", "none", "-", "-",
        "20",
    ]  # fmt: skip
    # Approved by hash: the record's task and rounds are kept with the decision.
    assert main(["approve", training.content_hash[:10], "--policy", str(policy)]) == 0
    captured = capsys.readouterr()
    assert "task diagnosis, 20 rounds, mode none, no noise (a non-DP disclosure)" in captured.out
    assert "allow_non_dp_training = true" in captured.err
    record = next(r for r in approvals.list_requests(ledger) if r.kind == "training")
    assert (record.status, record.task, record.rounds) == ("approved", "diagnosis", 20)
    assert main(["refuse", training.content_hash, "--policy", str(policy)]) == 0
    assert capsys.readouterr().out.startswith("refused: training request brain-age-2026")
    assert approvals.request_status(ledger, training.content_hash) == "refused"


def test_a_malformed_training_file_exits_3_naming_the_field(policy, tmp_path, capsys):
    before = _ledger(policy).events()
    path = _write(tmp_path, rounds=0)
    assert main(["approve", str(path), "--policy", str(policy)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field rounds" in err and "Traceback" not in err
    assert _ledger(policy).events() == before


@pytest.mark.timeout(120)
def test_as_a_process(policy, tmp_path):
    path = _write(tmp_path)
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    run = [sys.executable, "-m", "fednipype.cli.site"]
    done = subprocess.run(
        [*run, "approve", str(path), "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "approved (for one run of 20 rounds)" in done.stdout


def test_approving_a_distributed_request_states_its_trust_assumption(policy, tmp_path, capsys):
    """The owner reads what the request's epsilon rests on and the site's local floor; the
    floor is recomputed here with dp-accounting (the bound at tau = 0: rounds Gaussians of
    multiplier sigma_site / Delta_2 composed with the count's Gaussian)."""
    import dp_accounting
    import numpy as np
    from dp_accounting import rdp

    changes = {"mode": "distributed-dp", "local_steps": 1, "sampling_rate": 1.0, "min_sites": 3}
    request = TrainingRequest.from_document({**DOC, **changes})
    path = _write(tmp_path, **changes)
    assert main(["approve", str(path), "--policy", str(policy)]) == 0
    captured = capsys.readouterr()
    noise = request.distributed_noise()
    accountant = rdp.RdpAccountant(orders=list(1.0 + np.geomspace(0.011, 1e5, 1500)))
    accountant.compose(dp_accounting.GaussianDpEvent(noise.sigma_site / (2**16 + 3**0.5)), 20)
    accountant.compose(dp_accounting.GaussianDpEvent(noise.count_noise_multiplier))
    floor = accountant.get_epsilon(1e-5)
    found = re.search(
        r"note: mode distributed-dp: epsilon=(\S+) holds while the noise shares of 3 sites "
        r"are in every sum the hub unmasks; this site's share alone gives epsilon=(\S+) at "
        r"delta=1e-05 \(its local floor\)",
        captured.out,
    )
    assert found is not None, captured.out
    assert 0.99 * 4.0 <= float(found[1]) <= 4.0
    assert float(found[2]) == pytest.approx(floor, rel=1e-2)  # printed to 3 digits
    assert "'training-distributed-dp' in [federation] modes" in captured.err
