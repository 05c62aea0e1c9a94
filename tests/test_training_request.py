"""The federated training request: validation (one line naming the field), hash, steps, the
accountant's noise and spent (ε, δ) against an independent dp-accounting call, the scaling."""

from __future__ import annotations

import copy
import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fednipype.contract.training import TRAINING_SCHEMA, TrainingRequest
from fednipype.exceptions import RequestError

BASE = {
    "schema": TRAINING_SCHEMA,
    "request_id": "brain-age-2026",
    "sites": ["site-a", "site-b", "site-c"],
    "task": "brain-age",
    "regions": ["L_P01", "R_P01", "L_P12"],
    "bounds": {"regions": {"default": [0, 12000], "L_P12": [1000, 11000]}, "label": [18, 90]},
    "mode": "dp",
    "epsilon": 4.0,
    "delta": 1e-5,
    "rounds": 20,
    "local_steps": 5,
    "learning_rate": 0.5,
    "l2": 1e-3,
    "sampling_rate": 0.1,
    "clip": 1.0,
    "holdout_fraction": 0.2,
    "min_sites": 2,
    "max_participants": 1000,
}
NON_DP = dict.fromkeys(("epsilon", "delta", "sampling_rate", "clip"))


def make(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    doc.update(copy.deepcopy(changes))
    return doc


def parse(doc: dict) -> TrainingRequest:
    return TrainingRequest.from_json(json.dumps(doc), source="train.json")


def test_a_valid_request_reads_and_round_trips(tmp_path):
    req = parse(BASE)
    assert (req.task, req.mode, req.k, req.rounds, req.local_steps) == (
        "brain-age",
        "dp",
        3,
        20,
        5,
    )
    assert req.steps == 100
    path = tmp_path / "train.json"
    path.write_text(req.dumps(), encoding="utf-8")
    again = TrainingRequest.from_file(path)
    assert again == req and again.content_hash == req.content_hash
    assert TrainingRequest.from_document(req.to_document()).canonical == req.canonical
    # 1 and 1.0 are one request: numbers are normalised before hashing.
    assert parse(make(clip=1, learning_rate=0.5)).content_hash == req.content_hash
    diagnosis = make(task="diagnosis", bounds={"regions": {"default": [0, 12000]}})
    assert parse(diagnosis).label_bounds is None
    assert parse(make(mode="none", **NON_DP)).noise() is None


def test_scaling_uses_the_public_bounds_only():
    scaling = parse(BASE).scaling
    np.testing.assert_array_equal(scaling.lo, [0, 0, 1000])
    np.testing.assert_array_equal(scaling.hi, [12000, 12000, 11000])
    assert scaling.label == (18.0, 90.0)
    # Inside, above, below the bounds: the affine map of the bounds onto the scaled interval
    # [a, b] (read off the bounds themselves), clamped.
    (a, *_), (b, *_) = scaling.transform(np.array([[0, 0, 1000], [12000, 12000, 11000]]))
    x = np.array([[6000.0, 13000.0, 500.0]])
    np.testing.assert_allclose(scaling.transform(x), [[(a + b) / 2, b, a]])
    assert b > a


def test_noise_and_spent_agree_with_an_independent_accountant():
    req = parse(BASE)
    sigma, sigma_count = req.noise()
    step = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma))
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(step, 100),
            dp_accounting.GaussianDpEvent(sigma_count),
        ]
    )
    accountant = rdp.RdpAccountant()  # dp-accounting's default orders
    accountant.compose(event)
    expected = accountant.get_epsilon(1e-5)
    epsilon, delta = req.spent()
    assert delta == 1e-5
    assert epsilon == pytest.approx(expected, rel=1e-2)
    assert 0.95 * 4.0 <= epsilon <= 4.0 * (1 + 1e-9)
    # A looser request needs less noise; hub and sites derive the same from the same request.
    assert parse(make(epsilon=8.0)).noise()[0] < sigma
    assert parse(BASE).noise() == (sigma, sigma_count)


