"""``FederatedFit``, ``init_federated_wf`` and the site example ``site_serves_features.py``.

One simulated Flower training run serves the module: ``init_federated_wf`` with its
``FederatedFit`` node in simulation of the bundled sites (siteA's features written by the site
example, siteB's and siteC's by the library), each with its real policy, SQLite ledger and
owner's approval, on a non-DP brain-age request of 2 rounds. The references are computed here:
the model's ``w`` applied with numpy to the feature tables read with pandas, the training rows
counted from ``participants.tsv`` and the tables. Left-over processes are looked up in
``/proc`` (every process of the run has its private Flower home under this module's folder).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from sklearn.base import is_regressor
from sklearn.metrics import mean_absolute_error, r2_score
from support import BUNDLED, REPO, SITES, request_document
from traits.api import TraitError

from fednipype.atlas import default_atlas
from fednipype.contract.training import TrainingRequest
from fednipype.exceptions import DataError, RequestError
from fednipype.interfaces.training import FederatedFit
from fednipype.learn.fedavg import holdout_split
from fednipype.learn.modelfile import load_model
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy, example_policy
from fednipype.workflows.federated import init_federated_wf

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"
)

EXAMPLE = REPO / "workflows" / "site_serves_features.py"
REGIONS = ["L_P01", "R_P01", "L_P12", "R_P33"]
VOLUME, AGE = (0.0, 12000.0), (18.0, 90.0)
FEDERATION = '\n[federation]\nmodes = ["training-dp"]\nallow_non_dp_training = true\n'
FEATURES = "*_desc-regional_features.tsv"


def _example():
    spec = importlib.util.spec_from_file_location("site_serves_features", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request_doc() -> dict:
    return {
        "schema": "fednipype-training-request/1.0",
        "request_id": "brain-age-fit",
        "sites": list(SITES),
        "task": "brain-age",
        "regions": REGIONS,
        "bounds": {"regions": {"default": list(VOLUME)}, "label": list(AGE)},
        "mode": "none",
        "epsilon": None,
        "delta": None,
        "rounds": 2,
        "local_steps": 3,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": None,
        "clip": None,
        "holdout_fraction": 0.25,
        "min_sites": 2,
        "max_participants": 1000,
    }


def first_session_rows(bids: Path, derivatives: Path) -> pd.DataFrame:
    """One row per participant (first session): participants.tsv joined with the volumes."""
    volumes = {}
    for path in sorted(derivatives.rglob(FEATURES)):
        subject = path.name.split("_")[0]
        if subject not in volumes:
            table = pd.read_csv(path, sep="\t", na_values=["n/a"]).set_index("name")
            volumes[subject] = table["volume_mm3"].reindex(REGIONS)
    features = pd.DataFrame(volumes).T.rename_axis("participant_id").reset_index()
    people = pd.read_csv(bids / "participants.tsv", sep="\t", na_values=["n/a"])
    return people.merge(features, on="participant_id")


def processes_under(root: Path) -> dict[int, str]:
    """Live processes whose ``FLWR_HOME`` lies under ``root`` (read from /proc)."""
    found = {}
    marker = f"FLWR_HOME={root}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError):
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in Path(f"/proc/{name}/environ").read_bytes():
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
                found[int(name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


# -- the site example ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_features(tmp_path_factory) -> Path:
    """siteA's participant features, written by the site example with ``--features-only``."""
    root = tmp_path_factory.mktemp("site-example")
    out = root / "derivatives"
    argv = [str(BUNDLED / "siteA"), str(out), "--features-only", "--work-dir", str(root / "work")]
    assert _example().main(argv) == 0
    return out


def visit(path: Path) -> str:
    """``sub-X[_ses-Y]`` of a feature table's name."""
    return "_".join(e for e in path.name.split("_") if e.startswith(("sub-", "ses-")))


@pytest.mark.timeout(120)
def test_site_example_writes_the_participant_features(example_features, bundled_derivatives):
    written = {visit(p): p for p in example_features.rglob(FEATURES)}
    library = {visit(p): p for p in bundled_derivatives["siteA"].rglob(FEATURES)}
    people = pd.read_csv(BUNDLED / "siteA" / "participants.tsv", sep="\t")
    assert sorted(written) == sorted(library)
    assert {v.split("_")[0] for v in written} == set(people["participant_id"])
    atlas = pd.read_csv(default_atlas(2).labels, sep="\t")
    for key, path in written.items():
        table = pd.read_csv(path, sep="\t")
        expected = pd.read_csv(library[key], sep="\t")
        assert list(table["name"]) == list(atlas["name"])
        np.testing.assert_allclose(table["volume_mm3"], expected["volume_mm3"], rtol=1e-9)
        assert path.with_suffix(".json").is_file()
    assert (example_features / "dataset_description.json").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["{bids}", "{out}"], "serving needs --policy"),
        (["{missing}", "{out}", "--features-only"], "missing"),
        (["{bids}", "{out}", "--features-only", "--participant-label", "99"], "99"),
    ],
)
@pytest.mark.timeout(60)
def test_site_example_bad_arguments_are_one_line(argv, expected, tmp_path, capsys):
    values = {"bids": BUNDLED / "siteA", "out": tmp_path / "out", "missing": tmp_path / "missing"}
    argv = [a.format(**values) for a in argv]
    try:
        code = _example().main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None)
    assert len(err) == 1 and "error:" in err[0] and expected in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(130)
