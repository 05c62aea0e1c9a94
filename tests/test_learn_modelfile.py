"""The model file: round trip, the loaded estimator predicts as the in-memory one, provenance
kept, and a corrupted file refused with the file and field named."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from fednipype.exceptions import DataError
from fednipype.learn import modelfile, models

FEATURES = ["L_P01", "L_P12", "R_P33"]


def provenance(dp: bool) -> dict:
    privacy = {
        site: {"epsilon": 3.98, "delta": 1e-5, "noise_multiplier": 1.9, "sampling_rate": 0.1,
               "steps": 100, "accountant": "dp_accounting.rdp.RdpAccountant"}
        for site in ("site-a", "site-b")
    }  # fmt: skip
    return {
        "request_id": "brain-age-2026",
        "request_hash": "ab" * 32,
        "rounds": 20,
        "sites": [
            {"site": "site-a", "rounds": list(range(1, 21)), "status": "completed"},
            {"site": "site-b", "rounds": list(range(1, 8)), "status": "dropped at round 8"},
            {"site": "site-c", "rounds": [], "status": "refused"},
        ],
        "privacy": privacy if dp else None,
        "metrics": None if dp else [{"round": r, "loss": 1.0 / r} for r in range(1, 21)],
    }


def model(task: str):
    rng = np.random.default_rng(8)
    label = (18.0, 90.0) if task == "brain-age" else None
    scaling = models.FeatureScaling(np.full(3, 2000.0), np.full(3, 10000.0), label)
    return scaling, rng.normal(0, 1, 4)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("task", "dp"), [("brain-age", True), ("diagnosis", False)])
def test_round_trip_and_the_loaded_estimator_predicts_as_in_memory(tmp_path, task, dp):
    scaling, w = model(task)
    path = modelfile.save_model(
        tmp_path / "model.json", task=task, features=FEATURES, scaling=scaling, w=w,
        provenance=provenance(dp),
    )  # fmt: skip
    doc = json.loads(path.read_text())
    assert doc["schema"] == "fednipype-model/1.0"
    assert set(doc["provenance"]["software"]) == {
        "fednipype", "flwr", "numpy", "scikit-learn", "dp-accounting"
    }  # fmt: skip
    assert doc["provenance"]["created"].endswith("Z")
    read = modelfile.read_model(path)
    assert read.task == task and read.features == FEATURES
    np.testing.assert_array_equal(read.w, w)  # JSON keeps doubles exactly
    np.testing.assert_array_equal(read.scaling.lo, scaling.lo)
    assert read.scaling.label == scaling.label
    assert read.provenance["sites"][1]["status"] == "dropped at round 8"
    assert read.provenance["privacy"] == provenance(dp)["privacy"]

    loaded = modelfile.load_model(path)
    in_memory = models.to_sklearn(task, w, scaling, FEATURES)
    assert type(loaded) is type(in_memory)
    assert isinstance(loaded, Ridge if task == "brain-age" else LogisticRegression)
    X = pd.DataFrame(np.random.default_rng(9).uniform(3000, 9000, (50, 3)), columns=FEATURES)
    np.testing.assert_array_equal(loaded.predict(X), in_memory.predict(X))
    if task == "diagnosis":
        np.testing.assert_array_equal(loaded.predict_proba(X), in_memory.predict_proba(X))
    assert loaded.fednipype_provenance_["request_hash"] == "ab" * 32


def corrupt(doc: dict, change: str) -> None:
    if change == "schema":
        doc["schema"] = "fednipype-model/2.0"
    elif change == "w-length":
        doc["w"] = doc["w"][:-1]
    elif change == "w-nan":
        doc["w"][2] = float("nan")
    elif change == "bounds":
        doc["scaling"]["hi"][1] = 1000.0
    elif change == "label":
        doc["scaling"]["label"] = None
    elif change == "task":
        doc["task"] = "age"
    elif change == "features":
        doc["features"][1] = doc["features"][0]
    elif change == "status":
        doc["provenance"]["sites"][0]["status"] = "done"
    elif change == "epsilon":
        del doc["provenance"]["privacy"]["site-a"]["epsilon"]
    elif change == "created":
        doc["provenance"]["created"] = "yesterday"
    elif change == "round":
        doc["provenance"]["sites"][0]["rounds"].append(21)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("schema", "'schema'"),
        ("w-length", "'w'"),
        ("w-nan", r"'w\[2\]'"),
        ("bounds", "'scaling/hi'"),
        ("label", "'scaling/label'"),
        ("task", "'task'"),
        ("features", "'features'"),
        ("status", r"'provenance/sites\[0\]/status'"),
        ("epsilon", "'provenance/privacy/site-a/epsilon'"),
        ("created", "'provenance/created'"),
        ("round", r"'provenance/sites\[0\]/rounds'"),
    ],
)
def test_a_corrupted_field_is_refused_naming_file_and_field(tmp_path, change, field):
    scaling, w = model("brain-age")
    path = modelfile.save_model(
        tmp_path / "model.json", task="brain-age", features=FEATURES, scaling=scaling, w=w,
        provenance=provenance(True),
    )  # fmt: skip
    doc = json.loads(path.read_text())
    corrupt(doc, change)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"model\.json: field {field}: expected") as info:
        modelfile.load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.timeout(30)
def test_unreadable_files_and_bad_models_are_refused(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"model\.json: not JSON"):
        modelfile.read_model(path)
    with pytest.raises(DataError, match="cannot read"):
        modelfile.read_model(tmp_path / "absent.json")
    scaling, w = model("brain-age")
    w[1] = np.nan
    with pytest.raises(DataError, match=r"field 'w\[1\]'"):
        modelfile.save_model(
            tmp_path / "nan.json", task="brain-age", features=FEATURES, scaling=scaling, w=w,
            provenance=provenance(True),
        )  # fmt: skip
    assert not (tmp_path / "nan.json").exists()  # checked before anything is written
