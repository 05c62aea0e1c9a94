"""The federated analysis request: validation, hash, terms, scaling and slots."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from fednipype.contract.request import (
    MAX_BYTES,
    MAX_SITES,
    REQUEST_SCHEMA,
    AnalysisRequest,
)
from fednipype.exceptions import RequestError
from fednipype.site.design import ModelSpec

BASE = {
    "schema": REQUEST_SCHEMA,
    "request_id": "age-gm-2026",
    "sites": ["site-a", "site-b", "site-c"],
    "model": {
        "response": "volume_mm3",
        "numeric": ["age"],
        "categorical": {"sex": ["F", "M"], "group": ["control", "patient"]},
    },
    "regions": ["L_P27", "R_P27", "L_P01"],
    "bounds": {
        "covariates": {"age": [18, 90]},
        "regions": {"default": [0, 12000], "L_P27": [0, 9000]},
    },
    "mode": "dp",
    "epsilon": 1.0,
    "delta": 1e-5,
    "max_dropouts": 0,
    "min_sites": 2,
    "max_participants": 1000,
}


def make(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        doc[key] = value
    return doc


def parse(doc: dict, source: str = "req.json") -> AnalysisRequest:
    return AnalysisRequest.from_json(json.dumps(doc), source=source)


def test_valid_request_terms_spec_scaling_slots():
    req = parse(BASE)
    # categorical covariates in name order: the hash cannot see JSON object order
    assert req.terms == ("intercept", "age", "group[patient]", "sex[M]")
    assert ModelSpec(**req.spec).terms == req.terms
    assert req.n_terms == ("intercept", "group[patient]", "sex[M]")
    assert req.k == 3 and req.slot("site-b") == 1
    s = req.scaling
    assert (s.center("age"), s.scale("age")) == (54.0, 36.0)
    assert (s.center("sex[M]"), s.scale("sex[M]")) == (0.5, 0.5)
    assert (s.center("L_P27"), s.scale("L_P27")) == (4500.0, 4500.0)  # own bounds
    assert (s.center("R_P27"), s.scale("R_P27")) == (6000.0, 6000.0)  # the default
    with pytest.raises(RequestError, match="req.json: field sites: site 'site-x'"):
        req.slot("site-x")


def test_content_hash_is_sha256_of_canonical_json_and_ignores_layout(tmp_path):
    req = parse(BASE)
    doc = req.to_document()
    expected = hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert req.content_hash == expected
    # another indentation, another key order: the same request
    reordered = dict(reversed(list(BASE.items())))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(reordered, indent=4))
    again = AnalysisRequest.from_file(path)
    assert again.content_hash == req.content_hash and again == req
    # round trip through dumps
    path.write_text(req.dumps())
    assert AnalysisRequest.from_file(path).content_hash == req.content_hash
    # any change of content changes the hash
    for change in (
        {"epsilon": 1.5},
        {"min_sites": 3},
        {"sites": ["site-a", "site-c", "site-b"]},
        {"regions": ["L_P27", "R_P27"]},
    ):
        assert parse(make(**change)).content_hash != req.content_hash


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": "fednipype-request/2.0"}, "field schema: expected"),
        ({"colour": "red"}, r"field \(top level\): unknown key 'colour'"),
        ({"request_id": "a/b"}, "field request_id: expected a name"),
        ({"request_id": "x" * 65}, "field request_id"),
        ({"sites": ["a", "a", "b"]}, "field sites: 'a' appears twice"),
        ({"sites": [f"s{i}" for i in range(MAX_SITES + 1)]}, "field sites: expected 1 to"),
        ({"sites": "site-a"}, "field sites: expected a list"),
        ({"regions": []}, "field regions: expected 1 to"),
        ({"regions": ["../etc"]}, "field regions/0"),
        ({"mode": "central"}, "field mode: expected one of"),
        ({"epsilon": 0}, "field epsilon: epsilon must be"),
        ({"epsilon": True}, "field epsilon"),
        ({"epsilon": None}, "field epsilon"),
        ({"delta": 1e-3}, "field delta: 0.001 must be > 0 and below 1/max_participants"),
        ({"delta": 0.0}, "field delta"),
        ({"min_sites": 4}, r"field min_sites: expected an integer in \[1, 3\]"),
        ({"min_sites": 2.0}, "field min_sites"),
        ({"max_dropouts": 1}, r"field max_dropouts: expected an integer in \[0, 0\]"),
        ({"max_participants": 0}, "field max_participants"),
        ({"max_participants": 10**30}, "an integer of 31 digits"),
        ({"model": {"response": "v", "numeric": ["age"], "extra": 1}}, "field model: unknown"),
        ({"model": {"numeric": ["age"]}}, "field model: missing key 'response'"),
        (
            {"model": {"response": "v", "numeric": ["age"], "categorical": {"sex": ["F"]}}},
            "field model/categorical/sex: expected 2 to",
        ),
        (
            {"model": {"response": "v", "numeric": ["age"], "categorical": {"age": ["a", "b"]}}},
            "'age' is both numeric and categorical",
        ),
        (
            {"bounds": {"covariates": {}, "regions": {"default": [0, 1]}}},
            "field bounds/covariates: no bounds for 'age'",
        ),
        (
            {
                "bounds": {
                    "covariates": {"age": [18, 90], "iq": [0, 200]},
                    "regions": {"default": [0, 1]},
                }
            },
            "field bounds/covariates/iq: not a numeric covariate",
        ),
        (
            {"bounds": {"covariates": {"age": [90, 18]}, "regions": {"default": [0, 1]}}},
            "field bounds/covariates/age: bounds must satisfy lo < hi",
        ),
        (
            {"bounds": {"covariates": {"age": [0, 1e16]}, "regions": {"default": [0, 1]}}},
            "field bounds/covariates/age: bounds must be finite and at most",
        ),
        (
            {"bounds": {"covariates": {"age": [18, 90]}, "regions": {"L_P27": [0, 1]}}},
            "field bounds/regions: no bounds for region 'R_P27'",
        ),
        (
            {
                "bounds": {
                    "covariates": {"age": [18, 90]},
                    "regions": {"default": [0, 1], "X": [0, 1]},
                }
            },
            "field bounds/regions/X: not one of the request's regions",
        ),
    ],
)
def test_invalid_requests_name_source_and_field(change, message):
    with pytest.raises(RequestError, match=f"^req.json: .*{message}"):
        parse(make(**change))


def test_exact_mode_rules():
    ok = parse(make(mode="exact", epsilon=None, delta=None, min_sites=3))
    assert ok.epsilon is None and ok.delta is None
    with pytest.raises(RequestError, match="field epsilon: must be null in exact mode"):
        parse(make(mode="exact", delta=None, min_sites=3))
    with pytest.raises(RequestError, match="field min_sites: exact mode never sums fewer than 3"):
        parse(make(mode="exact", epsilon=None, delta=None, min_sites=2))
    with pytest.raises(RequestError, match="field sites: exact mode needs at least 3 sites"):
        parse(make(mode="exact", epsilon=None, delta=None, min_sites=2, sites=["a", "b"]))


def test_distributed_dp_rules():
    ok = parse(make(mode="distributed-dp", max_dropouts=1, min_sites=2))
    assert ok.max_dropouts == 1
    with pytest.raises(RequestError, match="field min_sites: 1 is below K - max_dropouts = 2"):
        parse(make(mode="distributed-dp", max_dropouts=1, min_sites=1))
    with pytest.raises(RequestError, match=r"field max_dropouts: expected an integer in \[0, 2\]"):
        parse(make(mode="distributed-dp", max_dropouts=3, min_sites=3))


def test_hostile_text_is_refused_before_validation(tmp_path):
    with pytest.raises(RequestError, match="req.json: not valid JSON"):
        AnalysisRequest.from_json("{", source="req.json")
    with pytest.raises(RequestError, match="req.json: key 'mode' appears twice"):
        AnalysisRequest.from_json('{"mode": "dp", "mode": "exact"}', source="req.json")
    with pytest.raises(RequestError, match="NaN is not a number"):
        AnalysisRequest.from_json(json.dumps(BASE).replace("1e-05", "NaN"), source="req.json")
    with pytest.raises(RequestError, match="nested deeper than"):
        parse(make(request_id=[[[[[["x"]]]]]]))
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RequestError, match="req.json: "):
        AnalysisRequest.from_json(deep, source="req.json")
    big = tmp_path / "big.json"
    big.write_text(" " * (MAX_BYTES + 1))
    with pytest.raises(RequestError, match=f"big.json: {MAX_BYTES + 1} bytes"):
        AnalysisRequest.from_file(big)
    with pytest.raises(RequestError, match="missing.json: cannot read the request"):
        AnalysisRequest.from_file(tmp_path / "missing.json")
    with pytest.raises(RequestError, match="field sites/0: expected a name"):
        parse(make(sites=[{"a": 1}]))
