"""The coordinator's federated training: one ``flwr run`` of the app with ``task = "training"``.

:func:`run_federated_training` is what ``fednipype-train`` and the :class:`FederatedFit` node
run, in one of two engines:

- **deployment** (``superlink`` with the consortium's CA, or ``connection`` of an existing
  Flower home): as :func:`fednipype.federated.analysis.run_federated_analysis` — the
  SuperLink must answer TLS with the CA (bounded wait), then ``flwr run`` of the installed
  app against it, bounded by ``timeout``;
- **simulation** (neither given; ``sites`` names each simulated site's node config): a
  ``flower-superlink --simulation`` on loopback (free ports, its own process group, stopped
  and checked afterwards) runs ``len(sites)`` simulated SuperNodes, each with its site's
  node config (the run config's ``simulation-sites`` file), through the same app and
  SecAgg+ as a deployment. For tests and demos on one machine.

The server app writes ``training.json``, ``metrics.tsv`` and ``model.json`` into a staging
folder beside ``out_dir``; they are moved into ``out_dir`` when the run completed. After an
error the output folder is as it was (absent if it did not exist), and the error names the
sites' public reasons (from ``training.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import DataError, FederationError, FednipypeError
from fednipype.federated.analysis import (
    app_dir,
    check_shares,
    connect,
    flwr_run,
    parse_address,
)
from fednipype.federated.deploy import (
    FlowerProcess,
    free_port,
    start_process,
    stop_processes,
)
from fednipype.hub.training import (
    METRICS_NAME,
    MODEL_NAME,
    RECORD_NAME,
    read_training_record,
)

__all__ = ["SimulationLink", "TrainingRun", "read_simulated_sites", "run_federated_training"]

#: The node-config keys of a simulated site that name files or folders.
_PATH_KEYS = ("policy", "bids-dir", "derivatives")

#: The connection of a simulation's private Flower home.
SIMULATION = "fednipype-simulation"


@dataclass(frozen=True)
class TrainingRun:
    """What :func:`run_federated_training` did: the files in the output folder and the record."""

    model: Path
    metrics: Path
    record_path: Path
    record: dict[str, Any]
    run_id: int | None


class SimulationLink:
    """A ``flower-superlink --simulation`` on loopback, in its own process group.

    Parameters
    ----------
    workdir : Path
        Its Flower home, log and the simulated sites' node configs.
    startup_timeout : float
        Seconds to wait for its health endpoint.

    Use as a context manager; :meth:`stop` stops the SuperLink and every descendant (Ray).
    """

    def __init__(self, workdir: Path, *, startup_timeout: float = 90.0) -> None:
        self.workdir = workdir
        self.port, self.control = free_port(), free_port()
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink.{SIMULATION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        self.env = {
            **os.environ,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.process: FlowerProcess | None = None
        self.startup_timeout = startup_timeout

    def __enter__(self) -> SimulationLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink; FederationError when it is not healthy in time."""
        argv = ["flower-superlink", "--insecure", "--simulation"]
        argv += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--control-api-address", f"127.0.0.1:{self.control}"]
        self.process = start_process(
            "flower-superlink --simulation", argv, self.workdir / "superlink.log", self.env
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self.process.running():
                raise self.process.failure(f"exited with {self.process.popen.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise FederationError(
                    f"flower-superlink --simulation: not healthy in {self.startup_timeout:g} s"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the SuperLink, its process group and every descendant."""
        if self.process is not None:
            stop_processes([self.process], grace=15.0)

    def sites_file(self, sites: Sequence[Mapping[str, Any]]) -> Path:
        """Write the simulated nodes' node configs (partition id = position)."""
        path = self.workdir / "simulation-sites.json"
        path.write_text(json.dumps([dict(s) for s in sites]), encoding="utf-8")
        return path


def _install(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def _failure(tmp: Path, err: FednipypeError) -> FederationError:
    """The error, with the sites' public reasons from the staging ``training.json``."""
    try:
        record = read_training_record(tmp / RECORD_NAME)
    except FednipypeError:
        return err if isinstance(err, FederationError) else FederationError(str(err))
    notes = [
        f"{row['site']} {row['status']}" + (f" ({row['reason']})" if row.get("reason") else "")
        for row in record["sites"]
        if row["status"] not in ("completed", "accepted")
    ]
    where = f"; sites: {'; '.join(notes)}" if notes else ""
    return FederationError(f"training: {record.get('error') or err}{where}")


def run_federated_training(
    request_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    superlink: str | None = None,
    root_certificates: str | os.PathLike[str] | None = None,
    connection: str | None = None,
    flwr_home: str | os.PathLike[str] | None = None,
    sites: Sequence[Mapping[str, Any]] | None = None,
    timeout: float = 1800.0,
    round_timeout: float = 120.0,
    check_timeout: float = 120.0,
    connect_timeout: float = 60.0,
    reach_timeout: float = 15.0,
    num_shares: int = 3,
    reconstruction_threshold: int = 2,
    param_bound: float = 1000.0,
    patience: int = 0,
    evaluate: bool = True,
    secure_aggregation: bool = True,
    app: str | os.PathLike[str] | None = None,
) -> TrainingRun:
    """Run a training request through Flower and write the model into ``out_dir``.

    Parameters
    ----------
    request_file : path-like
        The training request (``fednipype-training-request/1.0``), as the sites approved it.
    out_dir : path-like
        Output folder for ``model.json``, ``metrics.tsv`` and ``training.json``.
    superlink, root_certificates : str, path-like
        Deployment: the SuperLink's ``HOST:PORT`` and the consortium CA (PEM), or
    connection, flwr_home : str, path-like
        a ``[superlink.<connection>]`` of an existing Flower home; or neither, and
    sites : sequence of mapping
        simulation: one node config per simulated site (``site``, ``policy``, ``bids-dir``,
        ``derivatives``: what the site's SuperNode would have).
    timeout : float
        Seconds the whole ``flwr run`` may take (then it is stopped and cancelled).
    round_timeout, check_timeout, connect_timeout : float
        The server app's ``timeout`` (per SecAgg+ stage and evaluate exchange),
        ``check-timeout`` and ``connect-timeout``.
    reach_timeout : float
        Deployment: seconds to wait for the SuperLink to answer.
    num_shares, reconstruction_threshold : int
        SecAgg+'s parameters.
    param_bound, patience, evaluate : float, int, bool
        The server app's ``param-bound``, ``patience`` and ``evaluate``.
    secure_aggregation : bool
        ``False`` only for a benchmark's plain baseline (real sites refuse it).
    app : path-like, optional
        Another Flower app folder (a test or benchmark app); default: the installed one.

    Returns
    -------
    TrainingRun

    Raises
    ------
    RequestError
        The request file is invalid.
    FederationError
        Bad arguments, an unreachable SuperLink, a run past ``timeout``, or a run that did
        not complete (too few sites; each site's public reason is in the message).
    """
    request_path = Path(request_file).absolute()
    request = TrainingRequest.from_file(request_path)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FederationError(f"{out}: exists and is not a folder")
    check_shares(num_shares, reconstruction_threshold, request.k)
    request.check_secure_aggregation(secure_aggregation)
    if not 0 < round_timeout < timeout or check_timeout <= 0 or connect_timeout < 0:
        raise FederationError(
            f"timeouts: expected 0 < round timeout ({round_timeout:g} s) < timeout "
            f"({timeout:g} s), check timeout > 0 and connect timeout >= 0"
        )
    simulation = superlink is None and connection is None
    if simulation and not sites:
        raise FederationError("simulation: give the simulated sites' node configs (sites)")
    if not simulation and sites:
        raise FederationError("sites: only for a simulation (no --superlink or --connection)")
    if superlink is not None and connection is not None:
        raise FederationError("--connection: give it alone, or --superlink with a CA")
    ca = Path(root_certificates).absolute() if root_certificates is not None else None
    if superlink is not None:
        parse_address(superlink)
        if ca is None or not ca.is_file():
            raise FederationError(f"--root-certificates: expected the CA's file, got {ca}")
    folder = Path(app).absolute() if app is not None else app_dir()
    run_config: dict[str, Any] = {
        "task": "training",
        "request": str(request_path),
        "min-sites": max(2, request.min_sites),
        "num-shares": num_shares,
        "reconstruction-threshold": reconstruction_threshold,
        "timeout": float(round_timeout),
        "check-timeout": float(check_timeout),
        "connect-timeout": float(connect_timeout),
        "param-bound": float(param_bound),
        "patience": int(patience),
        "evaluate": bool(evaluate),
        "secure-aggregation": bool(secure_aggregation),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with tempfile.TemporaryDirectory(prefix="fednipype-train-") as scratch:
            run_config["out-dir"] = str(tmp)
            try:
                run_id = _run(
                    Path(scratch), folder, run_config, timeout, superlink, ca, connection,
                    flwr_home, sites, reach_timeout,
                )  # fmt: skip
            except FednipypeError as err:
                raise _failure(tmp, err) from None
            if not (tmp / RECORD_NAME).is_file():  # the run's log goes with the scratch folder
                log = Path(scratch) / "logs" / "flwr-run.log"
                lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
                tail = "".join(f"\n  | {line}" for line in lines[-12:])
                raise FederationError(f"flwr run: the server app wrote no {RECORD_NAME}{tail}")
        record = read_training_record(tmp / RECORD_NAME)
        if record["status"] == "failed" or not (tmp / MODEL_NAME).is_file():
            raise _failure(tmp, FederationError(str(record.get("error"))))
        record.update(run_id=run_id, engine="simulation" if simulation else "deployment")
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _install(tmp, out)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return TrainingRun(out / MODEL_NAME, out / METRICS_NAME, out / RECORD_NAME, record, run_id)


def _run(
    scratch: Path,
    folder: Path,
    run_config: dict[str, Any],
    timeout: float,
    superlink: str | None,
    ca: Path | None,
    connection: str | None,
    flwr_home: str | os.PathLike[str] | None,
    sites: Sequence[Mapping[str, Any]] | None,
    reach_timeout: float,
) -> int | None:
    """One ``flwr run`` in the chosen engine; the run id."""
    if sites:
        with SimulationLink(scratch / "simulation") as link:
            run_config["simulation-sites"] = str(link.sites_file(sites))
            return flwr_run(
                link.env,
                scratch,
                SIMULATION,
                run_config,
                timeout,
                folder=folder,
                num_supernodes=len(sites),
            )
    env, connection, _ = connect(scratch, superlink, ca, connection, flwr_home, reach_timeout)
    return flwr_run(env, scratch, connection, run_config, timeout, folder=folder)


def read_simulated_sites(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The simulated sites' node configs, with their paths made absolute.

    Parameters
    ----------
    path : path-like
        A non-empty JSON list of node configs, objects with at least ``site`` (and ``policy``,
        ``bids-dir``, ``derivatives``: relative paths are taken from this file's folder).

    Returns
    -------
    list of dict

    Raises
    ------
    DataError
        Unreadable, not JSON, or not a list of such objects (one line naming the file).
    """
    source = Path(path).absolute()
    try:
        sites = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: simulated sites: unreadable JSON ({err})") from None
    if not isinstance(sites, list) or not sites:
        raise DataError(f"{source}: simulated sites: expected a non-empty list of node configs")
    for i, site in enumerate(sites):
        if not isinstance(site, dict) or not isinstance(site.get("site"), str):
            raise DataError(
                f"{source}: simulated sites: entry {i}: expected an object with 'site'"
            )
        for key in _PATH_KEYS:
            if isinstance(site.get(key), str):
                site[key] = str(source.parent / site[key])  # an absolute value stays as it is
    return sites
