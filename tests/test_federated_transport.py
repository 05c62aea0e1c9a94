"""Integer vectors through Flower's SecAgg+: the transport's encoding and the Flower app.

Two parts:

- in-process checks of :mod:`fednipype.federated.transport` against Flower's own SecAgg+
  client code (``secaggplus_mod``'s masking step, its quantiser, its PRG) at the bounds;
- real runs of the app in Flower's simulation engine: a ``flower-superlink --simulation``
  started by the test (its own ports, its own process group) and ``flwr run`` of the test
  app ``tests/data/secagg_echo_app`` (fednipype's server app unchanged; the real
  ``SiteClient`` behind the real ``secaggplus_mod``, whose sites send known vectors). The
  expected sums are numpy sums of those vectors.

``flwr run APP CONNECTION`` against a SuperLink started here is used rather than the
``local`` connection (which starts a detached SuperLink the test could not own) or the
deprecated in-process ``run_simulation``: it is the same command a deployment uses, and
every process it starts is a descendant of one process group the test stops and checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
)
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fednipype.exceptions import (
    FederationError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.federated.app.client_app import public_reason
from fednipype.federated.app.server import RunSettings
from fednipype.federated.transport import (
    FIT_NUM_EXAMPLES,
    MAX_COORDINATE_BOUND,
    MAX_SUM_BOUND,
    SecAggEncoding,
)

ECHO_APP = Path(__file__).parent / "data" / "secagg_echo_app"
MARKER = "FEDNIPYPE_SECAGG_TEST_RUN"
K = 3
#: The largest per-site bound one coordinate carries for 3 sites: K * B <= 2**31 - 1.
B3 = (2**31 - 1) // K
#: The largest per-site bound for 3 sites (two limbs): K * B <= 2**53.
BIG3 = MAX_SUM_BOUND // K
ECHO_SIZE = 12
ECHO_SEED = 11


def _echo_module() -> Any:
    spec = importlib.util.spec_from_file_location("secagg_echo_client", ECHO_APP / "client_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def echo_vectors(bound: int = B3) -> list[np.ndarray]:
    """The known vectors the echo sites send (inputs of the runs, not results)."""
    echo = _echo_module()
    return [echo.echo_vector(p, bound=bound, size=ECHO_SIZE, seed=ECHO_SEED) for p in range(K)]


# -- the encoding against Flower's SecAgg+ code, in process ------------------------------------


def _through_secaggplus(vectors: list[np.ndarray], enc: SecAggEncoding) -> np.ndarray:
    """Each vector through Flower's client masking step; the sum unmasked and dequantised.

    The client side is Flower's own ``_collect_masked_vectors`` (weight, quantisation,
    private mask, mod m). Pairwise masks cancel in the sum and are left out (no
    neighbours); the full protocol runs in the simulation tests below. The last three
    operations are those of ``SecAggPlusWorkflow.unmask_stage`` after unmasking.
    """
    masked, seeds = None, []
    for node, vector in enumerate(vectors, start=1):
        state = SecAggPlusState()
        state.nid, state.threshold = node, 1
        state.clipping_range = enc.clipping_range
        state.target_range = enc.quantization_range
        state.mod_range = enc.modulus_range
        state.max_weight = enc.max_weight
        state.rd_seed = os.urandom(32)
        seeds.append(state.rd_seed)
        configs = ConfigRecord({Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []})
        params = ndarrays_to_parameters([enc.encode(vector)])
        reply = _collect_masked_vectors(state, configs, FIT_NUM_EXAMPLES, params)
        arrays = [bytes_to_ndarray(b) for b in reply[Key.MASKED_PARAMETERS]]
        masked = arrays if masked is None else parameters_addition(masked, arrays)
    masked = parameters_mod(masked, enc.modulus_range)
    for seed in seeds:
        mask = pseudo_rand_gen(seed, enc.modulus_range, [a.shape for a in masked])
        masked = parameters_subtraction(masked, mask)
    ratio, recon = factor_extract(parameters_mod(masked, enc.modulus_range))
    assert recon[0].size == enc.limbs * vectors[0].size
    assert ratio == len(vectors)  # every site's weight quantised to 1: no wrap of the ratio
    (aggregated,) = dequantize(recon, enc.clipping_range, enc.quantization_range)
    aggregated += -(len(vectors) - 1) * enc.clipping_range
    aggregated *= enc.quantization_range / ratio
    return aggregated


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("bound", "sites"),
    [
        (MAX_COORDINATE_BOUND, 2),
        (B3, 3),
        (1, 4),
        (B3 + 1, 3),
        (BIG3, 3),
        (MAX_SUM_BOUND // 17, 17),
        (MAX_SUM_BOUND // 1000, 1000),
    ],
)
def test_flower_masking_step_carries_integers_exactly(bound: int, sites: int) -> None:
    enc = SecAggEncoding.for_bound(bound, n_sites=sites)
    assert (enc.limbs == 1) == (bound <= (2**31 - 1) // sites)
    rng = np.random.default_rng(sites)
    vectors = [rng.integers(-bound, bound + 1, size=40) for _ in range(sites)]
    for k, vec in enumerate(vectors):  # the extremes: every site at +B, at -B, and mixed
        vec[:3] = [bound, -bound, bound if k % 2 else -bound]
    expected = np.sum(np.stack(vectors).astype(np.int64), axis=0)
    decoded = enc.decode(_through_secaggplus(vectors, enc), n_contributors=sites)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, expected)
    assert decoded[0] == sites * bound and decoded[1] == -sites * bound


@pytest.mark.timeout(30)
def test_one_coordinate_limit_is_flowers_int32_cast() -> None:
    # At c = 2**30 (D = 2**30 - 1) Flower's quantiser gives d + c exactly up to 2**31 - 1 ...
    clip, target = float(2**30), 2**31
    bound = MAX_COORDINATE_BOUND
    ok = quantize([np.array([bound, -bound], float)], clip, target)[0]
    assert ok.tolist() == [2**31 - 1, 1]
    # ... one more and the int32 cast wraps: 2**30 cannot be one coordinate, so it is split.
    with warnings.catch_warnings():  # numpy warns of the overflowing cast it performs
        warnings.simplefilter("ignore", RuntimeWarning)
        wrapped = quantize([np.array([2.0**30])], clip, target)[0]
    assert wrapped.tolist() != [2**31]
    assert SecAggEncoding.for_bound(bound, n_sites=2).limbs == 1
    assert SecAggEncoding.for_bound(bound + 1, n_sites=2).limbs == 2


@pytest.mark.timeout(30)
def test_encoding_parameters_and_limits() -> None:
    enc = SecAggEncoding.for_bound(1000, n_sites=K)
    assert (enc.clipping_range, enc.quantization_range, enc.max_weight) == (1024.0, 2048, 2048.0)
    assert enc.workflow_parameters()["modulus_range"] == 2**32
    # Flower's weight: round(num_examples / max_weight * Q) is exactly 1 for every site.
    assert round(FIT_NUM_EXAMPLES / enc.max_weight * enc.quantization_range) == 1
    big = SecAggEncoding.for_bound(BIG3, n_sites=K)  # 29-bit digits: K (2**29 - 1) < 2**31
    assert (big.limbs, big.limb_bits, big.quantization_range) == (2, 29, 2**30)
    with pytest.raises(FederationError, match="K \\* B <= 2"):
        SecAggEncoding.for_bound(BIG3 + 1, n_sites=K)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(FederationError, match="site-bound"):
            SecAggEncoding.for_bound(bad, n_sites=K)
    with pytest.raises(FederationError, match="contributors"):
        enc.decode(np.zeros(4), n_contributors=K + 1)
    with pytest.raises(FederationError, match="exceeds site-bound"):
        enc.encode(np.array([1001]))
    with pytest.raises(FederationError, match="integer vector"):
        enc.encode(np.array([1.5]))
    with pytest.raises(FederationError, match="quantization-range"):
        SecAggEncoding.from_config({"site-bound": 1000, "sites": K, "quantization-range": 4096})
    # A vector off the integer grid (other quantisation parameters) is refused, not rounded.
    with pytest.raises(FederationError, match="integer grid"):
        enc.decode(np.array([0.25 * 2048 / 3]), n_contributors=3)


@pytest.mark.timeout(30)
def test_the_layout_grid_fits_the_transport() -> None:
    from fednipype.contract import secure_sum

    # The grid the hub and the sites derive from a request assumes this capacity.
    assert secure_sum.DEFAULT_CAPACITY == MAX_SUM_BOUND


@pytest.mark.timeout(30)
def test_refusal_reasons_carry_public_facts_only() -> None:
    private = "site-b: 212 participants, spent 0.93 at /data/site-b/ledger.sqlite"
    for err in (
        PrivacyBudgetExceeded(private),
        PolicyError(private),
        RequestError(private),
        ValueError(private),
    ):
        reason = public_reason(err)
        assert reason and "212" not in reason and "/data" not in reason and "0.93" not in reason
    err = RequestError(private)
    err.public_reason = "refused: request abc123 is pending the data owner's approval"
    assert public_reason(err) == err.public_reason


@pytest.mark.timeout(30)
def test_run_settings_name_the_bad_key() -> None:
    good = {
        "request": "r.json",
        "out-dir": "out",
        "min-sites": 2,
        "num-shares": 3,
        "reconstruction-threshold": 2,
        "timeout": 30.0,
        "connect-timeout": 10.0,
        "site-bound": 1000,
    }
    assert RunSettings.from_run_config(good).secure_aggregation is True
    for key, value in (
        ("min-sites", 1),
        ("timeout", 0.0),
        ("site-bound", -1),
        ("site-bound", 2**53 + 1),
        ("min-sites", "2"),
    ):
        with pytest.raises(FederationError, match=key):
            RunSettings.from_run_config({**good, key: value})
    with pytest.raises(FederationError, match="'request' is missing"):
        RunSettings.from_run_config({k: v for k, v in good.items() if k != "request"})


# -- the app in Flower's simulation engine -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this module's marker (all it started)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


class SimulationLink:
    """A ``flower-superlink --simulation`` of this module: own ports, group, FLWR_HOME."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = uuid.uuid4().hex
        self.port, control = _free_port(), _free_port()
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            MARKER: self.marker,
        }
        bindir = Path(sys.executable).parent
        self.log = (root / "superlink.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(bindir / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--control-api-address",
                f"127.0.0.1:{control}",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.flwr = str(bindir / "flwr")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("flower-superlink did not become healthy within 60 s")

    def run(self, name: str, bound: int = B3, **overrides: Any) -> tuple[dict[str, Any], float]:
        """``flwr run`` of the echo app with three simulated sites; the written outcome."""
        out = self.root / name
        request = self.root / f"{name}-request.json"
        min_sites = overrides.pop("request_min_sites", 2)
        request.write_text(json.dumps(_request(name, min_sites)))
        config = {
            "request": str(request),
            "out-dir": str(out),
            "site-bound": bound,
            "echo-size": ECHO_SIZE,
            "echo-seed": ECHO_SEED,
            "timeout": 60.0,
            **overrides,
        }
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        tic = time.monotonic()
        done = subprocess.run(
            [self.flwr, "run", str(ECHO_APP), "sim", "--stream"]
            + ["--federation-config", f"num-supernodes={K}", "--run-config", run_config],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        wall = time.monotonic() - tic
        (self.root / f"{name}-flwr.log").write_text(done.stdout + done.stderr)
        target = out / "secure_sum.json"
        assert target.is_file(), f"no outcome written; flwr run said:\n{done.stdout[-3000:]}"
        return json.loads(target.read_text()), wall

    def stop(self) -> list[int]:
        """Stop the SuperLink's process group; return marked processes that outlived it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        deadline = time.monotonic() + 20
        while (left := _marked_pids(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only processes this module started carry the marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def _request(name: str, min_sites: int) -> dict[str, Any]:
    return {
        "schema": "fednipype-request/1.0",
        "request_id": f"echo-{name}",
        "sites": [f"site-{p}" for p in range(K)],
        "model": {"response": "volume_mm3", "numeric": ["age"], "categorical": {}},
        "regions": ["L_P27", "R_P27"],
        "bounds": {"covariates": {"age": [18, 90]}, "regions": {"default": [0, 12000]}},
        "mode": "dp",
        "epsilon": 1.0,
        "delta": 1e-5,
        "max_dropouts": 0,
        "min_sites": min_sites,
        "max_participants": 1000,
    }


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sim = SimulationLink(tmp_path_factory.mktemp("secagg-sim"))
    yield sim
    assert sim.stop() == [], "Flower or Ray processes outlived the SuperLink"


def _integer_lists(doc: Any) -> list[list[int]]:
    """Every list of integers anywhere in the written outcome."""
    if isinstance(doc, dict):
        return [lst for value in doc.values() for lst in _integer_lists(value)]
    if isinstance(doc, list):
        if doc and all(isinstance(v, int) and not isinstance(v, bool) for v in doc):
            return [doc]
        return [lst for value in doc for lst in _integer_lists(value)]
    return []


def _status(doc: dict[str, Any]) -> dict[str, str]:
    return {row["site"]: row["status"] for row in doc["sites"]}


TIMES: dict[str, float] = {}


@pytest.mark.timeout(300)
def test_secure_sum_is_the_exact_sum_and_the_hub_holds_only_it(link: SimulationLink) -> None:
    doc, wall = link.run("exact", bound=BIG3)  # two limbs per integer
    vectors = echo_vectors(BIG3)
    expected = np.sum(np.stack(vectors), axis=0)
    assert doc["status"] == "completed", doc["error"]
    assert doc["transport"]["limbs"] == 2
    assert doc["sum"] == expected.tolist()
    assert doc["sum"][0] == K * BIG3 and doc["sum"][1] == -K * BIG3  # the extremes
    assert doc["contributors"] == ["site-0", "site-1", "site-2"]
    # What aggregate_fit received: one result per site, all one and the same aggregate ...
    assert doc["aggregate_fit"] == {"results": K, "distinct_parameters": 1, "failures": []}
    # ... and no site's own vector is anywhere in what the server wrote.
    written = _integer_lists(doc)
    assert all(lst != vec.tolist() for lst in written for vec in vectors)
    assert doc["transport"]["quantization_range"] == 2 * doc["transport"]["clipping_range"]
    TIMES["secagg_round_s"] = doc["timings_s"]["aggregation"]
    TIMES["secagg_run_s"] = wall
    print(f"\nSecAgg+ round {doc['timings_s']['aggregation']:.2f} s, flwr run {wall:.1f} s")


@pytest.mark.timeout(300)
def test_a_refusing_site_is_excluded_and_the_run_completes(link: SimulationLink) -> None:
    doc, _ = link.run("refuse", **{"echo-refuse": "2"})
    vectors = echo_vectors()
    assert doc["status"] == "completed", doc["error"]
    assert doc["contributors"] == ["site-0", "site-1"]
    assert doc["sum"] == (vectors[0] + vectors[1]).tolist()
    refused = next(row for row in doc["sites"] if row["site"] == "site-2")
    assert refused["status"] == "refused"
    assert refused["reason"] == public_reason(RequestError("x"))
    assert "pending" not in json.dumps(doc)  # the site's own text stayed at the site
    assert doc["aggregate_fit"]["results"] == 2


@pytest.mark.timeout(300)
def test_too_few_accepting_sites_stop_with_a_clear_error(link: SimulationLink) -> None:
    doc, wall = link.run("quorum", **{"echo-refuse": "1,2"})
    assert doc["status"] == "failed"
    assert "1 of 3 sites accepted" in doc["error"] and "min-sites is 2" in doc["error"]
    assert "sum" not in doc
    assert _status(doc) == {"site-0": "accepted", "site-1": "refused", "site-2": "refused"}
    assert wall < 120


@pytest.mark.timeout(300)
def test_a_site_failing_in_the_secagg_round_is_dropped(link: SimulationLink) -> None:
    doc, _ = link.run("dropout", **{"echo-fail-fit": "1"})
    vectors = echo_vectors()
    assert doc["status"] == "completed", doc["error"]
    assert _status(doc) == {"site-0": "contributed", "site-1": "dropped", "site-2": "contributed"}
    assert doc["sum"] == (vectors[0] + vectors[2]).tolist()  # its masks were reconstructed
    # The failure reaches the hub as the site's public sentence, not its own text.
    assert doc["aggregate_fit"]["failures"] == [public_reason(PrivacyBudgetExceeded("x"))]
    assert "181 participants" not in json.dumps(doc)


@pytest.mark.timeout(300)
def test_a_run_below_min_sites_in_the_secagg_round_unmasks_nothing(link: SimulationLink) -> None:
    doc, _ = link.run("late-quorum", **{"echo-fail-fit": "1", "min-sites": 3})
    assert doc["status"] == "failed"
    assert "no sum was unmasked" in doc["error"] and "collect-masked-vectors" in doc["error"]
    assert "sum" not in doc
    assert _status(doc) == {"site-0": "accepted", "site-1": "dropped", "site-2": "accepted"}


@pytest.mark.timeout(300)
def test_plain_baseline_sums_the_same_and_shows_each_vector(link: SimulationLink) -> None:
    doc, wall = link.run("plain", bound=BIG3, **{"secure-aggregation": False})
    vectors = echo_vectors(BIG3)
    assert doc["status"] == "completed", doc["error"]
    assert doc["sum"] == np.sum(np.stack(vectors), axis=0).tolist()
    assert doc["aggregate_fit"]["distinct_parameters"] == K  # what SecAgg+ keeps from the hub
    TIMES["plain_round_s"] = doc["timings_s"]["aggregation"]
    TIMES["plain_run_s"] = wall
    print(f"\nplain round {doc['timings_s']['aggregation']:.2f} s, flwr run {wall:.1f} s; {TIMES}")


@pytest.mark.timeout(120)
def test_no_flower_or_ray_process_is_left(link: SimulationLink) -> None:
    assert _marked_pids(link.marker)  # the SuperLink and its executor are running ...
    assert link.stop() == []  # ... and nothing it started outlives it
    assert _marked_pids(link.marker) == []


# -- the same app against a deployed SuperLink --------------------------------------------------


@pytest.mark.timeout(480)
def test_the_app_runs_against_a_tls_superlink_and_supernodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run APP CONNECTION`` against a real SuperLink (TLS, node auth), 3 SuperNodes."""
    from fednipype.federated.deploy import LocalConsortium, processes_matching

    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    request, out = tmp_path / "request.json", tmp_path / "out"
    request.write_text(json.dumps(_request("deployed", 2)))
    sites = {f"site-{p}": {"partition-id": p} for p in range(K)}
    config = {
        "request": str(request),
        "out-dir": str(out),
        "site-bound": BIG3,
        "echo-size": ECHO_SIZE,
        "echo-seed": ECHO_SEED,
        "timeout": 90.0,
        "connect-timeout": 60.0,
    }
    with LocalConsortium(tmp_path / "consortium", sites, stop_grace=5.0) as consortium:
        done = consortium.run(ECHO_APP, config, timeout=360.0)
        pattern = consortium.process_pattern()
    doc = json.loads((out / "secure_sum.json").read_text())
    assert doc["status"] == "completed", (doc["error"], done.stdout[-2000:])
    assert doc["sum"] == np.sum(np.stack(echo_vectors(BIG3)), axis=0).tolist()
    assert doc["contributors"] == ["site-0", "site-1", "site-2"]
    assert doc["aggregate_fit"]["distinct_parameters"] == 1
    assert processes_matching(pattern, flower_only=False) == {}
    print(
        f"\ndeployed: SecAgg+ round {doc['timings_s']['aggregation']:.1f} s, check "
        f"{doc['timings_s']['check']:.1f} s, flwr run {done.seconds:.1f} s"
    )