def test_site_example_script_exits_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


# -- the hub's node: one simulated run ----------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory, example_features, bundled_derivatives):
    """Site folders (policies, ledgers, approvals), the simulated sites' file, the request."""
    root = tmp_path_factory.mktemp("federation")
    data = {s: (BUNDLED / s, bundled_derivatives[s]) for s in SITES}
    data["siteA"] = (BUNDLED / "siteA", example_features)
    request_path = root / "request.json"
    request_path.write_text(json.dumps(request_doc()), encoding="utf-8")
    request = TrainingRequest.from_file(request_path)
    nodes = []
    for site, (bids, derivatives) in data.items():
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        policy = folder / "policy.toml"
        policy.write_text(example_policy(dataset=site, total_epsilon=20.0) + FEDERATION)
        init_ledger(policy)
        ledger = PrivacyLedger.from_policy(SitePolicy.from_toml(policy))
        approvals.approve(ledger, request, note="test")
        # relative to the sites file's folder: the node resolves them there
        nodes.append({"site": site, "policy": f"sites/{site}/policy.toml",
                      "bids-dir": str(bids), "derivatives": str(derivatives)})  # fmt: skip
    (root / "sites.json").write_text(json.dumps(nodes), encoding="utf-8")
    rows = {site: first_session_rows(*paths) for site, paths in data.items()}
    return {"root": root, "request": request, "rows": rows}


OUTPUTS = ("model", "metrics", "record")


def _outputs(model, metrics, record):
    return {"model": model, "metrics": metrics, "record": record}


@pytest.fixture(scope="module")
def fitted(federation):
    """``init_federated_wf`` run once (relative request and sites paths, from their folder)."""
    root = federation["root"]
    scratch = root / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(tempfile, "tempdir", str(scratch))  # the run's Flower homes: in here
        workflow = init_federated_wf(
            request="request.json", simulate="sites.json", work_dir=root / "work",
            timeout=400.0, round_timeout=60.0, check_timeout=150.0, connect_timeout=30.0,
        )  # fmt: skip
        fit = workflow.get_node("federated_fit").inputs
        assert Path(fit.request).is_absolute() and Path(fit.simulate).is_absolute()
        assert Path(fit.request).samefile(root / "request.json")
        assert (fit.check_timeout, fit.connect_timeout) == (150.0, 30.0)
        workflow.config["execution"]["crashdump_dir"] = str(root / "crash")
        # what a lab connects next (Nipype drops a dangling outputnode from the run's graph)
        collect = pe.Node(
            niu.Function(input_names=list(OUTPUTS), output_names=["out"], function=_outputs),
            name="collect",
        )
        workflow.connect(workflow.get_node("outputnode"), OUTPUTS[0], collect, OUTPUTS[0])
        for name in OUTPUTS[1:]:
            workflow.connect(workflow.get_node("outputnode"), name, collect, name)
        tic = time.monotonic()
        graph = workflow.run()
        wall = time.monotonic() - tic
    print(f"\ninit_federated_wf, simulation, 3 sites x 2 rounds: {wall:.1f} s")
    left = processes_under(scratch)
    deadline = time.monotonic() + 10.0
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_under(scratch)
    assert not left, left
    collected = {node.name: node for node in graph.nodes()}["collect"].result.outputs.out
    return SimpleNamespace(**collected)


@pytest.mark.timeout(420)
def test_the_model_file_predicts_what_its_parameters_do(fitted, federation):
    w = np.asarray(json.loads(Path(fitted.model).read_text(encoding="utf-8"))["w"], float)
    assert w.shape == (len(REGIONS) + 1,) and np.abs(w[1:]).max() > 1e-3
    model = load_model(fitted.model)
    assert is_regressor(model) and list(model.feature_names_in_) == REGIONS
    table = pd.concat([federation["rows"][s][REGIONS] for s in SITES]).dropna()
    X = table.to_numpy(float)
    assert ((X > VOLUME[0]) & (X < VOLUME[1])).all()  # inside the bounds: no clamping
    centre, half = (VOLUME[0] + VOLUME[1]) / 2, (VOLUME[1] - VOLUME[0]) / 2
    scaled = w[0] + ((X - centre) / half) @ w[1:]
    ages = (AGE[0] + AGE[1]) / 2 + (AGE[1] - AGE[0]) / 2 * scaled
    np.testing.assert_allclose(model.predict(table), ages, rtol=1e-9, atol=1e-6)


