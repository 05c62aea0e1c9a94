"""A site's SuperNode: its arguments checked before anything starts, then run in the foreground.

``fednipype-site serve`` (:mod:`fednipype.cli.site`) is a thin shell over this module:
:func:`check_site_node` reads every argument and path first (the policy bound to its ledger,
the dataset's ``participants.tsv``, regional features of that dataset's participants, the
consortium's CA certificate and the site's private key, readable by its owner only) and
raises one clear error naming what is wrong; :func:`run_supernode` then runs Flower's own
``flower-supernode`` with TLS (``--root-certificates``), SuperNode authentication
(``--auth-supernode-private-key``) and the node config the client app reads (``site``,
``policy``, ``bids-dir``, ``derivatives``, absolute paths quoted for Flower's parser by
:func:`fednipype.federated.deploy.config_arg`).

The SuperNode runs in its own process group; its output is passed through. SIGINT and
SIGTERM are forwarded to it (Flower deregisters the node and stops its client apps), and a
SuperNode that does not stop within a grace period is killed with its group. Every wait is
bounded: a SuperNode that is not connected after ``max_wait_time`` seconds (Flower's own
``--max-wait-time``, plus a margin for its shut-down) is stopped, and a refusal by the
SuperLink (an unregistered key, a certificate not from the CA) ends the command with one line
saying so. Nothing is written into the dataset or the derivatives: the client app reads
them, and writes only to the site's privacy ledger (beside the policy).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fednipype.exceptions import BIDSError, DataError, FederationError, FednipypeError
from fednipype.federated.deploy import ConfigValue, FlowerProcess, config_arg, stop_processes

__all__ = [
    "CONNECTED",
    "SiteNode",
    "check_site_node",
    "parse_superlink",
    "run_supernode",
    "ServeOutcome",
]

#: The line a SuperNode logs once the SuperLink has accepted it (Flower 1.42).
CONNECTED = re.compile(r"SuperNode ID: (\d+)")
#: Seconds a SuperNode may take to shut down after giving up on an unreachable SuperLink
#: (measured: about 10 s after Flower's own ``--max-wait-time``).
SHUTDOWN_MARGIN = 30.0
#: Lines of the SuperNode's output kept to explain how it ended.
LOG_LINES = 200
#: Flower's default port of a SuperNode's local runtime API.
DEFAULT_RUNTIME_PORT = 9094

_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FEATURES = "_desc-regional_features.tsv"
# What a SuperNode's log says when it cannot join, and the sentence the operator gets.
_REASONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\[code: 2004\]"),
        "the SuperLink at {superlink} refused this site's key {key} (not registered: the "
        "coordinator registers {key}.pub with `flwr supernode register`)",
    ),
    (
        re.compile(r"\[code: 2001\]"),
        "the SuperLink at {superlink} requires SuperNode authentication and refused the key",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"),
        "TLS: the certificate of the SuperLink at {superlink} is not signed by {ca}",
    ),
    (
        re.compile(r"Giving up reconnection|Connection refused|Failed to initialize the conn"),
        "the SuperLink at {superlink} is not reachable (gave up after {wait:g} s)",
    ),
)


def parse_superlink(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (a name, an IPv4 address or ``[IPv6]``) into host and port.

    Raises
    ------
    FederationError
        Not ``HOST:PORT`` with a port from 1 to 65535.

    Examples
    --------
    >>> parse_superlink("hub.example.org:9092"), parse_superlink("[::1]:9092")
    (('hub.example.org', 9092), ('::1', 9092))
    """
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9._-]+):(\d{1,5})", address)
    port = int((match[2] or match[4]) if match else 0)
    if match is None or not 1 <= port <= 65535:
        raise FederationError(
            f"--superlink {address!r}: expected HOST:PORT (e.g. hub.example.org:9092), "
            "a port from 1 to 65535"
        )
    return match[1] or match[3], port


