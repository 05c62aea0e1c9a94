"""Federated statistics: wall time and bytes of one pooled-regression run; distributed-dp utility.

Run from the repository root (what is measured and how: ``bench/federation.md``)::

    python bench/federation.py [--reps 1] [--part transport|utility|all] [--keep DIR]

``transport``: one pooled-regression run of the three bundled sites (extracted features, a
real policy and SQLite ledger each, each ``dp`` request approved by each site's owner)
through fednipype's Flower app, in **simulation** (a ``flower-superlink --simulation``
started here) and in **deployment** (:class:`fednipype.federated.deploy.LocalConsortium`:
TLS, SuperNode authentication, three SuperNodes), with SecAgg+ (the real app) and the plain
baseline (real sites refuse plain runs: the test app ``tests/data/secagg_echo_app`` with the
real request's vector length and grid bound, in both variants). Bytes are *measured*: an
outer Flower mod written into each app records the serialised size (Flower's deflated
message objects) of every message a site receives and sends.

``utility``: no Flower. K = 3 and a simulated K = 20: noise sd per summed entry in ``dp`` and
``distributed-dp`` (t = 1, t = K // 3) from the contract's calibration, and the SD of the
pooled age slope over noisy sums (:func:`fednipype.hub.federated.pooled_from_sum`), with the
ratio dp / distributed-dp against the ≈ √(K − t) expectation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SITES = ("siteA", "siteB", "siteC")
REGIONS = ("L_P01", "R_P01", "L_P12")
APP = REPO / "fednipype" / "federated" / "app"
ECHO = REPO / "tests" / "data" / "secagg_echo_app"
TIMEOUT_S = 60.0
STAGES = ("check", "setup", "share_keys", "collect_masked_vectors", "unmask", "fit")

# An outer Flower mod, written into each benchmark app: sizes of what a site receives and
# sends, one JSON file per message in the folder named by the run config's ``bench-meter``.
METER = '''
"""Benchmark mod: the serialised size of every message a site receives and sends."""

import json
import os
import time

from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def _size(message):
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def meter(msg, context, call_next):
    received = _size(msg)
    configs = msg.content.config_records.get("secaggplus_configs")  # secaggplus_mod pops it
    stage = str(configs.get("stage", "")) if configs is not None else ""
    reply = call_next(msg, context)
    folder = str(context.run_config.get("bench-meter", ""))
    if folder:
        record = {
            "node": int(context.node_id),
            "type": str(msg.metadata.message_type),
            "stage": stage,
            "received": received,
            "sent": _size(reply),
        }
        name = f"{os.getpid()}-{time.time_ns()}.json"
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    return reply
'''

REAL_CLIENT = '''
"""The real site client app behind the benchmark's meter; in simulation a node's site
configuration comes from the JSON file named by ``bench-sites`` (by partition id)."""

import json

from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from bench_meter import meter
from fednipype.federated.app.client_app import SiteClient, site_check, site_label, site_vector


def _node_config(context):
    config = dict(context.node_config)
    sites = str(context.run_config.get("bench-sites", ""))
    if "site" not in config and sites:
        with open(sites, encoding="utf-8") as handle:
            config.update(json.load(handle)[int(config["partition-id"])])
    return config


def client_fn(context):
    return SiteClient(
        _node_config(context), label=site_label, check=site_check, vector=site_vector
    ).to_client()


app = ClientApp(client_fn=client_fn, mods=[meter, secaggplus_mod])
'''

ECHO_CLIENT = '''
"""The echo test app's client behind the benchmark's meter."""

from flwr.clientapp import ClientApp

from bench_meter import meter
from echo_client import _secagg_unless_plain, client_fn

app = ClientApp(client_fn=client_fn, mods=[meter, _secagg_unless_plain])
'''


# -- the benchmark apps ------------------------------------------------------------------------


def _with_keys(pyproject: str, name: str) -> str:
    text = re.sub(r'(?m)^name = ".*"$', f'name = "fednipype-bench-{name}"', pyproject, count=1)
    return text.rstrip() + '\nbench-meter = ""\nbench-sites = ""\n'


def make_apps(root: Path) -> dict[str, Path]:
    """The real app and the echo app, each with the meter as its outer mod."""
    real, echo = root / "app-real", root / "app-echo"
    for folder in (real, echo):
        folder.mkdir(parents=True)
        (folder / "bench_meter.py").write_text(METER, encoding="utf-8")
        (folder / "server_app.py").write_text(  # Flower finds ``app`` by __all__ or assignment
            'from fednipype.federated.app.server_app import app\n\n__all__ = ["app"]\n',
            encoding="utf-8",
        )
    real_toml = (APP / "pyproject.toml").read_text(encoding="utf-8")
    (real / "pyproject.toml").write_text(_with_keys(real_toml, "real"), encoding="utf-8")
    (real / "client_app.py").write_text(REAL_CLIENT, encoding="utf-8")
    echo_toml = (ECHO / "pyproject.toml").read_text(encoding="utf-8")
    (echo / "pyproject.toml").write_text(_with_keys(echo_toml, "echo"), encoding="utf-8")
    shutil.copy(ECHO / "client_app.py", echo / "echo_client.py")
    (echo / "client_app.py").write_text(ECHO_CLIENT, encoding="utf-8")
    return {"real": real, "echo": echo}


# -- the sites ---------------------------------------------------------------------------------


def request_doc(request_id: str, **changes: Any) -> dict[str, Any]:
    """The benchmark's request: the bundled sites' pooled regression of three regions."""
    return {
        "schema": "fednipype-request/1.0",
        "request_id": request_id,
        "sites": list(SITES),
        "model": {
            "response": "volume_mm3",
            "numeric": ["age"],
            "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]},
        },
        "regions": list(REGIONS),
        "bounds": {"covariates": {"age": [10, 90]}, "regions": {"default": [2000, 10000]}},
        "mode": "dp",
        "epsilon": 1.0,
        "delta": 1e-5,
        "max_dropouts": 0,
        "min_sites": 2,
        "max_participants": 1000,
        **changes,
    }


class Sites:
    """The bundled sites: features, policies, ledgers, and the requests they approve."""

    def __init__(self, root: Path) -> None:
        from fednipype.features import extract_dataset_features
        from fednipype.site.lifecycle import init_ledger
        from fednipype.site.policy import example_policy

        self.root = root
        self.configs: dict[str, dict[str, str]] = {}
        for site in SITES:
            folder = root / "sites" / site
            derivatives = folder / "derivatives"
            extract_dataset_features(REPO / "bids_examples" / site, derivatives)
            policy = folder / "policy.toml"
            text = example_policy(dataset=site, total_epsilon=1e4, total_delta=0.1)
            policy.write_text(
                f'min_cohort = 5\n{text}\n[federation]\nmodes = ["dp"]\n', encoding="utf-8"
            )
            init_ledger(policy)
            self.configs[site] = {
                "site": site,
                "policy": str(policy),
                "bids-dir": str(REPO / "bids_examples" / site),
                "derivatives": str(derivatives),
            }
        self.sites_file = root / "sites.json"
        self.sites_file.write_text(json.dumps([self.configs[s] for s in SITES]), encoding="utf-8")
        self._count = 0

    def request(self, mode: str = "dp", **changes: Any) -> Path:
        """A new request file (its own id), approved by every site's owner."""
        from fednipype.contract.request import AnalysisRequest
        from fednipype.site import approvals
        from fednipype.site.ledger import PrivacyLedger
        from fednipype.site.policy import SitePolicy

        self._count += 1
        doc = request_doc(f"bench-{self._count}", mode=mode, **changes)
        path = self.root / "requests" / f"{doc['request_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc), encoding="utf-8")
        request = AnalysisRequest.from_file(path)
        for config in self.configs.values():
            ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(config["policy"]))
            approvals.approve(ledger, request)
        return path


