"""The coordinator's federated analysis: one ``flwr run`` of the statistics app, then the report.

:func:`run_federated_analysis` is what ``fednipype-federate`` and the :class:`FederatedAnalysis`
node run:

1. check the request (:class:`~fednipype.contract.request.AnalysisRequest`) and the
   arguments, and that the SuperLink answers TLS with the consortium's CA (bounded wait);
2. write a private Flower home whose ``config.toml`` holds one TLS connection to the
   SuperLink (the CA's path absolute, as ``flwr`` requires), unless a connection of an
   existing Flower home is named;
3. ``flwr run <installed fednipype>/federated/app CONNECTION --stream --run-config ...``
   bounded by ``timeout`` (past it the process is stopped and the run cancelled with
   ``flwr stop``); the server app writes ``secure_sum.json`` into a staging folder beside
   the output folder;
4. read its ``status``, pool the sum and write the report
   (:mod:`fednipype.hub.federated_report`), then move the files into the output folder.

After an error the output folder is as it was (absent if it did not exist): nothing
half-written. The server app runs where the SuperLink runs, so this runs on the
coordinator's machine (the run config names the request and staging folder by path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fednipype.contract.request import AnalysisRequest
from fednipype.exceptions import FederationError, FednipypeError
from fednipype.federated.deploy import (
    config_arg,
    start_process,
    stop_processes,
    write_flwr_config,
)
from fednipype.hub.federated_report import (
    SECURE_SUM_NAME,
    FederatedReport,
    FederatedResult,
    federation_record,
    pool_secure_sum,
    read_secure_sum,
    write_federated_report,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FederatedRun",
    "app_dir",
    "check_shares",
    "connect",
    "flwr_run",
    "parse_address",
    "run_federated_analysis",
]

#: The connection written into a private Flower home.
CONNECTION = "fednipype-hub"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def app_dir() -> Path:
    """The installed Flower app of fednipype's federated statistics."""
    return Path(str(resources.files("fednipype.federated") / "app"))


