"""The release document: schema validation on write and read, and what it refuses to hold."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from support import release_doc, simulate_site

from fednipype.contract.document import (
    content_hash,
    read_release,
    schema,
    validate,
    write_release,
)
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import ReleaseValidationError


def _doc() -> dict:
    """A well-formed release (three simulated sites' first site, noise at ε = 1e6)."""
    return release_doc("siteA", simulate_site("siteA"))


def test_a_well_formed_release_round_trips(tmp_path):
    doc = _doc()
    path = write_release(doc, tmp_path / "siteA_release.json")
    assert read_release(path) == doc
    assert content_hash(read_release(path)) == content_hash(doc)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.__setitem__("participants", ["sub-01"]), "(top level)"),
        (lambda d: d.__setitem__("dataset", "data of sub-01"), "dataset"),
        (lambda d: d.__setitem__("dataset", "/data/site/a"), "dataset"),
        (lambda d: d.__setitem__("site", "sub-07"), "site"),
        (lambda d: d["atlas"]["regions"].__setitem__(0, "sub-01"), "atlas/regions/0"),
        (lambda d: d["statistics"].__setitem__("per_subject", {"x": 1}), "statistics"),
        (
            lambda d: d["statistics"]["sufficient_statistics"].__setitem__("residuals", [1.0]),
            "statistics/sufficient_statistics",
        ),
        (lambda d: d["privacy"].__setitem__("epsilon", 0), "privacy/epsilon"),
        (lambda d: d["privacy"].__setitem__("unit", "record"), "privacy/unit"),
        (lambda d: d["privacy"]["bounds"].__setitem__("age", [1.0]), "privacy/bounds/age"),
        (
            lambda d: d["statistics"]["sufficient_statistics"].__setitem__("n", "23"),
            "statistics/sufficient_statistics/n",
        ),
    ],
)
def test_schema_refuses_identifiers_paths_and_unknown_fields(mutate, field):
    doc = _doc()
    mutate(doc)
    with pytest.raises(ReleaseValidationError, match=re.escape(f"x.json: field {field}:")):
        validate(doc, source="x.json")


def test_shapes_must_follow_terms_and_regions():
    doc = _doc()
    doc["statistics"]["sufficient_statistics"]["zty"][0].append(1.0)
    with pytest.raises(ReleaseValidationError, match="zty: expected 4×3"):
        validate(doc, "x.json")
    doc = _doc()
    doc["statistics"]["sufficient_statistics"]["yty"] = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ReleaseValidationError, match="yty: expected 3 values"):
        validate(doc, "x.json")


def test_budget_split_must_sum_to_the_declared_total():
    doc = _doc()
    doc["privacy"]["budget_split"]["sufficient_statistics"]["epsilon"] = 0.5
    with pytest.raises(ReleaseValidationError, match="budget_split: parts sum to"):
        validate(doc, "x.json")


def test_non_finite_numbers_are_refused():
    doc = _doc()
    doc["statistics"]["sufficient_statistics"]["yty"][1] = float("nan")
    with pytest.raises(
        ReleaseValidationError, match="sufficient_statistics/yty/1: expected a finite"
    ):
        validate(doc, "x.json")


def test_other_schema_version_is_named(tmp_path):
    doc = _doc()
    doc["schema_version"] = "3.0"
    path = tmp_path / "future_release.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReleaseValidationError, match=r"future_release.json: schema_version '3.0'"):
        read_release(path)


def test_invalid_write_leaves_nothing(tmp_path):
    doc = _doc()
    doc["site"] = "sub-01"
    with pytest.raises(ReleaseValidationError):
        write_release(doc, tmp_path / "bad_release.json")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_release_names_the_file(tmp_path):
    path = tmp_path / "broken_release.json"
    path.write_text('{"schema_version": "1.0", ')
    with pytest.raises(ReleaseValidationError, match="broken_release.json: not a readable JSON"):
        read_release(path)
    with pytest.raises(ReleaseValidationError, match="missing_release.json: release file not"):
        read_release(tmp_path / "missing_release.json")


def test_schema_is_closed_everywhere():
    """Every object in the schema either lists its properties closed or maps to typed values."""

    def walk(node, path):
        if isinstance(node, dict):
            # the mechanism mixin is closed by unevaluatedProperties where it is used
            mixin = path == "#/$defs/mechanism"
            if node.get("type") == "object" and "properties" in node and not mixin:
                closed = (
                    node.get("additionalProperties") is False
                    or node.get("unevaluatedProperties") is False
                )
                assert closed, f"open object at {path}"
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(copy.deepcopy(schema()), "#")


