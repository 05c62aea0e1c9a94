"""Start, watch and stop a Flower deployment: a SuperLink and one SuperNode per site.

:class:`LocalConsortium` runs a whole consortium on one machine (loopback, free ports) with
the production security settings: TLS from a local CA (:mod:`fednipype.federated.pki`) and
SuperNode authentication (each site's public key registered with the SuperLink)::

    sites = {"site-a": {"site": "site-a", "policy": "a.toml"}, "site-b": {...}}
    with LocalConsortium(workdir, sites) as c:     # SuperLink + SuperNodes online
        done = c.run(app_dir, run_config={"request": "request.json"}, timeout=300)
        c.kill_node("site-b")                      # a site's machine dies (SIGKILL)
    # every process started is stopped here, also when the body raised

Stable interface: the constructor, ``run``, ``kill_node``, ``wait_log``, ``start_supernode``,
``wait_online``, ``node_status``, ``flwr``, ``stop``, ``cli_env`` and ``connection``,
``flwr_home``, ``superlink_address``, ``node_ids``, ``ports``, ``logs``, ``timings``.

Production commands
-------------------
With certificates from the consortium's CA (``ca.crt``; the SuperLink's certificate names
the coordinator's host in its subjectAltName), at the coordinator (port 9092 open to the
sites; keep ``state.db``, it holds the registered keys)::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt \\
        --ssl-keyfile superlink.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation \\
        --host 0.0.0.0 --port 9092 --database state.db

and its ``$FLWR_HOME/config.toml`` (the CA's path must be absolute)::

    [superlink]
    default = "consortium"

    [superlink.consortium]
    address = "hub.example.org:9092"
    root-certificates = "/etc/fednipype/ca.crt"

Each site makes its key pair once (the same files as
:func:`fednipype.federated.pki.make_node_key`) and sends only ``site-a.key.pub``::

    ssh-keygen -t ecdsa -b 384 -N "" -f site-a.key

The coordinator registers it (this prints the site's node id) and checks the list::

    flwr supernode register site-a.key.pub consortium --name site-a
    flwr supernode list consortium --format json

Each site runs its SuperNode as a service (the private key never leaves the site)::

    flower-supernode --superlink hub.example.org:9092 --root-certificates ca.crt \\
        --auth-supernode-private-key site-a.key --port 9094 \\
        --node-config "site='site-a' policy='/srv/fednipype/policy.toml'
                       bids-dir='/data/bids' derivatives='/data/derivatives'"

The coordinator then runs each analysis::

    flwr run APP_DIR consortium --stream --run-config "request='request.json'"
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fednipype.exceptions import FederationError
from fednipype.federated.pki import LocalPKI, NodeKey, make_local_pki

LOGGER = logging.getLogger(__name__)

ConfigValue = str | int | float | bool

_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# the lines of a Flower log that say why a process failed (or a SuperNode was refused)
_REASON = re.compile(r"\[code: \d+\].*|.*CERTIFICATE_VERIFY_FAILED.*|\[Errno \d+\].*|ERROR.*")


def _toml_value(key: str, value: ConfigValue) -> str:
    # Flower cuts "k=v k=v" with the regex (\S+?)=('[^']*'|"[^"]*"|\S+) and reads each v as
    # TOML: a string is a literal '...' (no escapes) unless it holds ' or a control character
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # 'inf', '-inf' and 'nan' are TOML floats too
    if not isinstance(value, str):
        raise FederationError(f"config key {key!r}: expected str, int, float or bool")
    controls = any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    if "'" not in value and not controls:
        return f"'{value}'"
    if '"' in value:
        raise FederationError(f"config key {key!r}: a value with both ' and \" cannot pass")
    escaped = (
        "\\\\" if ch == "\\" else f"\\u{ord(ch):04X}" if ord(ch) < 32 or ord(ch) == 127 else ch
        for ch in value
    )
    return '"' + "".join(escaped) + '"'


def config_arg(config: Mapping[str, ConfigValue]) -> str:
    """Format a mapping (TOML bare keys to str, int, float or bool) as Flower's
    ``--node-config`` / ``--run-config`` argument; strings are quoted so that spaces, ``=``
    and backslashes survive Flower's parser.

    Examples
    --------
    >>> config_arg({"site": "site-a", "policy": "/srv/my site/policy.toml", "n": 3})
    "site='site-a' policy='/srv/my site/policy.toml' n=3"
    """
    parts = []
    for key, value in config.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise FederationError(f"config key {key!r}: expected [A-Za-z0-9_-] (dots to nest)")
        parts.append(f"{key}={_toml_value(key, value)}")
    return " ".join(parts)


def write_flwr_config(flwr_home: Path, connection: str, address: str, ca_cert: Path) -> Path:
    """Write ``flwr_home/config.toml`` (returned): a TLS connection ``[superlink.<connection>]``
    to ``address``, the default one, trusting ``ca_cert`` (written absolute, as ``flwr``
    requires)."""
    section = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"superlink": {"default": connection, connection: section}})
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")
    return flwr_home / "config.toml"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# The process table is read from /proc (Linux) by hand: psutil is not a dependency and the
# standard library lists no processes.
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    return (_stat(pid) or ("X",))[0] not in {"Z", "X"}


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_matching(pattern: re.Pattern[str], *, flower_only: bool = True) -> dict[int, str]:
    """pid -> command line of the live processes of this user with an argument matching
    ``pattern`` (by default only Flower's own ``flower-*`` and ``flwr*`` commands)."""
    found = {}
    for pid in _pids():
        try:
            if pid == os.getpid() or os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        args = [arg for arg in argv.split("\0") if arg]
        flower = any(Path(arg).name.startswith(("flower-", "flwr")) for arg in args[:2])
        if (flower or not flower_only) and any(map(pattern.search, args)) and _alive(pid):
            found[pid] = " ".join(args)
    return found


@dataclass
class FlowerProcess:
    """A process started by :func:`start_process`, leader of its own process group;
    ``name`` says what it is in messages, ``log`` holds its stdout and stderr."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """The process id, also its process group id."""
        return self.popen.pid

    def running(self) -> bool:
        """Whether it has not exited yet."""
        return self.popen.poll() is None

    def tail(self, lines: int = 12) -> str:
        """The last ``lines`` lines of its log, without ANSI colours."""
        text = _read(self.log)
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def failure(self, what: str) -> FederationError:
        """A FederationError: its name, ``what`` and the reason its log gives (the last
        error line) on the first line; the log's last lines below."""
        reasons = _REASON.findall(self.tail(60))
        why = f": {reasons[-1].strip()}" if reasons else ""
        tail = "\n".join(f"  | {line}" for line in self.tail().splitlines())
        return FederationError(f"{self.name} {what}{why} (log: {self.log})\n{tail}".rstrip())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _executable(name: str) -> str:
    """A Flower command next to this interpreter (a venv not on PATH), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name}: not found next to {sys.executable} nor on PATH")
    return found


def _child_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the SuperLink and the SuperNode start flower-superexec by name: it must be on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_process(name: str, argv: list[str], log: Path, env: Mapping[str, str]) -> FlowerProcess:
    """Start ``argv`` in a new session (its own process group), output appended to ``log``.

    ``argv[0]`` is looked up next to this interpreter first, then on PATH; the process runs
    in ``log``'s folder with environment ``env``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [_executable(argv[0]), *argv[1:]]
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=dict(env), cwd=log.parent, start_new_session=True,
        )  # fmt: skip
    LOGGER.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return FlowerProcess(name=name, argv=argv, log=log, popen=popen)


