"""Federated training: wall time per FedAvg round, simulation vs deployment, SecAgg+ vs plain.

Run from the repository root (one command)::

    python bench/federated_training.py [--rounds 3] [--sites 3] [--part simulation|deployment|all]

Each configuration runs one training request of ``--rounds`` rounds (mode ``none``, brain-age,
3 regions, evaluate rounds off so a round is one fit exchange) through
:func:`fednipype.federated.training.run_federated_training`:

- **simulation**: a ``flower-superlink --simulation`` on loopback, ``--sites`` simulated
  SuperNodes;
- **deployment**: :class:`fednipype.federated.deploy.LocalConsortium` (TLS, SuperNode
  authentication, one SuperNode per site) on loopback;

each with **SecAgg+** (``secure-aggregation = true``: setup, share-keys, collect and unmask
stages per round) and the **plain** baseline (``false``: one plain fit exchange per round, the
same fixed-point vectors in the clear). Real sites refuse plain runs (their client app puts
every fit reply through ``secaggplus_mod``), so both variants run a benchmark app: fednipype's
app with a client app whose sites train :func:`fednipype.learn.fedavg.gradient_descent` on
synthetic rows (the same TrainingClient, codec and transport), and ``secaggplus_mod`` skipped
when the run is plain. The table prints each round's wall time (from ``training.json``), the
mean of rounds 2.. (round 1 includes each SuperNode's first start of the client app), the
whole ``flwr run`` and the SecAgg+ / plain ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fednipype" / "federated" / "app"

BENCH_CLIENT = '''
"""Benchmark client app: the real TrainingClient; sites train on synthetic rows."""

import numpy as np
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fednipype.federated.app.client_app import public_reason, simulated_node_config, site_label
from fednipype.federated.app.training_client import TrainingClient, TrainingSite
from fednipype.learn.fedavg import gradient_descent


def update(request, node_config, w, server_round):
    rng = np.random.default_rng(int(node_config["seed"]))
    n = int(node_config["n"])
    age = rng.uniform(20.0, 85.0, n)
    X = 9000.0 - 30.0 * age[:, None] + rng.normal(0.0, 300.0, (n, len(request.regions)))
    Xs, y = request.scaling.transform(X), request.scaling.label_transform(age)
    w_local = gradient_descent(request.task, w, Xs, y, learning_rate=request.learning_rate,
                               local_steps=request.local_steps, l2=request.l2)
    return w_local, float(n)


def _secagg_unless_plain(msg, context, call_next):
    if context.run_config.get("secure-aggregation", True):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


SITE = TrainingSite(check=lambda request, node_config: None, update=update)


def client_fn(context):
    node_config = simulated_node_config(context.node_config, context.run_config)
    return TrainingClient(node_config, label=site_label, site=SITE,
                          public_reason=public_reason).to_client()


app = ClientApp(client_fn=client_fn, mods=[_secagg_unless_plain])
'''


def bench_app(root: Path) -> Path:
    folder = root / "bench-training-app"
    shutil.copytree(APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "client_app.py").write_text(BENCH_CLIENT, encoding="utf-8")
    return folder


def request_file(root: Path, sites: list[str], rounds: int) -> Path:
    doc = {
        "schema": "fednipype-training-request/1.0",
        "request_id": "bench-training",
        "sites": sites,
        "task": "brain-age",
        "regions": ["L_P01", "R_P01", "L_P12"],
        "bounds": {"regions": {"default": [2000, 12000]}, "label": [18, 90]},
        "mode": "none",
        "epsilon": None,
        "delta": None,
        "rounds": rounds,
        "local_steps": 5,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": None,
        "clip": None,
        "holdout_fraction": 0.2,
        "min_sites": 2,
        "max_participants": 1000,
    }
    path = root / "request.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def one_run(label: str, request: Path, out: Path, **kwargs) -> dict:
    from fednipype.federated.training import run_federated_training

    tic = time.monotonic()
    run = run_federated_training(request, out, evaluate=False, timeout=900.0,
                                 round_timeout=60.0, **kwargs)  # fmt: skip
    wall = time.monotonic() - tic
    rounds = run.record["timings_s"]["rounds"]
    later = rounds[1:] or rounds
    row = {"engine": label, "secure": kwargs.get("secure_aggregation", True), "rounds": rounds,
           "mean_later_s": statistics.mean(later), "run_s": wall}  # fmt: skip
    print(
        f"{label:<11} {'SecAgg+' if row['secure'] else 'plain':<8} "
        f"rounds {', '.join(f'{r:.1f}' for r in rounds)} s; mean of rounds 2..: "
        f"{row['mean_later_s']:.2f} s; whole run {wall:.1f} s",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--part", choices=("simulation", "deployment", "all"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    sites = [f"site-{k}" for k in range(args.sites)]
    nodes = [{"site": s, "seed": 7 + k, "n": 400} for k, s in enumerate(sites)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        root = Path(scratch)
        app = bench_app(root)
        request = request_file(root, sites, args.rounds)
        if args.part in ("simulation", "all"):
            for secure in (True, False):
                rows.append(one_run("simulation", request, root / f"sim-{secure}", sites=nodes,
                                    app=app, secure_aggregation=secure))  # fmt: skip
        if args.part in ("deployment", "all"):
            from fednipype.federated.deploy import LocalConsortium

            tic = time.monotonic()
            with LocalConsortium(root / "deployment", {n["site"]: n for n in nodes}) as c:
                print(f"deployment: consortium online in {time.monotonic() - tic:.1f} s")
                for secure in (True, False):
                    rows.append(one_run(
                        "deployment", request, root / f"dep-{secure}",
                        superlink=c.superlink_address, root_certificates=c.ca, app=app,
                        secure_aggregation=secure,
                    ))  # fmt: skip
    print("\nSecAgg+ / plain, mean time of rounds 2..:")
    for engine in ("simulation", "deployment"):
        pair = {r["secure"]: r["mean_later_s"] for r in rows if r["engine"] == engine}
        if len(pair) == 2:
            print(f"  {engine}: {pair[True]:.2f} s / {pair[False]:.2f} s = "
                  f"{pair[True] / pair[False]:.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