# -- the contract recomputes what a release declares (privacy v2, defects 5 and 6) ----------


def _edit(doc: dict, path: str, value) -> dict:
    node = doc
    *parents, last = path.split("/")
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        # zero noise declared: pooling would divide by it (NaN results)
        ("statistics/sufficient_statistics/noise_variances/zty", 0.0, "noise_variances/zty"),
        # far less noise than (ε, δ) needs
        ("statistics/sufficient_statistics/scale", 1e-6, "scale: declared noise sd 1e-06"),
        ("statistics/sufficient_statistics/sensitivity", 1.0, "sensitivity: declared 1"),
        ("statistics/sufficient_statistics/noise_variance", 1e-9, "noise_variance"),
        # units that are not the map of the declared bounds
        ("statistics/sufficient_statistics/scaling/age", {"center": 50.0, "scale": 0.4}, "age"),
        ("privacy/bounds/L_P01", [0.0, 100.0], "scaling/L_P01"),
        # δ must be below 1/max_participants (a public fact)
        ("privacy/max_participants", 10**6, "not below 1/max_participants"),
    ],
)
def test_declared_privacy_is_recomputed(path, value, match):
    doc = _edit(_doc(), path, value)
    with pytest.raises(ReleaseValidationError, match=match):
        validate(doc, "x_release.json")


def test_consistent_edits_of_the_scaling_in_every_release_are_refused():
    """Scaling edited consistently (slopes would come out 100× off) no longer matches the
    declared bounds, whatever the other releases say."""
    doc = _doc()
    block = doc["statistics"]["sufficient_statistics"]
    for name in block["regions"]:
        block["scaling"][name]["scale"] *= 100
    with pytest.raises(ReleaseValidationError, match="is not the map of the declared bounds"):
        validate(doc, "x_release.json")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('"n": 1e308', "field statistics/sufficient_statistics/n: 1e\\+308 is beyond"),
        ('"n": ' + "1" + "0" * 400, "integer of 401 digits"),
        ('"n": ' + "7" * 5000, "integer of 5000 digits"),
    ],
)
def test_numbers_that_break_parsing_are_named(tmp_path, text, match):
    doc = _doc()
    raw = json.dumps(doc).replace(f'"n": {doc["statistics"]["sufficient_statistics"]["n"]}', text)
    assert text in raw
    path = tmp_path / "big_release.json"
    path.write_text(raw)
    with pytest.raises(ReleaseValidationError, match=f"big_release.json: .*{match}"):
        read_release(path)


def test_deep_nesting_is_named(tmp_path):
    path = tmp_path / "deep_release.json"
    path.write_text('{"schema_version": "2.0", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ReleaseValidationError, match="deep_release.json: nested too deeply"):
        read_release(path)
    shallow = tmp_path / "deeper_release.json"
    shallow.write_text('{"schema_version": "2.0", "x": ' + "[" * 50 + "]" * 50 + "}")
    with pytest.raises(ReleaseValidationError, match="deeper_release.json: nested deeper"):
        read_release(shallow)


def test_n_terms_diagonal_must_be_the_released_n():
    doc = _doc()
    block = doc["statistics"]["sufficient_statistics"]
    block["n_terms"] = ["intercept"]
    block["ztz"][0][0] = block["n"] + 1.0
    with pytest.raises(ReleaseValidationError, match="diagonal entry of 'intercept' must be n"):
        validate(doc, "x_release.json")
    block["n_terms"] = ["age"]  # a numeric covariate does not square to 1
    with pytest.raises(ReleaseValidationError, match="'age' is not the intercept or a dummy"):
        validate(doc, "x_release.json")


def test_a_noisy_n_raised_for_degrees_of_freedom_keeps_the_released_diagonal():
    """The hub raises a noisy n below terms + 1 (post-processing); ZᵀZ keeps what was released."""
    doc = _doc()
    stats = SufficientStatistics.from_document(doc["statistics"]["sufficient_statistics"])
    low = np.array(stats.ztz)
    low[0, 0] = -3.0
    released = SufficientStatistics(
        stats.terms, stats.regions, low, stats.zty, stats.yty, n=-3.0, n_terms=("intercept",)
    )
    raised = released.with_n(5.0)
    assert raised.n == 5.0 and raised.ztz[0, 0] == -3.0
