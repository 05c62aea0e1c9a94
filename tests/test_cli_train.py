"""``fednipype-train``'s bad input: one line, a documented exit code, nothing started or written.

Every case here is refused before any Flower process starts or any connection is tried (each
returns within seconds), and the output folder is never created. The runs themselves are in
``test_federated_training*.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fednipype.cli import train
from fednipype.federated.pki import make_local_pki

SITES = ["siteA", "siteB", "siteC"]


def request_doc(**changes) -> dict:
    doc = {
        "schema": "fednipype-training-request/1.0",
        "request_id": "bad-args",
        "sites": SITES,
        "task": "brain-age",
        "regions": ["L_P01", "L_P12"],
        "bounds": {"regions": {"default": [0, 12000]}, "label": [18, 90]},
        "mode": "none",
        "epsilon": None,
        "delta": None,
        "rounds": 2,
        "local_steps": 1,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": None,
        "clip": None,
        "holdout_fraction": 0.2,
        "min_sites": 2,
        "max_participants": 1000,
    }
    doc.update(changes)
    return doc


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("change", "code", "text"),
    [
        ({"--num-shares": "4"}, 2, "--num-shares"),
        ({"--reconstruction-threshold": "3"}, 2, "--reconstruction-threshold"),
        ({"--superlink": "nohostport"}, 2, "--superlink: expected HOST:PORT"),
        ({"--root-certificates": None}, 2, "--root-certificates"),
        ({"--timeout": "0"}, 2, "--timeout"),
        ({"--round-timeout": "-1"}, 2, "--round-timeout"),
        ({"--patience": "-1"}, 2, "--patience"),
        ({"--param-bound": "0"}, 2, "--param-bound"),
        ({"--flwr-home": "x"}, 2, "--flwr-home: only with --connection"),
        ({"--simulate": "sites.json"}, 2, "give one engine"),
        ({"request": {"rounds": 0}}, 3, "rounds"),
        ({"request": {"mode": "dp"}}, 3, "epsilon"),
        ({"request": {"task": "age"}}, 3, "task"),
        ({"request": "not json"}, 3, "request.json"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_starts(tmp_path, capsys, change, code, text):
    pki = make_local_pki(tmp_path / "pki", [])
    request = tmp_path / "request.json"
    body = change.get("request", {})
    text_body = body if isinstance(body, str) else json.dumps(request_doc(**body))
    request.write_text(text_body, encoding="utf-8")
    (tmp_path / "sites.json").write_text(json.dumps([{"site": s} for s in SITES]))
    args = {"--superlink": "127.0.0.1:1", "--root-certificates": str(pki.ca.cert)}
    args.update({k: v for k, v in change.items() if k.startswith("--")})
    argv = [str(request), "-o", str(tmp_path / "out")]
    for key, value in args.items():
        argv += [] if value is None else [key, value]
    tic = time.monotonic()
    assert train.main(argv) == code
    assert time.monotonic() - tic < 10  # refused before any connection attempt
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err
    assert err.startswith("fednipype-train: error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_bad_sites_file_is_one_line_naming_it(tmp_path, capsys):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_doc()), encoding="utf-8")
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps([{"policy": "p.toml"}]), encoding="utf-8")
    argv = [str(request), "--simulate", str(sites), "-o", str(tmp_path / "out")]
    assert train.main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(sites) in err and "'site'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_as_a_process_no_traceback_without_verbose(tmp_path):
    request = tmp_path / "request.json"
    request.write_text("{", encoding="utf-8")
    argv = [sys.executable, "-m", "fednipype.cli.train", str(request), "--simulate"]
    argv += [str(tmp_path / "missing.json"), "-o", str(tmp_path / "out")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
