"""A site's part in federated training on the bundled sites' real features, with real SQLite
ledgers and OpenDP's samplers: the whole run charged before the first reply (its ε against an
independent dp-accounting call), at most ``rounds`` rounds ever, refusals before any charge
with public texts only, and the documented handling of bad input."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
from pathlib import Path

import dp_accounting
import numpy as np
import pandas as pd
import pytest
from dp_accounting import rdp
from support import BUNDLED

from fednipype.contract.training import TRAINING_SCHEMA, TrainingRequest
from fednipype.exceptions import DataError, PolicyError, PrivacyBudgetExceeded, RequestError
from fednipype.site import approvals
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy
from fednipype.site.training import (
    ROUND_KIND,
    check_training_request,
    evaluate_round,
    run_state,
    train_round,
)

REGIONS = ["L_P01", "R_P01", "L_P12", "R_P12"]
TRAINING_DP = '\n[federation]\nmodes = ["dp", "training-dp"]\n'
NON_DP_TOO = '\n[federation]\nmodes = ["training-dp"]\nallow_non_dp_training = true\n'
NON_DP = dict.fromkeys(("epsilon", "delta", "sampling_rate", "clip"))


def request(**changes) -> TrainingRequest:
    doc = {
        "schema": TRAINING_SCHEMA,
        "request_id": "brain-age-test",
        "sites": ["siteA", "siteB", "siteC"],
        "task": "brain-age",
        "regions": REGIONS,
        "bounds": {"regions": {"default": [0, 12000]}, "label": [18, 90]},
        "mode": "dp",
        "epsilon": 2.0,
        "delta": 1e-5,
        "rounds": 3,
        "local_steps": 2,
        "learning_rate": 0.5,
        "l2": 1e-3,
        "sampling_rate": 0.5,
        "clip": 1.0,
        "holdout_fraction": 0.25,
        "min_sites": 2,
        "max_participants": 1000,
    }
    doc.update(changes)
    if doc["task"] == "diagnosis" and "bounds" not in changes:
        doc["bounds"] = {"regions": {"default": [0, 12000]}}
    return TrainingRequest.from_document(doc, source="train.json")


class Site:
    """One bundled site: its policy, ledger, participants table and feature tables."""

    def __init__(self, folder: Path, site_policy, derivatives: Path, name: str = "siteA",
                 *, federation: str = TRAINING_DP, epsilon: float = 10.0):  # fmt: skip
        self.name = name
        self.policy = site_policy(folder / "policy", dataset=name, epsilon=epsilon, bind=False)
        self.policy.write_text(self.policy.read_text() + federation, encoding="utf-8")
        init_ledger(self.policy)
        self.bids = folder / "bids"
        self.bids.mkdir()
        shutil.copy(BUNDLED / name / "participants.tsv", self.bids / "participants.tsv")
        shutil.copy(BUNDLED / name / "participants.json", self.bids / "participants.json")
        self.derivatives = folder / "derivatives"
        shutil.copytree(derivatives, self.derivatives)
        self.config = {
            "site": name,
            "policy": str(self.policy),
            "bids-dir": str(self.bids),
            "derivatives": str(self.derivatives),
        }

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.from_policy(SitePolicy.from_toml(self.policy))

    def participants(self) -> pd.DataFrame:
        return pd.read_csv(self.bids / "participants.tsv", sep="\t", dtype=str)

    def write_participants(self, table: pd.DataFrame) -> None:
        table.to_csv(self.bids / "participants.tsv", sep="\t", index=False)

    def raw_rows(self, task: str) -> pd.DataFrame:
        """Complete rows read with pandas from the files (independent of the site code):
        the first session per participant, its volumes and its label."""
        rows = {}
        for tsv in sorted(self.derivatives.rglob("*_desc-regional_features.tsv")):
            pid = tsv.name.split("_")[0]
            if pid not in rows:
                table = pd.read_csv(tsv, sep="\t", na_values=["n/a"]).set_index("name")
                rows[pid] = table.loc[REGIONS, "volume_mm3"].to_numpy(dtype=float)
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=REGIONS)
        people = self.participants().set_index("participant_id")
        if task == "brain-age":
            frame["label"] = pd.to_numeric(people["age"], errors="coerce")
        else:
            frame["label"] = people["group"].map({"control": 0.0, "patient": 1.0})
        return frame.dropna()

    def refusal(self, call, kind) -> str:
        with pytest.raises(kind) as err:
            call()
        assert err.value.public_reason == str(err.value)
        return str(err.value)


def held_out(ids, fraction: float, key: str) -> np.ndarray:
    """The documented hold-out rule, recomputed with hashlib."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{key}\0{pid}".encode()).digest()[:8], "big") / 2**64
            < fraction
            for pid in ids
        ]
    )