@dataclass(frozen=True)
class SiteNode:
    """A site's SuperNode, its arguments checked (:func:`check_site_node` makes one).

    Attributes
    ----------
    site : str
        The site's public label (one of a request's ``sites``).
    policy, bids_dir, derivatives : Path
        Absolute paths: the site policy (bound to its ledger), the BIDS dataset, the
        participant level's output (regional features).
    superlink : str
        ``HOST:PORT`` of the consortium's SuperLink (Fleet API).
    root_certificates, auth_key : Path
        Absolute paths: the consortium CA's certificate; the site's private key (OpenSSH).
    max_wait_time : float
        Seconds the SuperNode tries to reach the SuperLink before it gives up.
    runtime_port : int
        Port of the SuperNode's local runtime API (on ``127.0.0.1``).
    n_features : int
        Regional-feature tables found for the dataset's participants.
    """

    site: str
    policy: Path
    bids_dir: Path
    derivatives: Path
    superlink: str
    root_certificates: Path
    auth_key: Path
    max_wait_time: float
    runtime_port: int = DEFAULT_RUNTIME_PORT
    n_features: int = 0

    def node_config(self) -> dict[str, ConfigValue]:
        """The node config the client app reads (absolute paths)."""
        return {
            "site": self.site,
            "policy": str(self.policy),
            "bids-dir": str(self.bids_dir),
            "derivatives": str(self.derivatives),
        }

    def argv(self) -> list[str]:
        """The ``flower-supernode`` command line (TLS, node authentication, node config)."""
        return [
            "flower-supernode", "--superlink", self.superlink,
            "--root-certificates", str(self.root_certificates),
            "--auth-supernode-private-key", str(self.auth_key),
            "--max-wait-time", f"{self.max_wait_time:g}",
            "--host", "127.0.0.1", "--port", str(self.runtime_port),
            "--node-config", config_arg(self.node_config()),
        ]  # fmt: skip


def _readable_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{what} {path}: not a file (missing or a folder)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{what} {path}: cannot be read ({err.strerror})") from err


def _check_ca(path: Path) -> None:
    try:
        certificates = x509.load_pem_x509_certificates(_readable_file(path, "--root-certificates"))
    except ValueError:
        certificates = []
    if not certificates:
        raise DataError(
            f"--root-certificates {path}: expected the consortium CA's certificate (PEM)"
        )