@pytest.mark.timeout(420)
def test_the_metrics_have_one_row_per_round(fitted, federation):
    """One row per round; the last round's held-out MAE and R² are the held-out-count-weighted
    means of each site's, computed here with scikit-learn at the model's parameters."""
    with open(fitted.metrics, encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert list(table[0]) == ["round", "contributors", "total_weight", "loss", "mae", "r2"]
    assert [int(r["round"]) for r in table] == [1, 2]
    request = federation["request"]
    w = np.asarray(json.loads(Path(fitted.model).read_text(encoding="utf-8"))["w"], float)
    n_train, held_out = 0, []
    for site in SITES:
        rows = federation["rows"][site].dropna(subset=["age", *REGIONS])
        held = holdout_split(
            list(rows["participant_id"]), request.holdout_fraction, request.content_hash
        )
        n_train += int((~held).sum())
        X, age = rows[REGIONS].to_numpy(float)[held], np.clip(rows["age"].to_numpy(float), *AGE)
        predicted = (AGE[0] + AGE[1]) / 2 + (AGE[1] - AGE[0]) / 2 * (
            w[0] + ((X - np.mean(VOLUME)) / (np.ptp(VOLUME) / 2)) @ w[1:]
        )
        held_out.append(
            (r2_score(age[held], predicted), mean_absolute_error(age[held], predicted), held.sum())
        )
    for row in table:
        assert row["contributors"].split(",") == list(SITES)
        assert float(row["total_weight"]) == pytest.approx(n_train, rel=1e-5)
        assert np.isfinite([float(row[k]) for k in ("loss", "mae", "r2")]).all()
    r2, mae, n = np.array(held_out).T
    assert float(table[-1]["r2"]) == pytest.approx(np.average(r2, weights=n), rel=1e-5)
    assert float(table[-1]["mae"]) == pytest.approx(np.average(mae, weights=n), rel=1e-5)
    provenance = load_model(fitted.model).fednipype_provenance_
    assert [float(r["loss"]) for r in table] == pytest.approx(
        [m["loss"] for m in provenance["metrics"]], rel=1e-5
    )


@pytest.mark.timeout(420)
def test_the_provenance_names_the_request_and_the_sites(fitted, federation):
    provenance = load_model(fitted.model).fednipype_provenance_
    request = federation["request"]
    assert provenance["request_id"] == "brain-age-fit"
    assert provenance["request_hash"] == request.content_hash
    assert provenance["rounds"] == 2 and provenance["privacy"] is None
    assert [(s["site"], s["rounds"], s["status"]) for s in provenance["sites"]] == [
        (site, [1, 2], "completed") for site in SITES
    ]
    record = json.loads(Path(fitted.record).read_text(encoding="utf-8"))
    assert record["request_hash"] == request.content_hash and record["engine"] == "simulation"
    assert Path(fitted.model).parent == Path(fitted.metrics).parent == Path(fitted.record).parent


# -- bad input: one line, before anything runs --------------------------------------------------


@pytest.mark.timeout(30)
def test_a_missing_request_fails_when_the_node_is_built(tmp_path):
    missing = tmp_path / "no-such-request.json"
    for build in (
        lambda: FederatedFit(request=str(missing)),
        lambda: init_federated_wf(request=missing, simulate=missing),
    ):
        with pytest.raises(TraitError, match="'request'") as err:
            build()
        assert "\n" not in str(err.value) and "existing file" in str(err.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["request", "sites"])
def test_a_bad_request_or_sites_file_fails_before_anything_runs(what, tmp_path):
    request, sites = tmp_path / "request.json", tmp_path / "sites.json"
    if what == "request":  # an analysis request where a training request belongs
        request.write_text(json.dumps(request_document()), encoding="utf-8")
        sites.write_text(json.dumps([{"site": "siteA"}, {"site": "siteB"}]), encoding="utf-8")
    else:
        request.write_text(json.dumps(request_doc()), encoding="utf-8")
        sites.write_text(json.dumps({"site": "siteA"}), encoding="utf-8")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    node = FederatedFit(request=str(request), simulate=str(sites))
    tic = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        with pytest.raises(RequestError if what == "request" else DataError) as err:
            node.run(cwd=str(work))
    assert time.monotonic() - tic < 10.0
    message = str(err.value)
    assert "\n" not in message and f"{what}.json" in message, message
    assert not list(scratch.iterdir()) and not processes_under(scratch)
    assert not list(work.iterdir())