def charges(ledger: PrivacyLedger) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(ledger.path)) as conn:
        return conn.execute("SELECT epsilon, delta, noise_multiplier FROM charge").fetchall()


@pytest.fixture
def site(tmp_path, site_policy, bundled_derivatives) -> Site:
    return Site(tmp_path / "a", site_policy, bundled_derivatives["siteA"])


W0 = np.zeros(len(REGIONS) + 1)


# -- the charge -----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_first_round_charges_the_whole_runs_accountant_epsilon(site):
    req = request()
    approvals.approve(site.ledger, req)
    check_training_request(req, site.config)  # data-free: nothing recorded
    assert site.ledger.audit_trail() == []
    first = train_round(req, site.config, W0, 1)
    # One charge: the accountant's epsilon of the whole run, composed by its own (eps, delta).
    ((epsilon, delta, multiplier),) = charges(site.ledger)
    sigma, sigma_count = req.noise()
    step = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(sigma))
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(step, 3 * 2),
                dp_accounting.GaussianDpEvent(sigma_count),
            ]
        )
    )
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-2)
    assert epsilon <= 2.0 and delta == 1e-5 and multiplier is None
    (record,) = site.ledger.audit_trail()
    assert record.parameters["request_hash"] == req.content_hash
    assert record.parameters["steps"] == 6 and record.content_sha256 is not None
    assert approvals.request_status(site.ledger, req.content_hash) == "answered"
    # The noisy count is released once and reused by every round as the weight.
    assert first.metrics is None and first.w_local.shape == (5,)
    assert np.all(np.isfinite(first.w_local))
    second = train_round(req, site.config, first.w_local, 2)
    assert second.weight == first.weight >= 1.0
    assert len(charges(site.ledger)) == 1
    state = run_state(site.ledger, req.content_hash)
    assert (state.started, state.rounds_answered, state.weight) == (True, 2, first.weight)
    # Its noise: sd sigma_count around the exact training count (a loose 6-sd check).
    rows = site.raw_rows("brain-age")
    n_train = int((~held_out(rows.index, 0.25, req.content_hash)).sum())
    assert abs(first.weight - n_train) < 6 * sigma_count + 1


@pytest.mark.timeout(300)
def test_rounds_beyond_the_requests_are_refused_ever(site):
    req = request(rounds=2, local_steps=1)
    approvals.approve(site.ledger, req)
    w = W0
    for r in (1, 2):
        w = train_round(req, site.config, w, r).w_local
    before = (site.ledger.audit_trail(), site.ledger.spent())
    text = site.refusal(lambda: train_round(req, site.config, w, 2), RequestError)
    assert "answered all 2 rounds of this request already" in text
    site.refusal(lambda: check_training_request(req, site.config), RequestError)
    # A new approval of the same request gives no new rounds.
    approvals.approve(site.ledger, req)
    site.refusal(lambda: train_round(req, site.config, w, 1), RequestError)
    assert (site.ledger.audit_trail(), site.ledger.spent()) == before
    rounds = [e for e in site.ledger.events() if e[1] == ROUND_KIND]
    assert len(rounds) == 2


