"""Tests of the site policy: reading, validation and bound look-ups."""

import dataclasses
import os
import re
from pathlib import Path

import pytest

from fednipype.exceptions import PolicyError
from fednipype.site.policy import SitePolicy

VALID = """\
min_cohort = 12

[budget]
epsilon = 3.5
delta = 1e-6

[ledger]
path = "ledgers/site.sqlite"
dataset = "site-a-study"

[bounds]
age = [18, 95.5]
sex = [0, 1]

[bounds.features]
default = [0.0, 1.0]
"Left-Hippocampus" = [0.1, 0.8]
"""


def write(folder: Path, text: str, name: str = "policy.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def replace_line(text: str, startswith: str, new: str | None) -> str:
    """The policy text with the line starting with ``startswith`` replaced (or removed)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(startswith)]
    assert len(hits) == 1, startswith
    if new is None:
        del lines[hits[0]]
    else:
        lines[hits[0]] = new
    return "\n".join(lines) + "\n"


def test_valid_policy_is_read(tmp_path):
    policy = SitePolicy.from_toml(write(tmp_path, VALID))
    assert policy.epsilon == 3.5
    assert policy.delta == 1e-6
    assert policy.min_cohort == 12
    assert policy.dataset_id == "site-a-study"
    # Relative ledger path: against the policy file's folder, not the working directory.
    assert policy.ledger_path == tmp_path / "ledgers" / "site.sqlite"
    assert policy.covariate_bounds("age") == (18.0, 95.5)
    assert policy.covariate_bounds("sex") == (0.0, 1.0)
    assert policy.feature_bounds("Left-Hippocampus") == (0.1, 0.8)
    assert policy.feature_bounds("Right-Amygdala") == (0.0, 1.0)
    assert policy.feature_bounds_arrays(["Left-Hippocampus", "X"]) == ([0.1, 0.0], [0.8, 1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.epsilon = 100.0  # type: ignore[misc]


def test_relative_ledger_path_does_not_depend_on_working_directory(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert SitePolicy.from_toml(os.path.relpath(path)).ledger_path == (
        tmp_path / "ledgers" / "site.sqlite"
    )


def test_absolute_ledger_path_and_default_min_cohort(tmp_path):
    text = replace_line(VALID, "path =", f'path = "{(tmp_path / "abs.sqlite").as_posix()}"')
    text = replace_line(text, "min_cohort", None)
    policy = SitePolicy.from_toml(write(tmp_path, text))
    assert policy.ledger_path == tmp_path / "abs.sqlite"
    assert policy.min_cohort == 10


def test_unreadable_file(tmp_path):
    missing = tmp_path / "absent.toml"
    with pytest.raises(PolicyError, match="absent.toml.*cannot read"):
        SitePolicy.from_toml(missing)
    with pytest.raises(PolicyError, match="cannot read"):
        SitePolicy.from_toml(tmp_path)  # a folder


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[budget\nepsilon = 1\n")
    with pytest.raises(PolicyError, match=r"policy.toml: not a valid TOML"):
        SitePolicy.from_toml(path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"epsilon = \xff\xfe\n")
    with pytest.raises(PolicyError, match="binary.toml: not a valid TOML"):
        SitePolicy.from_toml(binary)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("epsilon", "budget.epsilon"),
        ("delta", "budget.delta"),
        ("path", "ledger.path"),
        ("dataset", "ledger.dataset"),
    ],
)
def test_missing_keys_are_refused(tmp_path, line, key):
    path = write(tmp_path, replace_line(VALID, f"{line} =", None))
    with pytest.raises(PolicyError, match=rf"policy.toml: '{key}': missing"):
        SitePolicy.from_toml(path)


@pytest.mark.parametrize("table", ["budget", "ledger"])
def test_missing_tables_are_refused(tmp_path, table):
    text = VALID.replace(f"[{table}]", "[unused]")
    # An unknown table is refused first; check both the unknown key and the missing table.
    with pytest.raises(PolicyError, match="unknown key"):
        SitePolicy.from_toml(write(tmp_path, text))
    lines = VALID.split("\n\n")
    text = "\n\n".join(block for block in lines if not block.startswith(f"[{table}]"))
    with pytest.raises(PolicyError, match=rf"'{table}': missing table"):
        SitePolicy.from_toml(write(tmp_path, text))


def test_missing_bounds_are_refused(tmp_path):
    text = VALID.split("[bounds]")[0]
    with pytest.raises(PolicyError, match="'bounds': missing table"):
        SitePolicy.from_toml(write(tmp_path, text))
    # An empty [bounds]: no [bounds.features] means the atlas default, so bounds exist.
    empty = SitePolicy.from_toml(write(tmp_path, text + "[bounds]\n"))
    assert empty.atlas_default and dict(empty.feature_bounds_map) == {"default": "atlas"}
    with pytest.raises(PolicyError, match="'bounds': no bounds declared"):
        SitePolicy(1.0, 1e-6, Path("l"), "d", {}, {})


def test_atlas_default_and_what_overrides_it(tmp_path):
    text = replace_line(VALID, "default", 'default = "atlas"')
    policy = SitePolicy.from_toml(write(tmp_path, text))
    assert policy.atlas_default
    assert policy.feature_bounds("L_P01", atlas_max=12345.0) == (0.0, 12345.0)
    # a region's own entry wins, whatever the response and whether a maximum is known
    assert policy.feature_bounds("Left-Hippocampus", atlas_max=9.0) == (0.1, 0.8)
    assert policy.feature_bounds("Left-Hippocampus", response="mean") == (0.1, 0.8)
    assert policy.feature_bounds_arrays(
        ["Left-Hippocampus", "L_P01"], atlas_max={"L_P01": 50.0}
    ) == ([0.1, 0.0], [0.8, 50.0])
    numeric = SitePolicy.from_toml(write(tmp_path, VALID))
    assert not numeric.atlas_default
    assert numeric.feature_bounds("L_P01", atlas_max=12345.0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"response": "mean", "atlas_max": 100.0},
            r"bounds only the response 'volume_mm3'.*'mean'",
        ),
        ({}, r"RegionMaxVolumeMm3.*recompute the features"),
        ({"atlas_max": 0.0}, r"no voxel on the features' grid"),
    ],
)
def test_atlas_default_refusals_name_the_field(tmp_path, kwargs, expected):
    text = replace_line(VALID, "default", 'default = "atlas"')
    policy = SitePolicy.from_toml(write(tmp_path, text))
    with pytest.raises(PolicyError, match=r"policy.toml: 'bounds.features.default': ") as info:
        policy.feature_bounds("R_P07", **kwargs)
    message = str(info.value)
    assert re.search(expected, message) and "R_P07" in message and "\n" not in message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('default = "atlass"', "bounds.features.default"),
        ('default = "ATLAS"', "bounds.features.default"),
        ('"Left-Hippocampus" = "atlas"', "bounds.features.Left-Hippocampus"),
    ],
)
def test_atlas_is_a_default_only(tmp_path, line, key):
    startswith = line.split(" =")[0]
    text = replace_line(VALID, startswith, line)
    with pytest.raises(PolicyError, match=rf"policy.toml: '{key}'"):
        SitePolicy.from_toml(write(tmp_path, text))


@pytest.mark.parametrize(
    ("startswith", "new", "key"),
    [
        ("epsilon", "epsilon = 0", "budget.epsilon"),
        ("epsilon", "epsilon = -1.0", "budget.epsilon"),
        ("epsilon", "epsilon = nan", "budget.epsilon"),
        ("epsilon", "epsilon = inf", "budget.epsilon"),
        ("epsilon", 'epsilon = "1.0"', "budget.epsilon"),
        ("epsilon", "epsilon = true", "budget.epsilon"),
        ("delta", "delta = 1.0", "budget.delta"),
        ("delta", "delta = 1.5", "budget.delta"),
        ("delta", "delta = -1e-9", "budget.delta"),
        ("delta", "delta = nan", "budget.delta"),
        ("min_cohort", "min_cohort = 0", "min_cohort"),
        ("min_cohort", "min_cohort = 9.5", "min_cohort"),
        ("min_cohort", "min_cohort = true", "min_cohort"),
        ("dataset", 'dataset = ""', "ledger.dataset"),
        ("dataset", "dataset = 3", "ledger.dataset"),
        ("path", "path = 7", "ledger.path"),
        ("age", "age = [95, 18]", "bounds.age"),
        ("age", "age = [18, 18]", "bounds.age"),
        ("age", "age = [18]", "bounds.age"),
        ("age", "age = [18, 50, 95]", "bounds.age"),
        ("age", 'age = ["18", 95]', "bounds.age"),
        ("age", "age = [18, inf]", "bounds.age"),
        ("age", "age = [nan, 95]", "bounds.age"),
        ("age", "age = 18", "bounds.age"),
        ("default", "default = [1.0, 0.0]", "bounds.features.default"),
        (
            '"Left-Hippocampus"',
            '"Left-Hippocampus" = [0.5, 0.5]',
            "bounds.features.Left-Hippocampus",
        ),
    ],
)
def test_invalid_values_are_refused(tmp_path, startswith, new, key):
    path = write(tmp_path, replace_line(VALID, startswith, new))
    with pytest.raises(PolicyError, match=rf"policy.toml: '{key}'"):
        SitePolicy.from_toml(path)


def test_unknown_keys_are_refused(tmp_path):
    text = replace_line(VALID, "epsilon", "epsilon = 1.0\nepsilion = 2.0")
    with pytest.raises(PolicyError, match="budget.epsilion"):
        SitePolicy.from_toml(write(tmp_path, text))
    text = "min_cohrt = 5\n" + VALID
    with pytest.raises(PolicyError, match="min_cohrt"):
        SitePolicy.from_toml(write(tmp_path, text))


def test_undeclared_bounds_are_never_derived(tmp_path):
    text = replace_line(VALID, "default", None)
    policy = SitePolicy.from_toml(write(tmp_path, text))
    assert policy.feature_bounds("Left-Hippocampus") == (0.1, 0.8)
    with pytest.raises(PolicyError, match="'bounds.features.Right-Amygdala'.*no bounds declared"):
        policy.feature_bounds("Right-Amygdala")
    with pytest.raises(PolicyError, match="'bounds.education'.*no bounds declared"):
        policy.covariate_bounds("education")


def test_direct_construction_validates():
    common = dict(
        ledger_path=Path("l.sqlite"),
        dataset_id="d",
        feature_bounds_map={"default": (0, 1)},
        covariate_bounds_map={},
    )
    assert SitePolicy(epsilon=1, delta=0, **common).epsilon == 1.0
    with pytest.raises(PolicyError, match="'budget.epsilon'"):
        SitePolicy(epsilon=float("nan"), delta=0, **common)
    with pytest.raises(PolicyError, match="'bounds.features.default'"):
        SitePolicy(epsilon=1, delta=0, **{**common, "feature_bounds_map": {"default": (2, 1)}})
