"""``fednipype-site serve`` with real processes: the arguments it refuses before starting
anything, a real SuperNode that joins a TLS SuperLink with node authentication and answers a
real approved ``dp`` request over a bundled site's features, a clean stop on SIGTERM, and
bounded, one-line failures for an unregistered key and an unreachable SuperLink.

The SuperLink side is :class:`~fednipype.federated.deploy.LocalConsortium` (two sites' SuperNodes
started by it); the third site's SuperNode is ``fednipype-site serve`` itself, a separate
process. Expected counts come from the raw tables (pandas); left-over processes are looked up in
``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import BUNDLED, request_document

import fednipype.federated.app as federated_app
from fednipype.cli.site import main as site_main
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.secure_sum import Grid, SumLayout
from fednipype.federated.deploy import LocalConsortium, free_port, processes_matching
from fednipype.federated.pki import make_local_pki, make_node_key
from fednipype.federated.transport import MAX_SUM_BOUND
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import example_policy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

APP = Path(federated_app.__file__).parent
SITES = ("siteA", "siteB", "siteC")
SERVED = "siteC"  # the site whose SuperNode is `fednipype-site serve`
FEDERATION = '\n[federation]\nmodes = ["dp", "distributed-dp"]\n'


def write_policy(folder: Path, dataset: str) -> Path:
    """A bundled site's policy with a federation table, bound to a fresh ledger."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.toml"
    path.write_text(example_policy(dataset=dataset, total_epsilon=10.0) + FEDERATION)
    init_ledger(path)
    return path


def tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots``: (size, mtime_ns) — to show nothing was written."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def exit_code(argv: list[str]) -> int:
    """``fednipype-site ARGV`` in this process: its exit code (usage errors exit)."""
    try:
        return site_main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def serve_argv(**given: object) -> list[str]:
    argv = ["serve"]
    for key, value in given.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def site_command() -> list[str]:
    beside = Path(sys.executable).parent / "fednipype-site"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "fednipype.cli.site"]


def start_serve(argv: list[str], log_dir: Path, flwr_home: Path) -> subprocess.Popen[bytes]:
    """``fednipype-site serve ...`` as its own process (own session), output to files."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    with (log_dir / "out").open("wb") as out, (log_dir / "err").open("wb") as err:
        return subprocess.Popen(
            [*site_command(), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=env, start_new_session=True,
        )  # fmt: skip


def stop_group(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=10)


def read(path: Path) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))


def last_line(path: Path) -> str:
    return read(path).rstrip().splitlines()[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, bundled_derivatives):
    """Policies of the three bundled sites, a CA and the served site's key (no process)."""
    root = tmp_path_factory.mktemp("site serve")
    policies = {site: write_policy(root / "sites" / site, site) for site in SITES}
    pki = make_local_pki(root / "pki", [SERVED])
    return {
        "root": root,
        "policies": policies,
        "derivatives": bundled_derivatives,
        "ca": pki.ca.cert,
        "key": pki.nodes[SERVED],
    }