@pytest.mark.timeout(300)
def test_an_exhausted_budget_is_refused_before_any_charge(tmp_path, site_policy,
                                                          bundled_derivatives):  # fmt: skip
    site = Site(tmp_path / "poor", site_policy, bundled_derivatives["siteA"], epsilon=1.0)
    req = request(epsilon=2.0)
    approvals.approve(site.ledger, req)
    events = site.ledger.events()
    for call in (
        lambda: check_training_request(req, site.config),
        lambda: train_round(req, site.config, W0, 1),
    ):
        text = site.refusal(call, PrivacyBudgetExceeded)
        assert "privacy budget does not cover the run's epsilon=" in text and "3 rounds" in text
    assert site.ledger.audit_trail() == [] and site.ledger.spent().epsilon == 0
    assert site.ledger.events() == events  # nothing recorded
    assert approvals.request_status(site.ledger, req.content_hash) == "approved"


# -- policy, approval and refusal texts -------------------------------------------------------


@pytest.mark.timeout(300)
def test_mode_none_is_refused_unless_the_policy_opts_in(tmp_path, site_policy, site,
                                                        bundled_derivatives):  # fmt: skip
    req = request(mode="none", **NON_DP)
    approvals.approve(site.ledger, req)
    for call in (
        lambda: check_training_request(req, site.config),
        lambda: train_round(req, site.config, W0, 1),
    ):
        assert "allow_non_dp_training is not true" in site.refusal(call, PolicyError)
    assert site.ledger.events()[-1][1] == "federation-request-approved"
    # Opted in: it trains; the weight is the exact training count; nothing is charged.
    opted = Site(tmp_path / "opt", site_policy, bundled_derivatives["siteA"],
                 federation=NON_DP_TOO)  # fmt: skip
    approvals.approve(opted.ledger, req)
    reply = train_round(req, opted.config, W0, 1)
    rows = opted.raw_rows("brain-age")
    held = held_out(rows.index, 0.25, req.content_hash)
    assert reply.weight == (~held).sum() and reply.metrics["n"] == (~held).sum()
    assert opted.ledger.audit_trail() == []
    assert "federation-exact-disclosure" in [kind for _, kind, _ in opted.ledger.events()]
    # Held-out metrics of w against numpy on the raw rows.
    metrics = evaluate_round(req, opted.config, reply.w_local, 1)
    # The scaled interval [a, b] the bounds map onto, read off the request's scaling at the
    # bounds themselves; the map itself recomputed with numpy.
    scaling = req.scaling
    (a, *_), (b, *_) = scaling.transform(np.array([[0.0] * 4, [12000.0] * 4]))
    la, lb = scaling.label_transform(np.array([18.0, 90.0]))
    x = a + (b - a) * np.clip(rows[REGIONS].to_numpy()[held], 0, 12000) / 12000
    predicted = 18 + 72 * ((reply.w_local[0] + x @ reply.w_local[1:]) - la) / (lb - la)
    truth = rows["label"].to_numpy()[held]
    assert metrics["n"] == held.sum()
    assert metrics["mae"] == pytest.approx(np.abs(predicted - truth).mean(), rel=1e-9)
    residual = ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
    assert metrics["r2"] == pytest.approx(1 - residual, rel=1e-9)
    # One evaluation per round trained: the hub cannot query parameters of its choosing.
    text = opted.refusal(lambda: evaluate_round(req, opted.config, W0, 1), RequestError)
    assert "answered 1 evaluations for the 1 rounds it trained" in text
    kinds = [kind for _, kind, _ in opted.ledger.events()]
    assert kinds.count("federation-training-evaluation") == 1


def test_dp_metrics_never_leave_the_site(site):
    req = request()
    approvals.approve(site.ledger, req)
    text = site.refusal(lambda: evaluate_round(req, site.config, W0, 1), RequestError)
    assert "no round of this run was trained" in text
    train_round(req, site.config, W0, 1)
    text = site.refusal(lambda: evaluate_round(req, site.config, W0, 1), RequestError)
    assert text.endswith("in mode dp no metric leaves the site")
    distributed = request(mode="distributed-dp", local_steps=1, sampling_rate=1.0)
    text = site.refusal(lambda: evaluate_round(distributed, site.config, W0, 1), RequestError)
    assert "no round of this run was trained" in text