def _check_key(path: Path) -> None:
    data = _readable_file(path, "--auth-key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # OpenSSH's own rule for a private key file
        raise DataError(
            f"--auth-key {path}: permissions {mode:04o} let others read the site's private "
            f"key; expected 0600 (chmod 600 {path})"
        )
    try:
        serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DataError(
            f"--auth-key {path}: expected an OpenSSH private key without passphrase "
            '(ssh-keygen -t ecdsa -b 384 -N "")'
        ) from err


def _check_dataset(bids_dir: Path, derivatives: Path) -> int:
    """The number of feature tables of the dataset's participants (BIDSError if none)."""
    # Imported here: the hub side of the federation does not load the site's BIDS stack.
    from fednipype.bids import find_feature_files
    from fednipype.participants import read_participants

    if not (bids_dir / "participants.tsv").is_file():
        raise BIDSError(f"--bids-dir {bids_dir}: no participants.tsv (expected a BIDS dataset)")
    participants = read_participants(bids_dir)
    try:
        tables = find_feature_files(derivatives)
    except (FednipypeError, OSError) as err:
        raise BIDSError(f"--derivatives {derivatives}: no regional features ({err})") from err
    labels = {str(label) for label in participants.index}
    ours = [t for t in tables if t.name.split("_", 1)[0] in labels]
    if not ours:
        raise BIDSError(
            f"--derivatives {derivatives}: none of its {len(tables)} *{_FEATURES} tables "
            f"belongs to a participant of {bids_dir / 'participants.tsv'}"
        )
    return len(ours)


def check_site_node(
    *,
    site: str,
    policy: Path,
    bids_dir: Path,
    derivatives: Path,
    superlink: str,
    root_certificates: Path,
    auth_key: Path,
    max_wait_time: float = 120.0,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
) -> SiteNode:
    """Check every argument of a site's SuperNode before anything starts.

    Parameters
    ----------
    site : str
        The site's public label, ``[A-Za-z0-9._-]{1,64}``.
    policy : Path
        The site policy; it must be bound to its privacy ledger (``fednipype-budget init``).
    bids_dir : Path
        The BIDS dataset (its ``participants.tsv`` is read).
    derivatives : Path
        The participant level's output, with regional features of the dataset's participants.
    superlink : str
        ``HOST:PORT`` of the SuperLink.
    root_certificates : Path
        The consortium CA's certificate (PEM).
    auth_key : Path
        The site's OpenSSH private key, readable by its owner only.
    max_wait_time : float
        Seconds to try to reach the SuperLink (> 0).
    runtime_port : int
        Port of the SuperNode's local runtime API.

    Returns
    -------
    SiteNode
        With absolute paths.

    Raises
    ------
    DataError, BIDSError, PolicyError
        One line naming the argument, the file and what was expected (invalid input: the
        federation itself has not been tried yet).
    """
    # Imported here: the policy and ledger belong to the site, not to the federation's hub.
    from fednipype.site.ledger import PrivacyLedger
    from fednipype.site.policy import SitePolicy

    if not _LABEL.fullmatch(site):
        raise DataError(f"--site {site!r}: expected a public label [A-Za-z0-9._-]{{1,64}}")
    parse_superlink(superlink)
    if not max_wait_time > 0:
        raise DataError(f"--max-wait-time {max_wait_time!r}: expected seconds > 0")
    if not 1 <= runtime_port <= 65535:
        raise DataError(f"--runtime-port {runtime_port}: expected a port from 1 to 65535")
    policy, bids_dir, derivatives = (Path(p).resolve() for p in (policy, bids_dir, derivatives))
    PrivacyLedger.from_policy(SitePolicy.from_toml(policy))  # bound, present, the same ledger
    if not bids_dir.is_dir():
        raise BIDSError(f"--bids-dir {bids_dir}: not a folder")
    if not derivatives.is_dir():
        raise BIDSError(f"--derivatives {derivatives}: not a folder")
    n_features = _check_dataset(bids_dir, derivatives)
    root_certificates, auth_key = Path(root_certificates).resolve(), Path(auth_key).resolve()
    _check_ca(root_certificates)
    _check_key(auth_key)
    node = SiteNode(
        site, policy, bids_dir, derivatives, superlink, root_certificates, auth_key,
        float(max_wait_time), runtime_port, n_features,
    )  # fmt: skip
    node.argv()  # a value Flower's node-config parser cannot carry fails here
    return node


# -- the foreground process ---------------------------------------------------------------------


@dataclass
class ServeOutcome:
    """How a SuperNode run ended.

    Attributes
    ----------
    returncode : int
        The SuperNode's exit code (negative: killed by that signal).
    node_id : int or None
        The id the SuperLink gave it (None: it never connected).
    stopped_by : int or None
        The signal (SIGINT, SIGTERM) forwarded to it, if the run was stopped that way.
    reason : str or None
        Why it could not join or ended on its own (one sentence), None after a forwarded
        signal.
    seconds : float
        Wall time.
    log : deque of str
        The SuperNode's last lines (a service runs for months: the log is not kept whole).
    """

    returncode: int
    node_id: int | None = None
    stopped_by: int | None = None
    reason: str | None = None
    seconds: float = 0.0
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES), repr=False)


def _die_with_parent() -> None:
    # Linux's prctl(PR_SET_PDEATHSIG): the SuperNode gets SIGTERM if this process dies
    # without forwarding (e.g. SIGKILL); the standard library has no binding for it.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the SuperNode starts flower-superexec by name: it must be on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