def parse_address(address: str, where: str = "--superlink") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port).

    >>> parse_address("127.0.0.1:9092")
    ('127.0.0.1', 9092)
    """
    match = _ADDRESS.fullmatch(address.strip())
    if not match or not 0 < int(match[2]) < 65536:
        raise FederationError(f"{where}: expected HOST:PORT, got {address!r}")
    return match[1].strip("[]"), int(match[2])


def check_shares(num_shares: int, threshold: int, n_sites: int) -> None:
    """SecAgg+'s integer parameters against the request's number of sites.

    >>> check_shares(3, 2, 3)
    """
    if not 2 < num_shares <= n_sites:
        raise FederationError(
            f"--num-shares: expected an integer from 3 to the request's {n_sites} sites, got "
            f"{num_shares}"
        )
    if not 2 <= threshold < num_shares:
        raise FederationError(
            f"--reconstruction-threshold: expected an integer from 2 to num-shares - 1 = "
            f"{num_shares - 1}, got {threshold}"
        )


def _flwr_connection(flwr_home: Path, name: str) -> dict[str, Any]:
    path = flwr_home / "config.toml"
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise FederationError(f"{path}: unreadable Flower config ({err})") from None
    section = config.get("superlink", {}).get(name)
    if not isinstance(section, dict) or "address" not in section:
        raise FederationError(f"{path}: no [superlink.{name}] with an address")
    return section


def wait_reachable(address: str, ca: Path | None, timeout: float) -> None:
    """Wait until ``address`` accepts TCP and, with ``ca``, completes a TLS handshake with a
    certificate signed by that CA; FederationError after ``timeout`` seconds."""
    host, port = parse_address(address)
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout)) as raw:
                if context is not None:
                    with context.wrap_socket(raw, server_hostname=host):
                        pass
            return
        except ssl.SSLError as err:
            reason = f"TLS handshake failed ({err.reason or err})"
            if isinstance(err, ssl.SSLCertVerificationError):
                raise FederationError(
                    f"SuperLink {address}: {reason}; is --root-certificates the consortium's CA?"
                ) from None
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
        if time.monotonic() >= deadline:
            raise FederationError(
                f"SuperLink {address}: not reachable in {timeout:g} s ({reason})"
            )
        time.sleep(0.5)


@dataclass(frozen=True)
class FederatedRun:
    """What :func:`run_federated_analysis` did: the result, the files (in the output folder)
    and the run record (``federation.json``)."""

    result: FederatedResult
    report: FederatedReport
    record: dict[str, Any]


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into ``out_dir`` (the page last, once its links exist)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    names = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == "index.html")
    for name in names:
        os.replace(tmp / name, out_dir / name)
    tmp.rmdir()


def _moved(report: FederatedReport, tmp: Path, out_dir: Path) -> FederatedReport:
    def move(path: Path) -> Path:
        return out_dir / path.relative_to(tmp)

    return FederatedReport(
        tsv=move(report.tsv),
        sites_tsv=move(report.sites_tsv),
        html=move(report.html),
        federation=move(report.federation),
        secure_sum=move(report.secure_sum),
        plots=[move(p) for p in report.plots],
    )


def run_federated_analysis(
    request_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    superlink: str | None = None,
    root_certificates: str | os.PathLike[str] | None = None,
    connection: str | None = None,
    flwr_home: str | os.PathLike[str] | None = None,
    timeout: float = 900.0,
    round_timeout: float = 120.0,
    connect_timeout: float = 60.0,
    reach_timeout: float = 15.0,
    num_shares: int = 3,
    reconstruction_threshold: int = 2,
    plot_regions: list[str] | None = None,
) -> FederatedRun:
    """Run a federated request against a SuperLink and write its report into ``out_dir``.

    Parameters
    ----------
    request_file : path-like
        The analysis request (``fednipype-request/1.0``), as the sites approved it.
    out_dir : path-like
        Output folder (created; existing files of the same names replaced).
    superlink : str
        ``HOST:PORT`` of the SuperLink (with ``root_certificates``), or
    root_certificates : path-like
        The consortium CA's certificate (PEM).
    connection : str, optional
        Instead: a ``[superlink.<connection>]`` of the Flower home ``flwr_home`` (default
        ``$FLWR_HOME``, else ``~/.flwr``).
    timeout : float
        Seconds the whole ``flwr run`` may take; then it is stopped and the run cancelled.
    round_timeout, connect_timeout : float
        The server app's ``timeout`` (per exchange) and ``connect-timeout`` (sites to connect).
    reach_timeout : float
        Seconds to wait for the SuperLink to answer before anything is run.
    num_shares, reconstruction_threshold : int
        SecAgg+'s parameters (``3 <= num_shares <= K``, ``2 <= threshold < num_shares``).
    plot_regions : list of str, optional
        Regions with a forest plot of the site intercepts.

    Returns
    -------
    FederatedRun

    Raises
    ------
    RequestError
        The request file is invalid.
    FederationError
        Bad arguments, an unreachable SuperLink, a run past ``timeout``, or a run that did not
        complete (too few sites: each site's public reason is in the message).
    """
    begin = time.monotonic()
    request_path = Path(request_file).absolute()
    request = AnalysisRequest.from_file(request_path)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FederationError(f"{out}: exists and is not a folder")
    check_shares(num_shares, reconstruction_threshold, request.k)
    if not 0 < round_timeout < timeout or connect_timeout < 0 or reach_timeout <= 0:
        raise FederationError(
            f"timeouts: expected 0 < round timeout ({round_timeout:g} s) < timeout "
            f"({timeout:g} s), connect timeout >= 0 and reach timeout > 0"
        )
    ca = Path(root_certificates).absolute() if root_certificates is not None else None
    if connection is None:
        if superlink is None or ca is None:
            raise FederationError("--superlink and --root-certificates: both needed")
        parse_address(superlink)
        if not ca.is_file():
            raise FederationError(f"{ca}: --root-certificates: no such file")
        try:
            ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError:
            raise FederationError(f"{ca}: not a PEM CA certificate") from None
    elif superlink is not None or ca is not None:
        raise FederationError("--connection: give it alone, or --superlink with a CA")

    with tempfile.TemporaryDirectory(prefix="fednipype-flwr-") as scratch:
        env, connection, address = connect(
            Path(scratch), superlink, ca, connection, flwr_home, reach_timeout
        )

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            run_config = {
                "request": str(request_path),
                "out-dir": str(tmp),
                "min-sites": max(2, request.min_sites),
                "num-shares": num_shares,
                "reconstruction-threshold": reconstruction_threshold,
                "timeout": float(round_timeout),
                "connect-timeout": float(connect_timeout),
            }
            tic = time.monotonic()
            run_id = flwr_run(env, Path(scratch), connection, run_config, timeout)
            flwr_s = time.monotonic() - tic
            doc = read_secure_sum(tmp / SECURE_SUM_NAME, request)
            (tmp / SECURE_SUM_NAME).unlink()
            result = pool_secure_sum(request, doc)
            record = federation_record(
                result,
                request,
                superlink=address,
                run_id=run_id,
                run_config={k: v for k, v in run_config.items() if k not in ("out-dir",)},
                timings_s={"flwr_run": round(flwr_s, 3)},
            )
            record["timings_s"]["hub_total"] = round(time.monotonic() - begin, 3)
            report = write_federated_report(result, tmp, record, plot_regions=plot_regions)
            _install(tmp, out)
            report = _moved(report, tmp, out)
            tmp = None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return FederatedRun(result, report, record)


def connect(
    scratch: Path,
    superlink: str | None,
    ca: Path | None,
    connection: str | None,
    flwr_home: str | os.PathLike[str] | None,
    reach_timeout: float,
) -> tuple[dict[str, str], str, str]:
    """The environment, connection name and address of ``flwr run``'s reachable SuperLink.

    With ``superlink`` and ``ca``, a private Flower home in ``scratch`` names the connection
    :data:`CONNECTION`; otherwise ``connection`` is a section of ``flwr_home`` (default
    ``$FLWR_HOME``, else ``~/.flwr``). FederationError when the SuperLink does not answer
    within ``reach_timeout`` seconds.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if connection is None:
        assert superlink is not None and ca is not None
        home = scratch / "flwr-home"
        write_flwr_config(home, CONNECTION, superlink, ca)
        connection, address = CONNECTION, superlink
    else:
        home = Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
        section = _flwr_connection(home.absolute(), connection)
        address = str(section["address"])
        if section.get("root-certificates"):
            ca = Path(section["root-certificates"])
    env["FLWR_HOME"] = str(home.absolute())
    wait_reachable(address, ca, reach_timeout)
    return env, connection, address


def flwr_run(
    env: dict[str, str],
    scratch: Path,
    connection: str,
    run_config: dict[str, Any],
    timeout: float,
    *,
    folder: Path | None = None,
    num_supernodes: int | None = None,
) -> int | None:
    """``flwr run FOLDER CONNECTION --stream --run-config ...`` bounded by ``timeout``.

    ``folder`` is the app (default: fednipype's, :func:`app_dir`); ``num_supernodes`` sets a
    simulation's number of nodes. Past ``timeout`` the run is stopped (``flwr stop``) and
    FederationError raised; a non-zero exit raises it with the log's reason. The output goes
    to ``SCRATCH/logs/flwr-run.log``. Returns the run id (None if the output named none).
    """
    argv = ["flwr", "run", str(folder or app_dir()), connection, "--stream"]
    if num_supernodes:
        argv += ["--federation-config", f"num-supernodes={num_supernodes}"]
    argv += ["--run-config", config_arg(run_config)]
    LOGGER.info("running: %s", " ".join(argv))
    log = scratch / "logs" / "flwr-run.log"
    proc = start_process("flwr run", argv, log, env)
    try:
        proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_processes([proc], grace=5.0)
        match = _RUN_ID.search(proc.tail(10**6))
        if match:
            with contextlib.suppress(OSError, FednipypeError, subprocess.TimeoutExpired):
                stop = start_process("flwr stop", ["flwr", "stop", match[1], connection], log, env)
                stop.popen.wait(timeout=30.0)
        raise FederationError(
            f"flwr run: no result within --timeout {timeout:g} s; the run was stopped"
        ) from None
    finally:
        if proc.running():  # interrupted
            stop_processes([proc], grace=5.0)
    text = proc.tail(10**6)
    LOGGER.debug("flwr run output:\n%s", text)
    match = _RUN_ID.search(text)
    if proc.popen.returncode != 0 or match is None:
        reason = str(proc.failure(f"exited with code {proc.popen.returncode}")).splitlines()[0]
        raise FederationError(reason)
    return int(match[1])


# -- the Nipype interface ---------------------------------------------------------------------