def test_unapproved_requests_are_recorded_pending_at_the_check(site):
    req = request()
    text = site.refusal(lambda: check_training_request(req, site.config), RequestError)
    assert "not approved by the site's data owner; recorded as pending" in text
    assert approvals.request_status(site.ledger, req.content_hash) == "pending"
    (record,) = approvals.list_requests(site.ledger)
    assert (record.kind, record.task, record.rounds) == ("training", "brain-age", 3)
    site.refusal(lambda: train_round(req, site.config, W0, 1), RequestError)
    assert site.ledger.audit_trail() == []


def test_a_missing_region_is_refused_at_the_check(site):
    req = request(regions=["L_P01", "L_P99"])
    approvals.approve(site.ledger, req)
    text = site.refusal(lambda: check_training_request(req, site.config), RequestError)
    assert text.endswith("refused: regions not in the site's atlas: L_P99")
    site.refusal(lambda: train_round(req, site.config, np.zeros(3), 1), RequestError)
    assert site.ledger.audit_trail() == []


@pytest.mark.timeout(300)
def test_refusal_texts_do_not_depend_on_the_data(tmp_path, site_policy, bundled_derivatives):
    """Two datasets differing in one participant give byte-identical refusal texts, without
    a count, a value or a path."""
    texts = {}
    for label in ("full", "less"):
        one = Site(tmp_path / label, site_policy, bundled_derivatives["siteA"], epsilon=3.0)
        if label == "less":
            one.write_participants(one.participants().iloc[1:])
        spent = request(request_id="spent", rounds=1, local_steps=1)
        approvals.approve(one.ledger, spent)
        train_round(spent, one.config, W0, 1)
        over = request(request_id="over", epsilon=2.5)
        approvals.approve(one.ledger, over)
        missing = request(request_id="missing", regions=["L_P01", "X_P00"], epsilon=0.5)
        approvals.approve(one.ledger, missing)
        none = request(request_id="none", mode="none", **NON_DP)
        approvals.approve(one.ledger, none)
        texts[label] = [
            one.refusal(
                lambda o=one: train_round(request(request_id="new"), o.config, W0, 1), RequestError
            ),  # fmt: skip
            one.refusal(
                lambda o=one, r=over: train_round(r, o.config, W0, 1), PrivacyBudgetExceeded
            ),  # fmt: skip
            one.refusal(
                lambda o=one, r=missing: check_training_request(r, o.config), RequestError
            ),  # fmt: skip
            one.refusal(lambda o=one, r=none: train_round(r, o.config, W0, 1), PolicyError),
            one.refusal(lambda o=one, r=spent: train_round(r, o.config, W0, 1), RequestError),
        ]
    assert texts["full"] == texts["less"]
    for text in texts["full"]:
        assert "siteA" in text and "refused" in text
        assert "/" not in text and "sqlite" not in text and "sub-" not in text


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_nan_features_and_missing_labels_are_left_out(tmp_path, site_policy,
                                                      bundled_derivatives):  # fmt: skip
    req = request(mode="none", **NON_DP)
    site = Site(tmp_path / "bad", site_policy, bundled_derivatives["siteA"],
                federation=NON_DP_TOO)  # fmt: skip
    clean = site.raw_rows("brain-age")
    train = clean.index[~held_out(clean.index, 0.25, req.content_hash)]
    # A NaN feature for one training participant, no age for another.
    nan_id, no_age = train[0], train[1]
    for tsv in site.derivatives.rglob(f"{nan_id}_*desc-regional_features.tsv"):
        table = pd.read_csv(tsv, sep="\t", dtype={"name": str}, keep_default_na=False)
        table["volume_mm3"] = table["volume_mm3"].astype(object)
        table.loc[table["name"] == "R_P01", "volume_mm3"] = "n/a"
        table.to_csv(tsv, sep="\t", index=False)
    people = site.participants()
    people.loc[people["participant_id"] == no_age, "age"] = "n/a"
    site.write_participants(people)
    approvals.approve(site.ledger, req)
    reply = train_round(req, site.config, W0, 1)
    assert reply.weight == len(train) - 2 and np.all(np.isfinite(reply.w_local))
    # The same left out in DP mode: it trains.
    dp_site = Site(tmp_path / "bad-dp", site_policy, bundled_derivatives["siteA"])
    shutil.copytree(site.derivatives, dp_site.derivatives, dirs_exist_ok=True)
    dp_site.write_participants(people)
    dp = request()
    approvals.approve(dp_site.ledger, dp)
    assert np.all(np.isfinite(train_round(dp, dp_site.config, W0, 1).w_local))