@contextlib.contextmanager
def _forwarding(handler: Callable[[int], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call ``handler`` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        handler(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _reason(lines: deque[str], node: SiteNode) -> str | None:
    text = "\n".join(lines)
    for pattern, sentence in _REASONS:
        if pattern.search(text):
            return sentence.format(
                superlink=node.superlink,
                key=node.auth_key,
                ca=node.root_certificates,
                wait=node.max_wait_time,
            )
    return None


def run_supernode(
    node: SiteNode,
    *,
    output: TextIO | None = None,
    grace: float = 10.0,
    env: dict[str, str] | None = None,
    on_connect: Callable[[int], None] | None = None,
) -> ServeOutcome:
    """Run ``flower-supernode`` for ``node`` in the foreground until it ends or is stopped.

    Parameters
    ----------
    node : SiteNode
        The checked arguments.
    output : text stream, optional
        Where the SuperNode's output is passed through (default: stderr).
    grace : float
        Seconds between the forwarded signal and SIGKILL of the SuperNode's process group.
    env : dict, optional
        The SuperNode's environment (default: this process's, with this interpreter's folder
        first on PATH). ``FLWR_HOME`` in it says where Flower keeps the installed app.
    on_connect : callable, optional
        Called with the node id once the SuperLink has accepted the SuperNode.

    Returns
    -------
    ServeOutcome
        After SIGINT/SIGTERM (forwarded) or when the SuperNode exited on its own.

    Raises
    ------
    FederationError
        The SuperNode could not join the SuperLink (refused key, TLS, unreachable within
        ``max_wait_time``): one sentence saying which, the SuperNode stopped.
    """
    output = output or sys.stderr
    begin = time.monotonic()
    argv = [_executable(node.argv()[0]), *node.argv()[1:]]
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env or _child_env(), start_new_session=True, preexec_fn=_die_with_parent,
    )  # fmt: skip
    proc = FlowerProcess(f"SuperNode of site {node.site}", argv, Path(os.devnull), popen)
    outcome = ServeOutcome(returncode=0)
    connected = threading.Event()

    def relay() -> None:
        assert popen.stdout is not None
        for raw in iter(popen.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            output.write(line)
            output.flush()
            plain = _ANSI.sub("", line).rstrip()
            outcome.log.append(plain)
            if (found := CONNECTED.search(plain)) and outcome.node_id is None:
                outcome.node_id = int(found[1])
                connected.set()
                if on_connect is not None:
                    on_connect(outcome.node_id)

    reader = threading.Thread(target=relay, name="supernode-output", daemon=True)
    reader.start()
    requested: list[int] = []
    deadline = begin + node.max_wait_time + SHUTDOWN_MARGIN
    try:
        with _forwarding(requested.append):
            while popen.poll() is None:
                if requested:
                    outcome.stopped_by = requested[0]
                    _forward(popen, requested[0])
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        popen.wait(timeout=grace)
                    stop_processes([proc], grace=2.0)  # what is left of its group, if any
                    break
                if not connected.is_set() and time.monotonic() > deadline:
                    stop_processes([proc], grace=grace)
                    break
                time.sleep(0.1)
    finally:
        if popen.poll() is None:  # an exception (or a second signal) in the loop
            stop_processes([proc], grace=grace)
    reader.join(timeout=5.0)
    outcome.returncode = popen.wait()
    outcome.seconds = time.monotonic() - begin
    if outcome.stopped_by is not None:
        return outcome
    outcome.reason = _reason(outcome.log, node)
    if outcome.node_id is None:
        why = outcome.reason or (
            f"not connected to the SuperLink at {node.superlink} after "
            f"{node.max_wait_time:g} s (--max-wait-time)"
        )
        raise FederationError(f"site {node.site}: SuperNode stopped: {why}")
    return outcome


def _forward(popen: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the SuperNode's process group (Flower stops on SIGINT and SIGTERM)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signum)