def echo_request(root: Path, name: str) -> Path:
    """The echo sites' request (labels site-0..2; the vector is the echo app's)."""
    sites = ["site-0", "site-1", "site-2"]
    doc = request_doc(f"echo-{name}", sites=sites, regions=["L_P01"])
    path = root / "requests" / f"echo-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# -- the engines -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Simulation:
    """A ``flower-superlink --simulation`` of this benchmark: own ports, group, FLWR_HOME."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port, control = _free_port(), _free_port()
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "FEDNIPYPE_BENCH_RUN": uuid.uuid4().hex,
        }
        bindir = Path(sys.executable).parent
        self.flwr = str(bindir / "flwr")
        self.log = (root / "superlink.log").open("wb")
        argv = [str(bindir / "flower-superlink"), "--insecure", "--simulation"]
        argv += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--control-api-address", f"127.0.0.1:{control}"]
        self.proc = subprocess.Popen(
            argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("flower-superlink --simulation: not healthy in 90 s")
            time.sleep(0.5)

    def run(self, app: Path, config: dict[str, Any]) -> float:
        """``flwr run`` with three simulated SuperNodes; its wall time."""
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        argv = [self.flwr, "run", str(app), "sim", "--stream"]
        argv += ["--federation-config", "num-supernodes=3", "--run-config", run_config]
        tic = time.monotonic()
        done = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=600, check=False
        )
        wall = time.monotonic() - tic
        with (self.root / "flwr-run.log").open("a", encoding="utf-8") as log:
            log.write(done.stdout + done.stderr)
        return wall

    def stop(self) -> None:
        """Stop the SuperLink's process group and whatever carries this run's marker."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        needle = f"FEDNIPYPE_BENCH_RUN={self.env['FEDNIPYPE_BENCH_RUN']}".encode()
        deadline = time.monotonic() + 20
        while (left := _marked(needle)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only processes this benchmark started carry the marker (Ray's too)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _marked(needle: bytes) -> list[int]:
    """Live processes whose environment holds ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


# -- one measured run --------------------------------------------------------------------------


def measured_run(engine: Any, app: Path, config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run once; the wall time, the server's timings and the per-site message sizes."""
    meter = out / "meter"
    meter.mkdir(parents=True)
    config = {**config, "out-dir": str(out), "bench-meter": str(meter), "timeout": TIMEOUT_S}
    if isinstance(engine, Simulation):
        wall = engine.run(app, config)
    else:
        wall = engine.run(app, config, timeout=600.0).seconds
    if not (out / "secure_sum.json").is_file():
        raise RuntimeError(f"{out.name}: no secure_sum.json; see the flwr run log in {out.parent}")
    result = json.loads((out / "secure_sum.json").read_text(encoding="utf-8"))
    if result["status"] != "completed":
        raise RuntimeError(f"{out.name}: the run failed: {result['error']}")
    sent: dict[int, dict[str, int]] = {}
    received: dict[int, int] = {}
    for path in meter.glob("*.json"):
        rec = json.loads(path.read_text(encoding="utf-8"))
        stage = rec["stage"] or ("check" if "properties" in rec["type"] else "fit")
        per_node = sent.setdefault(rec["node"], {})
        per_node[stage] = per_node.get(stage, 0) + rec["sent"]
        received[rec["node"]] = received.get(rec["node"], 0) + rec["received"]
    return {
        "wall_s": wall,
        "timings_s": result["timings_s"],
        "sent": sent,
        "received": received,
        "limbs": result["transport"]["limbs"],
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _per_site(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean bytes one site sends per run, by stage, and in total; received in total."""
    stages: dict[str, list[int]] = {}
    totals, received = [], []
    for run in runs:
        for node, by_stage in run["sent"].items():
            for stage, size in by_stage.items():
                stages.setdefault(stage, []).append(size)
            totals.append(sum(by_stage.values()))
            received.append(run["received"][node])
    out = {stage: float(np.mean(sizes)) for stage, sizes in stages.items()}
    return {**out, "total": float(np.mean(totals)), "received": float(np.mean(received))}


def transport(reps: int, root: Path) -> dict[str, Any]:
    """Wall times and bytes of the real app (SecAgg+) and the echo app (SecAgg+, plain)."""
    from fednipype.contract.request import AnalysisRequest
    from fednipype.contract.secure_sum import Grid, SumLayout
    from fednipype.federated.deploy import LocalConsortium

    apps, sites = make_apps(root / "apps"), Sites(root)
    probe = AnalysisRequest.from_document(request_doc("probe"), source="probe")
    size, bound = SumLayout.from_request(probe).size, Grid.for_request(probe).bound
    echo = {"echo-size": size, "echo-seed": 11, "site-bound": bound}
    variants = {
        "real app, SecAgg+": ("real", {}),
        "echo app, SecAgg+": ("echo", {**echo, "secure-aggregation": True}),
        "echo app, plain": ("echo", {**echo, "secure-aggregation": False}),
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    timings: dict[str, float] = {}

    def run_all(engine_name: str, engine: Any, extra: dict[str, Any]) -> None:
        for rep in range(reps):
            for label, (app, config) in variants.items():
                name = f"{engine_name}-{rep}"
                request = sites.request() if app == "real" else echo_request(root, name)
                out = root / "out" / engine_name / f"{app}-{len(config)}-{rep}-{time.time_ns()}"
                config = {**config, **extra, "request": str(request)}
                run = measured_run(engine, apps[app], config, out)
                results.setdefault(engine_name, {}).setdefault(label, []).append(run)
                print(f"  {engine_name:<10} {label:<18} rep {rep + 1}: {run['wall_s']:6.1f} s")

    print("simulation (flower-superlink --simulation, 3 simulated SuperNodes) ...")
    tic = time.monotonic()
    sim = Simulation(root / "simulation")
    timings["simulation_startup_s"] = time.monotonic() - tic
    try:
        run_all("simulation", sim, {"bench-sites": str(sites.sites_file)})
    finally:
        sim.stop()

    print("deployment (TLS SuperLink with node auth, 3 SuperNodes) ...")
    nodes = {s: {**cfg, "partition-id": i} for i, (s, cfg) in enumerate(sites.configs.items())}
    tic = time.monotonic()
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    with LocalConsortium(root / "deployment", nodes, stop_grace=5.0) as consortium:
        timings["deployment_startup_s"] = time.monotonic() - tic
        run_all("deployment", consortium, {"connect-timeout": 60.0})
    timings["deployment_stop_s"] = consortium.timings.get("stop_s", math.nan)
    return {"results": results, "timings": timings, "size": size, "bound": bound}


def _med(runs: list[dict[str, Any]], key: str) -> float:
    """Median over runs of the wall time (``wall``) or of one of the server's timings."""
    return _median([r["wall_s"] if key == "wall" else r["timings_s"][key] for r in runs])


def print_transport(report: dict[str, Any]) -> None:
    """Print the three tables (Markdown)."""
    results, size = report["results"], report["size"]
    lines = [
        "| engine | variant | flwr run (s) | check (s) | aggregation round (s) | "
        "server total (s) | bytes sent / site | bytes received / site |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    stages = ["", f"| bytes one site sends, by message (mean) | {' | '.join(STAGES)} |"]
    stages.append("|---|" + "--:|" * len(STAGES))
    for engine, variants in results.items():
        for label, runs in variants.items():
            site = _per_site(runs)
            times = " | ".join(f"{_med(runs, k):.1f}" for k in ("wall", "check", "aggregation"))
            lines.append(
                f"| {engine} | {label} | {times} | {_med(runs, 'total'):.1f} | "
                f"{site['total']:,.0f} | {site['received']:,.0f} |"
            )
            cells = [f"{site[s]:,.0f}" if s in site else "-" for s in STAGES]
            stages.append(f"| {engine}, {label} | " + " | ".join(cells) + " |")
    lines += ["", "| engine | SecAgg+ / plain: flwr run | aggregation round | bytes sent / site |"]
    lines.append("|---|--:|--:|--:|")
    for engine, variants in results.items():
        secure, plain = variants["echo app, SecAgg+"], variants["echo app, plain"]
        wall, agg = (_med(secure, k) / _med(plain, k) for k in ("wall", "aggregation"))
        sent = _per_site(secure)["total"] / _per_site(plain)["total"]
        lines.append(f"| {engine} | {wall:.2f} | {agg:.2f} | {sent:.2f} |")
    limbs = results["deployment"]["real app, SecAgg+"][0]["limbs"]
    lines += stages
    lines += [
        "",
        f"Vector: {size} integers x {limbs} limb(s) = {size * limbs} coordinates; as int64 "
        f"{size * limbs * 8:,} bytes (the count from the layout).",
    ]
    print("\n".join(lines))


# -- distributed-dp utility --------------------------------------------------------------------


def _utility_request(k: int, mode: str, t: int, epsilon: float) -> Any:
    from fednipype.contract.request import AnalysisRequest

    doc = request_doc(
        f"utility-{k}-{mode}-{t}",
        sites=[f"site-{i:02d}" for i in range(k)],
        regions=["L_P12", "R_P12"],
        bounds={"covariates": {"age": [18, 90]}, "regions": {"default": [2000, 12000]}},
        mode=mode,
        epsilon=epsilon,
        max_dropouts=t,
        min_sites=2 if mode == "dp" else k - t,
    )
    return AnalysisRequest.from_document(doc, source=doc["request_id"])


def _site_vectors(request: Any, k: int, n: int, seed: int) -> np.ndarray:
    """The K sites' exact vectors (scaled units): n participants each, planted effects."""
    from fednipype.contract.secure_sum import SumLayout
    from fednipype.contract.statistics import SufficientStatistics

    rng = np.random.default_rng(seed)
    layout = SumLayout.from_request(request)
    vectors = []
    for slot in range(k):
        lo = rng.uniform(18, 50)
        age = rng.uniform(lo, lo + 40, n)
        patient = rng.random(n) < 0.5
        male = rng.random(n) < 0.5
        base = 7000 - 25 * (age - 50) + 150 * male - 300 * patient + rng.normal(0, 200)
        y = np.column_stack([base + rng.normal(0, 300, n) for _ in request.regions])
        z = np.column_stack([np.ones(n), age, patient, male])  # intercept, age, group, sex
        zs = np.column_stack([z[:, 0], (age - 54) / 36, 2.0 * z[:, 2] - 1, 2.0 * z[:, 3] - 1])
        ys = (np.clip(y, 2000, 12000) - 7000) / 5000
        stats = SufficientStatistics(
            request.terms, request.regions, zs.T @ zs, zs.T @ ys, (ys**2).sum(0), float(n)
        )
        vectors.append(layout.site_vector(stats, slot))
    return np.array(vectors)


def utility(reps: int, epsilon: float, n: int, seed: int = 5) -> list[dict[str, Any]]:
    """Noise sd per summed entry and the pooled age slope's SD, dp vs distributed-dp."""
    from fednipype.contract.distributed_dp import request_noise
    from fednipype.contract.secure_sum import Grid, SumLayout, dp_sigma
    from fednipype.hub.federated import pooled_from_sum

    rows = []
    for k in (3, 20):
        base = _utility_request(k, "dp", 0, epsilon)
        assert base.terms == ("intercept", "age", "group[patient]", "sex[M]")
        vectors = _site_vectors(base, k, n, seed + k)
        sites = list(base.sites)
        configs = [("dp", 0)] + [("distributed-dp", t) for t in sorted({1, k // 3})]
        rng = np.random.default_rng(seed)
        for mode, t in configs:
            request = _utility_request(k, mode, t, epsilon)
            layout, grid = SumLayout.from_request(request), Grid.for_request(request)
            own = np.zeros((k, layout.size), dtype=bool)
            for s in range(k):
                own[s, layout.slot_range(s)] = own[s, layout.shared_range] = True
            if mode == "dp":
                sigma = dp_sigma(request)
                entry_sd = math.sqrt(k) * sigma  # a shared entry: K sites' own noise
                slot_sd = sigma  # a site's slot: its own noise only
                central = sigma
            else:
                noise, grid = request_noise(request)
                sigma = noise.sigma_site * grid.step
                entry_sd = slot_sd = math.sqrt(k) * sigma  # every entry: K shares
                central = noise.sigma_central * grid.step
            slopes, ses, floored = [], [], 0
            for _ in range(reps):
                draws = rng.normal(0.0, sigma, vectors.shape)
                noisy = vectors + (draws * own if mode == "dp" else draws)
                summed = np.sum([grid.encode(v) for v in noisy], axis=0)
                pooled, _ = pooled_from_sum(request, summed, sites, noise_sd=sigma, grid=grid)
                age = pooled[(pooled["term"] == "age") & (pooled["region"] == "L_P12")].iloc[0]
                floored += bool(pooled["sigma2_floored"].any())
                slopes.append(age["estimate"])
                ses.append(age["se"])
            rows.append(
                {
                    "K": k,
                    "mode": mode,
                    "t": t,
                    "site_sd": sigma,
                    "central_sd": central,
                    "entry_sd": entry_sd,
                    "slot_sd": slot_sd,
                    "floored": floored / reps,
                    "slope_sd": float(np.std(slopes, ddof=1)),
                    "slope_se": float(np.mean(ses)),
                }
            )
    return rows


def print_utility(rows: list[dict[str, Any]], reps: int) -> None:
    """Print the utility table (Markdown)."""
    lines = [
        "| K | mode | t | sd of one site's noise | central sd | sd per shared entry | sd per "
        f"slot entry | age slope: SD over {reps} noisy sums | mean reported SE | floored fits | "
        "dp / this: shared-entry sd | dp / this: slope SD | √(K − t) |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        dp = next(r for r in rows if r["K"] == row["K"] and r["mode"] == "dp")
        expected = f"{math.sqrt(row['K'] - row['t']):.2f}" if row["mode"] != "dp" else "-"
        lines.append(
            f"| {row['K']} | {row['mode']} | {row['t']} | {row['site_sd']:.3f} | "
            f"{row['central_sd']:.3f} | {row['entry_sd']:.3f} | {row['slot_sd']:.3f} | "
            f"{row['slope_sd']:.3f} | "
            f"{row['slope_se']:.3f} | {row['floored']:.0%} | "
            f"{dp['entry_sd'] / row['entry_sd']:.2f} | {dp['slope_sd'] / row['slope_sd']:.2f} | "
            f"{expected} |"
        )
    print("\n".join(lines))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1, help="runs per variant and engine")
    parser.add_argument("--utility-reps", type=int, default=300, help="noisy sums per mode")
    parser.add_argument("--epsilon", type=float, default=1.0, help="per-site epsilon (utility)")
    parser.add_argument("--per-site", type=int, default=1000, help="participants per site")
    parser.add_argument("--part", choices=("transport", "utility", "all"), default="all")
    parser.add_argument("--keep", type=Path, help="keep the work folder here (logs, outputs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    begin = time.monotonic()
    if args.part in ("transport", "all"):
        root = args.keep or Path(tempfile.mkdtemp(prefix="fednipype-bench-federation-"))
        root.mkdir(parents=True, exist_ok=True)
        try:
            report = transport(args.reps, root)
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)
        print(f"\nOne pooled-regression run (median of {args.reps}), dp mode, 3 sites:")
        print_transport(report)
        print(f"start-up and stop (s): {json.dumps(report['timings'])}")
    if args.part in ("utility", "all"):
        logging.getLogger("fednipype.hub.regression").setLevel(logging.ERROR)  # floors counted
        print(
            f"\ndistributed-dp vs dp, epsilon = {args.epsilon:g} per site, delta = 1e-5, "
            f"{args.per_site} participants per site, noise sd in scaled units, slope in mm3/year:"
        )
        print_utility(utility(args.utility_reps, args.epsilon, args.per_site), args.utility_reps)
    print(f"\nbench/federation.py: {time.monotonic() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