@pytest.mark.timeout(300)
def test_a_single_class_site_trains_for_diagnosis(tmp_path, site_policy, bundled_derivatives):
    site = Site(tmp_path / "one-class", site_policy, bundled_derivatives["siteA"],
                federation=NON_DP_TOO)  # fmt: skip
    people = site.participants()
    people["group"] = "control"
    site.write_participants(people)
    req = request(task="diagnosis", mode="none", **NON_DP)
    approvals.approve(site.ledger, req)
    reply = train_round(req, site.config, W0, 1)
    assert np.all(np.isfinite(reply.w_local)) and reply.w_local[0] < 0  # towards control
    metrics = evaluate_round(req, site.config, reply.w_local, 1)
    assert "auc" not in metrics and "balanced_accuracy" not in metrics
    assert metrics["loss"] > 0 and metrics["n"] >= 1
    # DP mode too.
    dp_site = Site(tmp_path / "one-class-dp", site_policy, bundled_derivatives["siteA"])
    dp_site.write_participants(people)
    dp = request(task="diagnosis")
    approvals.approve(dp_site.ledger, dp)
    assert np.all(np.isfinite(train_round(dp, dp_site.config, W0, 1).w_local))


def test_bad_global_parameters_are_refused_before_any_charge(site):
    req = request()
    approvals.approve(site.ledger, req)
    for w, server_round in ((np.zeros(3), 1), (np.full(5, np.nan), 1), (W0, 4)):
        site.refusal(lambda w=w, r=server_round: train_round(req, site.config, w, r),
                     RequestError)  # fmt: skip
    assert site.ledger.audit_trail() == []
    with pytest.raises(DataError):  # a missing participants table: public text
        train_round(req, {**site.config, "bids-dir": str(site.bids / "absent")}, W0, 1)
    assert site.ledger.audit_trail() == []


def test_an_edited_table_is_read_afresh_between_rounds(tmp_path, site_policy, bundled_derivatives):
    """The site's tables are read once per process while unchanged: an edit between two calls
    is seen by the next one (here: one held-out participant's age removed)."""
    site = Site(tmp_path / "edit", site_policy, bundled_derivatives["siteA"],
                federation=NON_DP_TOO)  # fmt: skip
    req = request(mode="none", **NON_DP)
    approvals.approve(site.ledger, req)
    check_training_request(req, site.config)
    reply = train_round(req, site.config, W0, 1)
    rows = site.raw_rows("brain-age")
    held = held_out(rows.index, 0.25, req.content_hash)
    assert evaluate_round(req, site.config, reply.w_local, 1)["n"] == held.sum()
    people = site.participants()
    people.loc[people["participant_id"] == rows.index[held][0], "age"] = "n/a"
    site.write_participants(people)
    reply = train_round(req, site.config, reply.w_local, 2)  # one evaluation per round trained
    assert evaluate_round(req, site.config, reply.w_local, 2)["n"] == held.sum() - 1
    # A feature table edited in place (a region dropped) is refused at the next round.
    for tsv in site.derivatives.rglob("*_desc-regional_features.tsv"):
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
        table[table["name"] != "R_P12"].to_csv(tsv, sep="\t", index=False)
    text = site.refusal(lambda: train_round(req, site.config, reply.w_local, 2), RequestError)
    assert text.endswith("refused: regions not in the site's atlas: R_P12")
