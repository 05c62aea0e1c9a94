"""Deployment of a federation with real Flower processes: TLS, SuperNode authentication,
refusals, a real ``flwr run`` and the guarantee that no process is left behind.

Certificates are checked with cryptography's own X.509 verifier and OpenSSH keys with
ssh-keygen where present; the live SuperLink's TLS with Python's ``ssl`` (OpenSSL); what a
SuperNode received as node config comes back through a trivial Flower app
(``tests/data/flower_ping_app``) and is compared with what was given. Left-over processes
are looked up in ``/proc`` here, independently of the module under test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from support import live_processes, wait_none_left

from fednipype.exceptions import FederationError
from fednipype.federated.deploy import LocalConsortium, config_arg
from fednipype.federated.pki import make_local_pki, make_node_key

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

PING_APP = Path(__file__).parent / "data" / "flower_ping_app"
SITES = {
    f"site-{c}": {"site": f"site-{c}", "policy": f"/srv/my data/{c}/policy.toml", "rank": i}
    for i, c in enumerate("abc")
}


def runtime_port(proc) -> int:
    """The port of a SuperNode's own runtime API (in its children's command lines too)."""
    return int(proc.argv[proc.argv.index("--port") + 1])


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """SuperLink + three SuperNodes with TLS and auth, shared by the tests of this module;
    after it stops, no process of it may be left."""
    workdir = tmp_path_factory.mktemp("deploy") / "consortium dir"
    begin = time.monotonic()
    with LocalConsortium(workdir, SITES, stop_grace=5.0) as c:
        c.timings["measured_startup_s"] = time.monotonic() - begin
        yield c
    print(f"\nconsortium timings: {json.dumps(c.timings, indent=None)}")
    assert wait_none_left(c.ports, c.workdir) == {}


@pytest.mark.timeout(30)
def test_pki_chain_san_and_openssh_keys(tmp_path):
    pki = make_local_pki(tmp_path, ["site-a", "site-b"], extra_hosts=["hub.example.org"])
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    store = Store([ca])
    now = dt.datetime.now(dt.UTC)
    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("hub.example.org"),
    ):
        verifier = PolicyBuilder().store(store).time(now).build_server_verifier(name)
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    verifier = PolicyBuilder().store(store).time(now)
    with pytest.raises(VerificationError):
        verifier.build_server_verifier(x509.DNSName("elsewhere.example.org")).verify(server, [])
    other_ca = make_local_pki(tmp_path / "other", [])
    foreign = Store([x509.load_pem_x509_certificate(other_ca.ca.cert.read_bytes())])
    with pytest.raises(VerificationError):
        builder = PolicyBuilder().store(foreign).time(now)
        builder.build_server_verifier(x509.DNSName("localhost")).verify(server, [])

    for path in (pki.ca.key, pki.server.key, *(k.private for k in pki.nodes.values())):
        assert path.stat().st_mode & 0o777 == 0o600, path
    for name, key in pki.nodes.items():
        private = serialization.load_ssh_private_key(key.private.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        line = key.public.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(f" {name}\n")
        public = serialization.load_ssh_public_key(line.encode())
        assert public.public_numbers() == private.public_key().public_numbers()
        if shutil.which("ssh-keygen"):  # OpenSSH's own reading of both files
            done = subprocess.run(
                ["ssh-keygen", "-y", "-f", str(key.private)],
                capture_output=True, text=True, timeout=20, check=True,
            )  # fmt: skip
            assert done.stdout.split()[:2] == line.split()[:2]
            done = subprocess.run(
                ["ssh-keygen", "-l", "-f", str(key.public)],
                capture_output=True, text=True, timeout=20, check=True,
            )  # fmt: skip
            assert done.stdout.startswith("384 ") and "(ECDSA)" in done.stdout


@pytest.mark.timeout(30)
def test_config_arg_survives_flowers_parser():
    from flwr.common.config import parse_config_args  # Flower's own reader of the argument

    config = {
        "site": "site-a",
        "policy": "/srv/my data/a b=c/policy.toml",
        "win": "C:\\data\\x",
        "quote": 'say "hi"',
        "apostrophe": "O'Brien's data",
        "n": 3,
        "epsilon": 0.5,
        "tiny": 1e-05,
        "flag": True,
        "empty": "",
        "unicode": "Zürich ü",
    }
    assert parse_config_args([config_arg(config)]) == config
    with pytest.raises(FederationError, match="'both'"):
        config_arg({"both": 'it\'s "x"'})
    with pytest.raises(FederationError, match="key 'bad key'"):
        config_arg({"bad key": 1})


@pytest.mark.timeout(150)
def test_registered_supernodes_online_and_run_completes(consortium):
    c = consortium
    status = c.node_status()
    assert {status[node_id] for node_id in c.node_ids.values()} == {"online"}
    assert len(set(c.node_ids.values())) == len(SITES)

    # the SuperLink speaks TLS with a certificate of the consortium's CA, and only that
    trusted = ssl.create_default_context(cafile=str(c.ca))
    for server_name in ("localhost", "127.0.0.1"):
        with socket.create_connection(("127.0.0.1", c.port), timeout=5) as raw:
            with trusted.wrap_socket(raw, server_hostname=server_name) as tls:
                assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")

    ping = 41
    done = c.run(PING_APP, {"min-nodes": len(SITES), "ping-value": ping}, timeout=120)
    print(f"\nflwr run of the ping app: {done.seconds:.1f} s (run {done.run_id})")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.run_id is not None and done.logs["stdout"].is_file()
    lines = [line for line in done.stdout.splitlines() if line.startswith("PING-RESULT ")]
    assert len(lines) == 1, done.stdout[-2000:]
    result = json.loads(lines[0].removeprefix("PING-RESULT "))
    by_node = {str(node_id): site for site, node_id in c.node_ids.items()}
    assert set(result["answers"]) == set(by_node)
    for node_id, answer in result["answers"].items():
        given = SITES[by_node[node_id]]
        assert answer["answer"] == ping + 1
        assert {k.removeprefix("node."): v for k, v in answer.items() if k != "answer"} == {
            k: str(v) for k, v in given.items()
        }


def assert_refused(c: LocalConsortium, key: str, reason: str, begin: float) -> float:
    """The SuperNode ``key`` (started at ``begin``) exits non-zero within 30 s, with
    ``reason`` in its log and in the first line of the error; returns seconds to its exit."""
    proc = c.processes[key]
    proc.popen.wait(timeout=30)
    seconds = time.monotonic() - begin
    assert proc.popen.returncode != 0
    assert reason in proc.log.read_text()
    with pytest.raises(FederationError) as raised:
        c.wait_online([key], timeout=30.0)
    first = str(raised.value).splitlines()[0]
    assert first.startswith(f"SuperNode '{key}' exited with code") and reason in first
    assert str(proc.log) in first
    assert wait_none_left([runtime_port(proc)]) == {}  # nothing of it is left
    status = c.node_status()
    assert sorted(status.values()).count("online") == len(SITES)
    return seconds


@pytest.mark.timeout(120)
def test_unregistered_key_is_refused(consortium, tmp_path):
    rogue = make_node_key(tmp_path / "rogue.key")
    begin = time.monotonic()
    consortium.start_supernode("site-a", private_key=rogue.private, name="rogue")
    seconds = assert_refused(consortium, "rogue", "[code: 2004] Failed to activate", begin)
    print(f"\nunregistered key: SuperNode refused, exited after {seconds:.1f} s")


@pytest.mark.timeout(120)
def test_supernode_without_the_ca_is_refused(consortium):
    begin = time.monotonic()
    consortium.start_supernode("site-b", use_ca=False, name="no-ca")
    seconds = assert_refused(consortium, "no-ca", "CERTIFICATE_VERIFY_FAILED", begin)
    print(f"\nno CA: SuperNode refused, exited after {seconds:.1f} s")


@pytest.mark.timeout(120)
def test_everything_stops_when_the_body_raises(tmp_path):
    workdir = tmp_path / "raising consortium"
    sites = {"site-a": {"site": "site-a"}, "site-b": {"site": "site-b"}}
    with pytest.raises(RuntimeError, match="body failed"):
        with LocalConsortium(workdir, sites, stop_grace=5.0) as c:
            assert live_processes(c.ports, c.workdir)  # the check sees live processes
            assert "SuperNode ID" in c.wait_log("site-b", r"SuperNode ID: \d+", timeout=30)
            c.kill_node("site-b")
            assert wait_none_left([runtime_port(c.processes["site-b"])]) == {}
            assert c.processes["site-a"].running() and c.processes["superlink"].running()
            raise RuntimeError("body failed")
    assert wait_none_left(c.ports, c.workdir) == {}
    assert not any(proc.running() for proc in c.processes.values())
    begin = time.monotonic()
    with pytest.raises(FederationError, match="supernode list.*failed"):
        c.node_status()  # the SuperLink is gone: a clear error, in bounded time
    assert time.monotonic() - begin < 30


@pytest.mark.timeout(60)
def test_superlink_that_cannot_start_is_named(tmp_path):
    consortium = LocalConsortium(tmp_path / "busy", {"site-a": {}}, startup_timeout=30.0)
    with socket.socket() as squatter:  # another program holds the SuperLink's port
        squatter.bind(("127.0.0.1", consortium.port))
        squatter.listen()
        with pytest.raises(FederationError) as raised:
            with consortium:
                pass
    first = str(raised.value).splitlines()[0]
    assert first.startswith("SuperLink ") and "superlink.log" in first
    assert wait_none_left(consortium.ports, consortium.workdir) == {}