def _signal_all(roots: list[FlowerProcess], pids: set[int], sig: signal.Signals) -> None:
    for proc in roots:
        if proc.pid != os.getpgrp():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(roots: list[FlowerProcess], pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while True:
        for proc in roots:
            proc.popen.poll()  # reaps our own children
        left = {pid for pid in pids if _alive(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def stop_processes(
    processes: Iterable[FlowerProcess], *, grace: float = 10.0, also: re.Pattern[str] | None = None
) -> list[str]:
    """Stop processes, their process groups and all descendants: SIGTERM, then SIGKILL
    after ``grace`` seconds; returns the command lines that needed SIGKILL.

    Descendants in other sessions (Flower starts the SuperLink's ``flower-superexec``
    detached) are found in the process table before the first signal; ``also`` (a pattern
    for :func:`processes_matching`) catches the ones already orphaned.
    """
    roots = list(processes)
    pids = {proc.pid for proc in roots if proc.running()}
    pids |= _descendants(proc.pid for proc in roots)
    if also is not None:
        pids |= set(processes_matching(also))
    pids.discard(os.getpid())
    _signal_all(roots, pids, signal.SIGTERM)
    left = _wait_gone(roots, pids, grace)
    killed = []
    if left:
        killed = [_read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ") for pid in left]
        _signal_all(roots, pids, signal.SIGKILL)
        left = _wait_gone(roots, pids, 5.0)
    for proc in roots:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=1.0)
    if left:
        LOGGER.warning("processes still alive after SIGKILL: %s", sorted(left))
    return killed


@dataclass(frozen=True)
class CompletedRun:
    """The outcome of one ``flwr run``: exit code, output (``--stream`` brings the
    ServerApp's log into ``stdout``), wall time, the run's id on the SuperLink (None if it
    did not start) and the log files (``stdout``, ``stderr``, every process's log)."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    run_id: int | None
    logs: dict[str, Path] = field(default_factory=dict)


class LocalConsortium:
    """A SuperLink and one SuperNode per site on this machine, with TLS and node auth.

    Parameters
    ----------
    workdir : Path
        Folder (spaces allowed) for keys (``pki/``), the SuperLink's state, each site's
        Flower home (``sites/<site>/``), the ``flwr`` home and all logs (``logs/``).
    sites : mapping of str to mapping
        Site name (``[A-Za-z0-9._-]``) -> its SuperNode's node config.
    host, connection : str
        Loopback address used; name of the ``flwr`` connection.
    startup_timeout, stop_grace : float
        Seconds the SuperLink, then the SuperNodes, may take to come up; seconds between
        SIGTERM and SIGKILL when stopping.
    supernode_max_wait : float or None
        ``--max-wait-time`` of each SuperNode (how long it retries a lost SuperLink).
    """

    def __init__(
        self,
        workdir: Path,
        sites: Mapping[str, Mapping[str, ConfigValue]],
        *,
        host: str = "127.0.0.1",
        connection: str = "fednipype-local",
        startup_timeout: float = 60.0,
        stop_grace: float = 10.0,
        supernode_max_wait: float | None = 120.0,
    ) -> None:
        if not sites:
            raise FederationError("LocalConsortium sites: expected at least one site")
        self.workdir = Path(workdir).resolve()
        self.sites = {name: dict(config) for name, config in sites.items()}
        for config in self.sites.values():
            config_arg(config)  # a value Flower cannot read fails here, before any process
        self.host, self.connection = host, connection
        self.startup_timeout, self.stop_grace = startup_timeout, stop_grace
        self.supernode_max_wait = supernode_max_wait
        self.flwr_home = self.workdir / "flwr-home"
        self.log_dir = self.workdir / "logs"
        self.port = free_port(host)
        self.superlink_address = f"{host}:{self.port}"
        self.pki: LocalPKI | None = None
        self.node_ids: dict[str, int] = {}
        self.processes: dict[str, FlowerProcess] = {}
        self.timings: dict[str, float] = {}
        self.ports = [self.port]
        self._runs = 0

    def __enter__(self) -> LocalConsortium:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Make the keys, start the SuperLink, register and start the SuperNodes, wait."""
        begin = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = make_local_pki(self.workdir / "pki", list(self.sites))
        write_flwr_config(self.flwr_home, self.connection, self.superlink_address, self.ca)
        self._start_superlink()
        self.timings["superlink_ready_s"] = time.monotonic() - begin
        keys = self.pki.nodes
        with ThreadPoolExecutor(max_workers=4) as pool:  # K `flwr` start-ups side by side
            ids = list(pool.map(self.register, keys.values(), keys))
        self.node_ids.update(zip(keys, ids, strict=True))
        for site in self.sites:
            self.start_supernode(site)
        self.wait_online(list(self.sites))
        self.timings["startup_s"] = time.monotonic() - begin

    def stop(self) -> None:
        """Stop every process this consortium started (idempotent, bounded)."""
        begin = time.monotonic()
        procs = list(self.processes.values())
        killed = stop_processes(procs, grace=self.stop_grace, also=self.process_pattern())
        if killed:
            LOGGER.warning("needed SIGKILL: %s", "; ".join(killed))
        self.timings["stop_s"] = time.monotonic() - begin

    def process_pattern(self) -> re.Pattern[str]:
        """Matches an argument naming the workdir or one of its ``host:port``s (processes)."""
        ports = "|".join(str(port) for port in self.ports)
        host = re.escape(self.host)
        return re.compile(rf"{re.escape(str(self.workdir))}|(?<![\d.]){host}:({ports})(?!\d)")

    @property
    def ca(self) -> Path:
        """The consortium CA's certificate (made by ``start``)."""
        return self.workdir / "pki" / "ca.crt"

    @property
    def logs(self) -> dict[str, Path]:
        """Log file of every process started, by key (``superlink``, the site names)."""
        return {key: proc.log for key, proc in self.processes.items()}

    def cli_env(self) -> dict[str, str]:
        """Environment for a ``flwr`` command against this consortium (``FLWR_HOME`` set)."""
        return _child_env(self.flwr_home)

    def _start_superlink(self) -> None:
        assert self.pki is not None
        state = self.workdir / "superlink"
        argv = [
            "flower-superlink", "--ssl-ca-certfile", str(self.pki.ca.cert),
            "--ssl-certfile", str(self.pki.server.cert),
            "--ssl-keyfile", str(self.pki.server.key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
            "--database", str(state / "state.db"),
        ]  # fmt: skip
        state.mkdir(parents=True, exist_ok=True)
        env = _child_env(state / "flwr-home")
        proc = start_process("SuperLink", argv, self.log_dir / "superlink.log", env)
        self.processes["superlink"] = proc
        deadline = time.monotonic() + self.startup_timeout
        while not self._tls_handshake():
            if not proc.running():
                code = proc.popen.returncode
                raise proc.failure(f"exited ({code}) before serving {self.superlink_address}")
            if time.monotonic() > deadline:
                raise proc.failure(f"not reachable after {self.startup_timeout:g} s")
            time.sleep(0.1)

    def _tls_handshake(self) -> bool:
        """Whether the SuperLink answers TLS with our CA's certificate (not just any port)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as raw:
                with context.wrap_socket(raw, server_hostname=self.host):
                    return True
        except OSError:  # refused, timed out, or ssl.SSLError
            return False

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with this consortium's ``FLWR_HOME``, bounded by ``timeout``."""
        try:
            return subprocess.run(
                [_executable("flwr"), *args], capture_output=True, text=True,
                env=self.cli_env(), cwd=self.workdir, timeout=timeout, start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise FederationError(f"`flwr {' '.join(args)}`: no answer in {timeout:g} s") from err

    def _flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, object]:
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        text = done.stdout
        try:
            document, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
        except ValueError:
            document = {}
        if done.returncode != 0 or not isinstance(document, dict) or not document.get("success"):
            reason = document.get("error-message") if isinstance(document, dict) else None
            lines = str(reason or done.stderr or text or "no output").strip().splitlines()
            raise FederationError(
                f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {lines[-1]}"
            )
        return document

    def register(self, key: NodeKey, name: str) -> int:
        """``flwr supernode register``: allow a SuperNode's key; returns its node id."""
        args = ("supernode", "register", str(key.public), self.connection, "--name", name)
        return int(str(self._flwr_json(*args)["node-id"]))

    def start_supernode(
        self,
        site: str,
        *,
        private_key: Path | None = None,
        use_ca: bool = True,
        name: str | None = None,
    ) -> FlowerProcess:
        """Start a SuperNode with ``site``'s node config, under ``name`` (default: the
        site) in ``processes``; ``private_key`` replaces the site's registered key, and
        ``use_ca=False`` leaves out ``--root-certificates`` (then only system CAs count)."""
        if site not in self.sites or self.pki is None:
            raise FederationError(f"site {site!r}: not one of {sorted(self.sites)} (started?)")
        key = name or site
        port = free_port(self.host)
        self.ports.append(port)
        keyfile = private_key or self.pki.nodes[site].private
        argv = ["flower-supernode", "--superlink", self.superlink_address, "--host", self.host]
        argv += ["--port", str(port), "--auth-supernode-private-key", str(keyfile)]
        argv += ["--root-certificates", str(self.pki.ca.cert)] if use_ca else []
        if self.supernode_max_wait is not None:
            argv += ["--max-wait-time", f"{self.supernode_max_wait:g}"]
        if self.sites[site]:
            argv += ["--node-config", config_arg(self.sites[site])]
        env = _child_env(self.workdir / "sites" / key / "flwr-home")
        log = self.log_dir / f"supernode-{key}.log"
        self.processes[key] = start_process(f"SuperNode {key!r}", argv, log, env)
        return self.processes[key]

    def node_status(self) -> dict[int, str]:
        """The SuperLink's view: node id -> status (``registered``, ``online``, ...)."""
        nodes = self._flwr_json("supernode", "list", self.connection).get("nodes", [])
        if not isinstance(nodes, list):
            raise FederationError("`flwr supernode list`: expected a list of nodes")
        return {int(node["node-id"]): str(node["status"]) for node in nodes}

    def wait_online(self, sites: list[str], timeout: float | None = None) -> None:
        """Wait until the SuperLink lists the SuperNodes of ``sites`` as online; raise
        FederationError when one exits (refused: the reason from its log) or ``timeout``
        seconds (default ``startup_timeout``) run out."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for site in sites:
                proc = self.processes[site]
                if not proc.running():
                    raise proc.failure(
                        f"exited with code {proc.popen.returncode} before coming online at "
                        f"{self.superlink_address}"
                    )
            status = self.node_status()
            waiting = {s: status.get(self.node_ids.get(s, -1), "unknown") for s in sites}
            waiting = {s: v for s, v in waiting.items() if v != "online"}
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise FederationError(
                    f"SuperNodes not online after {timeout:g} s at {self.superlink_address}: "
                    + ", ".join(f"{s} ({v})" for s, v in waiting.items())
                    + f" (logs: {self.log_dir})"
                )
            time.sleep(0.5)

    def wait_log(self, key: str, pattern: str, timeout: float = 60.0) -> str:
        """Wait until the log of process ``key`` has a line matching ``pattern`` (e.g. a
        SuperNode's ``Receiving: train message``, to kill it mid-run); returns that line."""
        deadline = time.monotonic() + timeout
        while not (found := re.search(f".*{pattern}.*", self.processes[key].tail(10**6))):
            if time.monotonic() > deadline:
                raise self.processes[key].failure(f"logged no {pattern!r} in {timeout:g} s")
            time.sleep(0.2)
        return found[0]

    def kill_node(self, site: str) -> None:
        """Kill a SuperNode and all it started with SIGKILL: a site that dies mid-run."""
        if (proc := self.processes.get(site)) is None:
            raise FederationError(f"site {site!r}: no SuperNode started under that name")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.popen.wait(timeout=10.0)
        except subprocess.TimeoutExpired as err:
            raise proc.failure("still alive 10 s after SIGKILL") from err

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, ConfigValue] | None = None,
        *,
        timeout: float = 300.0,
        check: bool = False,
    ) -> CompletedRun:
        """``flwr run APP_DIR CONNECTION --stream [--run-config RUN_CONFIG]``.

        Past ``timeout`` seconds the run is stopped (``flwr stop``) and FederationError
        raised; with ``check``, a non-zero exit raises it too. ``run_config`` overrides the
        app's ``[tool.flwr.app.config]``.
        """
        self._runs += 1
        argv = [_executable("flwr"), "run", str(Path(app_dir).resolve()), self.connection]
        argv += ["--stream", *(["--run-config", config_arg(run_config)] if run_config else [])]
        out_path, err_path = (self.log_dir / f"run-{self._runs}.{n}" for n in ("out", "err"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        begin = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=self.cli_env(), cwd=self.workdir, start_new_session=True,
            )  # fmt: skip
        proc = FlowerProcess("flwr run", argv, out_path, popen)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_processes([proc], grace=5.0)
            match = _RUN_ID.search(_read(out_path) + _read(err_path))
            if match:
                with contextlib.suppress(FederationError):
                    self.flwr("stop", match[1], self.connection, timeout=30.0)
            raise proc.failure(f"did not finish within {timeout:g} s; run stopped") from None
        finally:
            if proc.running():  # interrupted (KeyboardInterrupt and the like)
                stop_processes([proc], grace=5.0)
        stdout, stderr = _read(out_path), _read(err_path)
        match = _RUN_ID.search(stdout + stderr)
        logs = {"stdout": out_path, "stderr": err_path, **self.logs}
        run_id = int(match[1]) if match else None
        seconds = time.monotonic() - begin
        done = CompletedRun(popen.returncode, stdout, stderr, seconds, run_id, logs)
        if check and done.returncode != 0:
            raise proc.failure(f"exited with code {done.returncode}")
        return done
