"""``fednipype-site``: the owner's commands on federated requests, through ``main`` and as a
process (``python -m``), on a real ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import make_request, request_document

from fednipype.cli.site import main
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy


@pytest.fixture
def policy(tmp_path, site_policy):
    return site_policy(tmp_path / "site")


def _ledger(policy) -> PrivacyLedger:
    return PrivacyLedger.from_policy(SitePolicy.from_toml(policy))


def _write(tmp_path, name="request.json", **changes):
    path = tmp_path / name
    path.write_text(json.dumps(request_document(**changes), indent=1), encoding="utf-8")
    return path


def test_approve_a_file_then_list_it(policy, tmp_path, capsys):
    request_file = _write(tmp_path)
    digest = make_request().content_hash
    assert main(["approve", str(request_file), "--policy", str(policy), "--note", "ok"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("approved (for one answer): request age-gm-test")
    assert digest[:16] in out and "epsilon=1, delta=1e-05 per answer" in out
    assert main(["requests", "--policy", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["status", "hash", "request", "mode", "epsilon", "delta", "when"]
    assert lines[1].split()[:6] == ["approved", digest[:12], "age-gm-test", "dp", "1", "1e-05"]
    assert main(["requests", "--policy", str(policy), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["request_hash"] == digest and record["status"] == "approved"
    assert record["note"] == "ok" and record["document"] == make_request().to_document()


def test_approve_and_refuse_a_pending_request_by_its_hash(policy, capsys):
    request = make_request(mode="exact", epsilon=None, delta=None, min_sites=3)
    approvals.record_pending(_ledger(policy), request)
    assert main(["requests", "--policy", str(policy)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:6] == ["pending", request.content_hash[:12], "age-gm-test", "exact", "-", "-"]
    assert main(["approve", request.content_hash[:8], "--policy", str(policy)]) == 0
    captured = capsys.readouterr()
    assert "no noise (a non-DP disclosure)" in captured.out
    # The example policy does not allow exact answers: the owner is told so.
    assert "allow_exact_secure_sum = true" in captured.err
    assert approvals.request_status(_ledger(policy), request.content_hash) == "approved"
    assert main(["refuse", request.content_hash, "--policy", str(policy)]) == 0
    assert capsys.readouterr().out.startswith("refused: request age-gm-test")
    assert approvals.request_status(_ledger(policy), request.content_hash) == "refused"


def _events(policy):
    return _ledger(policy).events()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["approve", "REQUEST"], 3, "REQUEST"),  # replaced by a malformed request file
        (["approve", "abcdef0123"], 3, "no recorded request"),
        (["refuse", "not-a-file"], 3, "8 to 64 hex digits"),
    ],
)
def test_bad_requests_exit_3_with_one_line_and_record_nothing(
    policy, tmp_path, capsys, argv, code, message
):
    if argv[1] == "REQUEST":
        bad = _write(tmp_path, epsilon=-1.0)
        argv = [argv[0], str(bad)]
        message = "field epsilon"
    before = _events(policy)
    assert main([*argv, "--policy", str(policy)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fednipype-site: error: ")
    assert message in err and "Traceback" not in err
    assert _events(policy) == before


def test_an_unbound_policy_is_a_privacy_refusal(tmp_path, site_policy, capsys):
    unbound = site_policy(tmp_path / "u", bind=False)
    request_file = _write(tmp_path)
    assert main(["approve", str(request_file), "--policy", str(unbound)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not bound to a privacy ledger" in err
    assert not (tmp_path / "u" / "ledger.sqlite").exists()


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["approve", "--policy", "p.toml"], ["requests"]]
)
def test_usage_errors_exit_2_on_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fednipype-site")


@pytest.mark.timeout(120)
def test_as_a_process(policy, tmp_path):
    request_file = _write(tmp_path)
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    run = [sys.executable, "-m", "fednipype.cli.site"]
    done = subprocess.run(
        [*run, "approve", str(request_file), "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "approved (for one answer)" in done.stdout
    listed = subprocess.run(
        [*run, "requests", "--policy", str(policy), "--json"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["status"] == "approved"
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=90, env=env)
    assert helped.returncode == 0 and "exit codes:" in helped.stdout