FIELDS = [
    ("epsilon", 0.0, "field epsilon"),
    ("epsilon", -1.0, "field epsilon"),
    ("epsilon", None, "field epsilon"),
    ("delta", 0.0, "field delta"),
    ("delta", 1e-3, "field delta"),  # not below 1/max_participants
    ("delta", None, "field delta"),
    ("sampling_rate", 0.0, "field sampling_rate"),
    ("sampling_rate", 1.5, "field sampling_rate"),
    ("sampling_rate", None, "field sampling_rate"),
    ("clip", 0.0, "field clip"),
    ("clip", None, "field clip"),
    ("rounds", 0, "field rounds"),
    ("rounds", 1001, "field rounds"),
    ("rounds", 2.5, "field rounds"),
    ("local_steps", 0, "field local_steps"),
    ("local_steps", 1001, "field local_steps"),
    ("learning_rate", 0.0, "field learning_rate"),
    ("learning_rate", "0.1", "field learning_rate"),
    ("l2", -1e-3, "field l2"),
    ("holdout_fraction", 0.0, "field holdout_fraction"),
    ("holdout_fraction", 1.0, "field holdout_fraction"),
    ("min_sites", 1, "field min_sites"),
    ("min_sites", 4, "field min_sites"),
    ("max_participants", 0, "field max_participants"),
    ("sites", ["site-a"], "field sites"),
    ("sites", ["site-a", "site-a"], "field sites"),
    ("task", "age", "field task"),
    ("mode", "exact", "field mode"),
    ("regions", [], "field regions"),
    ("regions", ["L P01"], "field regions/0"),
    ("request_id", "", "field request_id"),
    ("schema", "fednipype-request/1.0", "field schema"),
    ("bounds", {"regions": {"default": [0, 12000]}}, "field bounds/label"),
    ("bounds", {"regions": {"L_P01": [0, 1]}, "label": [18, 90]}, "field bounds/regions"),
    ("bounds", {"regions": {"default": [5, 5]}, "label": [18, 90]}, "field bounds/regions"),
    ("bounds", {"regions": {"default": [0, 1]}, "label": [90, 18]}, "field bounds/label"),
    ("bounds", {"regions": {"default": [0, 1]}, "label": [1], "x": 1}, "field bounds"),
    ("learning_rate", 1e300, "field learning_rate"),
]


@pytest.mark.parametrize(("key", "value", "field"), FIELDS)
def test_each_rule_is_refused_in_one_line_naming_the_field(key, value, field):
    with pytest.raises(RequestError) as err:
        parse(make(**{key: value}))
    text = str(err.value)
    assert text.startswith("train.json: ") and "\n" not in text
    assert field in text


@pytest.mark.parametrize("key", ["epsilon", "delta", "sampling_rate", "clip"])
def test_mode_none_has_the_dp_fields_null(key):
    parse(make(mode="none", **NON_DP))  # valid
    doc = make(mode="none", **{**NON_DP, key: BASE[key]})
    with pytest.raises(RequestError, match=f"field {key}: must be null in mode none"):
        parse(doc)


def test_label_bounds_are_for_brain_age_only():
    doc = make(task="diagnosis")  # BASE has label bounds
    with pytest.raises(RequestError, match="field bounds/label: only brain-age"):
        parse(doc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"a": 1, "a": 2}', "appears twice"),
        ('{"epsilon": NaN}', "not a number a request may hold"),
        (json.dumps({k: v for k, v in BASE.items() if k != "clip"}), "missing key 'clip'"),
        (json.dumps({**BASE, "seed": 3}), "unknown key 'seed'"),
    ],
)
def test_malformed_text_is_refused(text, message):
    with pytest.raises(RequestError, match=message):
        TrainingRequest.from_json(text, source="train.json")


CHANGES = {
    "request_id": "other",
    "sites": ["site-a", "site-b", "site-d"],
    "task": "diagnosis",
    "regions": ["R_P01", "L_P01", "L_P12"],  # the order is the features' order
    "bounds": {"regions": {"default": [0, 12001], "L_P12": [1000, 11000]}, "label": [18, 90]},
    "mode": "none",
    "epsilon": 4.5,
    "delta": 2e-5,
    "rounds": 21,
    "local_steps": 6,
    "learning_rate": 0.25,
    "l2": 0.0,
    "sampling_rate": 0.2,
    "clip": 2.0,
    "holdout_fraction": 0.3,
    "min_sites": 3,
    "max_participants": 999,
}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_the_hash_changes_when_any_field_changes(key):
    base = parse(BASE)
    doc = make(**{key: CHANGES[key]})
    if key == "task":
        doc["bounds"] = {"regions": doc["bounds"]["regions"]}
    if key == "mode":
        doc.update(NON_DP)
    other = parse(doc)
    assert other.content_hash != base.content_hash and other != base


def test_every_field_is_changed_above():
    assert set(CHANGES) == set(BASE) - {"schema"}