@pytest.fixture(scope="module")
def consortium(files):
    """A TLS SuperLink with node auth, SuperNodes of siteA and siteB, the served site's key
    registered; no process of it (or of a `serve` against it) is left afterwards."""
    sites = {
        site: {
            "site": site,
            "policy": str(files["policies"][site]),
            "bids-dir": str(BUNDLED / site),
            "derivatives": str(files["derivatives"][site]),
        }
        for site in SITES
        if site != SERVED
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        with LocalConsortium(files["root"] / "consortium", sites, stop_grace=5.0) as c:
            c.node_ids[SERVED] = c.register(files["key"], SERVED)
            yield c
            pattern = c.process_pattern()
    print(f"\nconsortium timings: {json.dumps(c.timings)}")
    deadline = time.monotonic() + 15
    while processes_matching(pattern, flower_only=False) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_matching(pattern, flower_only=False) == {}


def valid(files, **changes: object) -> dict[str, object]:
    given: dict[str, object] = {
        "policy": files["policies"][SERVED],
        "bids_dir": BUNDLED / SERVED,
        "derivatives": files["derivatives"][SERVED],
        "site": SERVED,
        "superlink": f"127.0.0.1:{free_port()}",
        "root_certificates": files["ca"],
        "auth_key": files["key"].private,
        "max_wait_time": 5,
        "runtime_port": free_port(),
    }
    given.update(changes)
    return {k: v for k, v in given.items() if v is not None}


# -- refusals before anything starts ------------------------------------------------------------


def _bad_files(root: Path, files) -> dict[str, tuple[dict, int, str]]:
    """name -> (argument changes, exit code, text the error line must hold)."""
    root.mkdir(parents=True, exist_ok=True)
    empty = root / "empty dataset"
    empty.mkdir()
    no_features = root / "no features"
    no_features.mkdir()
    (no_features / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    unbound = root / "unbound" / "policy.toml"
    unbound.parent.mkdir()
    unbound.write_text(example_policy(dataset=SERVED, total_epsilon=10.0))
    not_a_cert = root / "ca.crt"
    not_a_cert.write_text("not a certificate\n")
    open_key = make_node_key(root / "open.key").private
    open_key.chmod(0o644)
    public_key = root / "public.key"  # a public key given as the private one
    public_key.write_bytes(files["key"].public.read_bytes())
    public_key.chmod(0o600)
    return {
        "site label": ({"site": "site C"}, 2, "--site"),
        "superlink without port": ({"superlink": "hub.example.org"}, 2, "--superlink"),
        "superlink port range": ({"superlink": "127.0.0.1:70000"}, 2, "--superlink"),
        "max wait zero": ({"max_wait_time": 0}, 2, "--max-wait-time"),
        "missing site": ({"site": None}, 2, "--site"),
        "missing policy file": ({"policy": root / "nope.toml"}, 4, "nope.toml"),
        "unbound policy": ({"policy": unbound}, 4, "not bound"),
        "bids dir missing": ({"bids_dir": root / "nowhere"}, 3, "--bids-dir"),
        "no participants.tsv": ({"bids_dir": empty}, 3, "participants.tsv"),
        "no features": ({"derivatives": no_features}, 3, "--derivatives"),
        "no derivatives folder": ({"derivatives": root / "nowhere"}, 3, "--derivatives"),
        "CA missing": ({"root_certificates": root / "none.crt"}, 3, "--root-certificates"),
        "CA not a certificate": ({"root_certificates": not_a_cert}, 3, "PEM"),
        "key missing": ({"auth_key": root / "none.key"}, 3, "--auth-key"),
        "key readable by others": ({"auth_key": open_key}, 3, "0644"),
        "public key as key": ({"auth_key": public_key}, 3, "OpenSSH private key"),
    }


@pytest.mark.timeout(120)
def test_bad_arguments_are_refused_before_anything_starts(files, tmp_path, capsys):
    bad = _bad_files(tmp_path / "bad", files)
    capsys.readouterr()
    watched = (BUNDLED / SERVED, files["derivatives"][SERVED], files["policies"][SERVED].parent)
    before = tree_state(*watched)
    started = re.compile(re.escape(str(tmp_path)) + "|" + re.escape(str(files["root"])))
    seen: list[str] = []
    for name, (changes, code, text) in bad.items():
        got = exit_code(serve_argv(**valid(files, **changes)))
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        seen.append(f"{name}: exit {got}: {lines[-1] if lines else ''}")
        assert got == code, (name, err)
        assert len(lines) == 1 and lines[0].startswith("fednipype-site"), (name, err)
        assert text in lines[0], (name, lines[0])
        assert out == "", (name, out)
        assert processes_matching(started, flower_only=False) == {}, name
    assert tree_state(*watched) == before
    with capsys.disabled():
        print("\n" + "\n".join(seen))


# -- a real SuperNode --------------------------------------------------------------------------


def expected_n(site: str, derivatives: Path) -> int:
    """Participants with age, sex and group and at least one feature table (pandas)."""
    table = pd.read_csv(BUNDLED / site / "participants.tsv", sep="\t", na_values=["n/a"])
    with_features = {p.name.split("_")[0] for p in derivatives.rglob("*_features.tsv")}
    usable = table.dropna(subset=["age", "sex", "group"])
    return int(usable["participant_id"].isin(with_features).sum())


def charges(policy: Path) -> list[tuple[float, float]]:
    with contextlib.closing(sqlite3.connect(policy.parent / "ledger.sqlite")) as conn:
        return conn.execute("SELECT epsilon, delta FROM charge ORDER BY id").fetchall()


def statuses(policy: Path, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert site_main(["requests", "--policy", str(policy), "--json"]) == 0
    return {r["request_hash"]: r["status"] for r in json.loads(capsys.readouterr().out)}


@pytest.mark.timeout(420)
def test_serve_joins_answers_a_dp_request_and_stops_on_sigterm(files, consortium, capsys):
    c, root = consortium, files["root"]
    doc = request_document(request_id="serve-dp", sites=list(SITES), epsilon=1.0, delta=1e-5)
    request = AnalysisRequest.from_document(doc, source="request.json")
    request_file = root / "serve-request.json"
    request_file.write_text(request.dumps())
    for site in SITES:  # each data owner approves, through the command
        assert (
            site_main(["approve", str(request_file), "--policy", str(files["policies"][site])])
            == 0
        )
    watched = (BUNDLED / SERVED, files["derivatives"][SERVED])
    before = tree_state(*watched)

    log_dir = root / "serve-logs"
    given = valid(files, superlink=c.superlink_address, root_certificates=c.ca, max_wait_time=60)
    port = given["runtime_port"]
    begin = time.monotonic()
    serve = start_serve(serve_argv(**given), log_dir, root / "serve flwr home")
    try:
        c.wait_online([site for site in SITES if site != SERVED])
        deadline = time.monotonic() + 60
        while c.node_status().get(c.node_ids[SERVED]) != "online":
            assert serve.poll() is None, read(log_dir / "err")[-2000:]
            assert time.monotonic() < deadline, read(log_dir / "err")[-2000:]
            time.sleep(0.5)
        online_s = time.monotonic() - begin
        assert f"connected to {c.superlink_address} as node {c.node_ids[SERVED]}" in read(
            log_dir / "out"
        )

        out = root / "serve-out"
        config = {"request": str(request_file), "out-dir": str(out), "timeout": 90.0}
        done = c.run(APP, {**config, "connect-timeout": 60.0}, timeout=300)
        result = json.loads((out / "secure_sum.json").read_text())
        assert result["status"] == "completed", (result["error"], done.stdout[-3000:])
        assert result["contributors"] == list(SITES)

        # the served site charged its ledger once, with the request's (epsilon, delta), and
        # its approval paid for this one answer
        assert charges(files["policies"][SERVED]) == [(1.0, 1e-5)]
        assert statuses(files["policies"][SERVED], capsys)[request.content_hash] == "answered"
        # its slot of the sum holds its noisy count: within 6 sigma of the true count; sigma
        # bounded by the classic Gaussian mechanism's (epsilon <= 1), independent of the code
        layout = SumLayout.from_request(request)
        grid = Grid.for_request(request, capacity=MAX_SUM_BOUND)
        parts = layout.split(grid.decode(np.array(result["sum"], dtype=np.int64)))
        sigma = layout.sensitivity * math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0
        n_true = expected_n(SERVED, files["derivatives"][SERVED])
        n_served = parts.n[request.slot(SERVED)]
        assert abs(n_served - n_true) < 6 * sigma, (n_served, n_true, sigma)

        tic = time.monotonic()
        os.kill(serve.pid, signal.SIGTERM)  # the command itself, not its group
        assert serve.wait(timeout=40) == 0, read(log_dir / "err")[-2000:]
        stop_s = time.monotonic() - tic
        assert last_line(log_dir / "out") == f"site {SERVED}: SuperNode stopped (SIGTERM)"
        ours = re.compile(rf"{re.escape(str(files['key'].private))}|127\.0\.0\.1:{port}(?!\d)")
        assert processes_matching(ours, flower_only=False) == {}
        deadline = time.monotonic() + 20
        while c.node_status().get(c.node_ids[SERVED]) == "online":
            assert time.monotonic() < deadline, "the stopped SuperNode is still online"
            time.sleep(0.5)
    finally:
        stop_group(serve)
    assert tree_state(*watched) == before  # nothing written into the dataset or features
    print(
        f"\nserve: online after {online_s:.1f} s; flwr run {done.seconds:.1f} s (check "
        f"{result['timings_s']['check']:.1f} s, SecAgg+ {result['timings_s']['aggregation']:.1f}"
        f" s); stopped {stop_s:.1f} s after SIGTERM; n {n_served:.1f} vs {n_true} "
        f"(sigma {sigma:.1f})"
    )


def refused(files, name: str, **changes: object) -> tuple[int, float, str]:
    """Run ``serve`` (bounded): its exit code, seconds and last stderr line."""
    log_dir = files["root"] / f"{name}-logs"
    begin = time.monotonic()
    serve = start_serve(serve_argv(**valid(files, **changes)), log_dir, log_dir / "flwr home")
    try:
        code = serve.wait(timeout=90)
    finally:
        stop_group(serve)
    return code, time.monotonic() - begin, last_line(log_dir / "err")


@pytest.mark.timeout(240)
def test_unregistered_key_or_foreign_ca_is_a_clear_bounded_error(files, consortium):
    c = consortium
    rogue = make_node_key(files["root"] / "rogue" / "rogue.key")
    link = {"superlink": c.superlink_address, "max_wait_time": 30}
    # the two refused sites start side by side (separate processes, logs and Flower homes):
    # each spends most of its time importing and shutting down, not talking to the SuperLink
    with ThreadPoolExecutor(max_workers=2) as pool:
        unregistered = pool.submit(
            refused, files, "rogue", auth_key=rogue.private, root_certificates=c.ca, **link
        )
        foreign = pool.submit(refused, files, "foreign-ca", root_certificates=files["ca"], **link)
        outcomes = [unregistered.result(), foreign.result()]
    code, seconds, line = outcomes[0]
    assert code == 6, line  # the SuperLink refused this node
    assert line == (
        f"fednipype-site: error: site {SERVED}: SuperNode stopped: the SuperLink at "
        f"{c.superlink_address} refused this site's key {rogue.private} (not registered: the "
        f"coordinator registers {rogue.private}.pub with `flwr supernode register`)"
    )
    print(f"\nunregistered key: exit {code} after {seconds:.1f} s")

    # the registered key, but a CA that did not sign the SuperLink's certificate
    code, seconds, line = outcomes[1]
    assert code == 6, line  # the SuperLink refused this node
    assert line == (
        f"fednipype-site: error: site {SERVED}: SuperNode stopped: TLS: the certificate of the "
        f"SuperLink at {c.superlink_address} is not signed by {files['ca']}"
    )
    assert {c.node_status()[c.node_ids[s]] for s in ("siteA", "siteB")} == {"online"}
    print(f"foreign CA: exit {code} after {seconds:.1f} s")


@pytest.mark.timeout(120)
def test_unreachable_superlink_is_a_clear_error_within_the_bound(files, tmp_path):
    wait = 4.0
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    given = valid(files, superlink=address, max_wait_time=wait)
    begin = time.monotonic()
    serve = start_serve(serve_argv(**given), tmp_path / "logs", tmp_path / "flwr home")
    try:
        code = serve.wait(timeout=wait + 60)
    finally:
        stop_group(serve)
    seconds = time.monotonic() - begin
    line = last_line(tmp_path / "logs" / "err")
    assert code == 6
    assert line == (
        f"fednipype-site: error: site {SERVED}: SuperNode stopped: the SuperLink at {address} "
        f"is not reachable (gave up after {wait:g} s)"
    )
    assert seconds < wait + 45  # Flower's own --max-wait-time, then its shut-down
    port = re.compile(rf"127\.0\.0\.1:{address.rsplit(':', 1)[1]}(?!\d)")
    assert processes_matching(port, flower_only=False) == {}
    print(f"\nunreachable SuperLink: exit {code} after {seconds:.1f} s (max wait {wait:g} s)")
