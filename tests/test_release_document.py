"""The release document: schema validation on write and read, and what it refuses to hold."""

from __future__ import annotations

import copy
import json
import re

import pytest

from fednipype.contract.document import (
    content_hash,
    new_release,
    read_release,
    schema,
    validate,
    write_release,
)
from fednipype.exceptions import ReleaseValidationError

REGIONS = ["L_P01", "R_P01"]
TERMS = ["intercept", "age", "sex[M]", "group[patient]"]


def _mechanism(epsilon: float, delta: float) -> dict:
    return {
        "mechanism": "gaussian",
        "calibration": "analytic Gaussian (Balle and Wang 2018)",
        "sampler": "OpenDP make_gaussian",
        "epsilon": epsilon,
        "delta": delta,
        "sensitivity": 4.0,
        "sensitivity_norm": "l2",
        "scale": 10.0,
        "noise_variance": 100.0,
    }


def _doc() -> dict:
    p, r = len(TERMS), len(REGIONS)
    doc = new_release(
        dataset="fednipype example siteA",
        site="siteA",
        atlas={
            "name": "fednipype",
            "space": "MNI152NLin2009cAsym",
            "sha256": "a" * 64,
            "regions": REGIONS,
        },
        feature="volume_mm3",
        model={
            "response": "volume_mm3",
            "terms": TERMS,
            "reference_levels": {"sex": "F", "group": "control"},
            "sessions": "first session of each participant",
        },
        privacy={
            "epsilon": 1.0,
            "delta": 1e-5,
            "min_cohort": 10,
            "budget_split": {
                "group_means": {"epsilon": 0.1, "delta": 1e-6},
                "sufficient_statistics": {"epsilon": 0.9, "delta": 9e-6},
            },
            "bounds": {"age": [18.0, 90.0], "volume_mm3": [0.0, 20000.0]},
            "ledger_charge": 3,
        },
        statistics={
            "group_means": {
                **_mechanism(0.1, 1e-6),
                "regions": REGIONS,
                "groups": {
                    "control": {
                        "means": [7000.0] * r,
                        "mean_noise_variance": [4.0] * r,
                        "count": 12.3,
                        "count_noise_variance": 100.0,
                    },
                },
            },
            "sufficient_statistics": {
                **_mechanism(0.9, 9e-6),
                "terms": TERMS,
                "regions": REGIONS,
                "ztz": [[1.0] * p for _ in range(p)],
                "zty": [[0.5] * r for _ in range(p)],
                "yty": [2.0] * r,
                "n": 23.7,
                "noise_variances": {"n": 100.0, "ztz": 100.0, "zty": 100.0, "yty": 100.0},
                "scaling": {"age": {"center": 54.0, "scale": 36.0}},
            },
        },
    )
    return copy.deepcopy(doc)  # no list shared between documents


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
        (
            lambda d: d["statistics"]["group_means"].__setitem__("values", [61.2, 70.3]),
            "statistics/group_means",
        ),
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
    with pytest.raises(ReleaseValidationError, match="zty: expected 4×2"):
        validate(doc, "x.json")
    doc = _doc()
    doc["statistics"]["sufficient_statistics"]["yty"] = [1.0, 2.0, 3.0]
    with pytest.raises(ReleaseValidationError, match="yty: expected 2 values"):
        validate(doc, "x.json")


def test_budget_split_must_sum_to_the_declared_total():
    doc = _doc()
    doc["privacy"]["budget_split"]["group_means"]["epsilon"] = 0.5
    doc["statistics"]["group_means"]["epsilon"] = 0.5
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
