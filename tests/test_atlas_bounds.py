"""Atlas bounds: each region's largest possible volume on the features' grid, recorded in the
sidecar, and releases bounded by it (``[bounds.features] default = "atlas"``).

The expected maxima come from an independent computation: nibabel's resampling of the atlas
onto the image's grid (nearest neighbour) and a numpy bincount of its labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from nibabel.processing import resample_from_to
from support import BUNDLED, SITES

from fednipype.atlas import default_atlas
from fednipype.cli import plan as plan_cli
from fednipype.cli.errors import EXIT_USAGE
from fednipype.contract.document import read_release
from fednipype.exceptions import PolicyError
from fednipype.features import (
    ATLAS_MAX_VOLUME,
    extract_features,
    read_atlas_max_volumes,
    read_features,
    read_sidecar,
    write_features,
)
from fednipype.grids import atlas_max_volumes
from fednipype.hub.releases import load_releases
from fednipype.site.design import ModelSpec
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.lifecycle import init_ledger
from fednipype.site.policy import SitePolicy
from fednipype.site.release import make_release

NUMERIC_DEFAULT = "default = [0.0, 12000.0]"
TWO = ["L_P01", "R_P12"]


def _independent_max(atlas_image: Path, labels_tsv: Path, image: Path) -> dict[str, float]:
    """Voxels per region of the atlas resampled to ``image``'s grid × the voxel volume."""
    ref = nb.load(image)
    on_grid = resample_from_to(nb.load(atlas_image), (ref.shape[:3], ref.affine), order=0)
    counts = np.bincount(np.asarray(on_grid.dataobj).astype(np.int64).ravel(), minlength=256)
    voxel = abs(np.linalg.det(ref.affine[:3, :3]))
    table = pd.read_csv(labels_tsv, sep="\t")
    return {name: counts[i] * voxel for i, name in zip(table["index"], table["name"], strict=True)}


def _probseg(site: str, tsv: Path) -> Path:
    """The probability map a features file was computed from (its sidecar's ``Source``)."""
    source = read_sidecar(tsv)["Source"]
    return next((BUNDLED / site / "derivatives").rglob(source))


def _policy(folder: Path, site_policy, features: str | None) -> Path:
    """siteC's example policy with ``[bounds.features]`` rewritten (None: table removed)."""
    path = site_policy(folder, bind=False)
    text = path.read_text()
    if features is None:
        text = text.replace("[bounds.features]\n" + NUMERIC_DEFAULT + "\n", "")
        assert "bounds.features" not in text
    else:
        text = text.replace(NUMERIC_DEFAULT, features)
    path.write_text(text)
    init_ledger(path)
    return path


def _release(features, policy, out, **kwargs) -> Path:
    return make_release(
        features=features,
        participants=BUNDLED / "siteC",
        policy=policy,
        epsilon=1.0,
        delta=1e-5,
        site="siteC",
        out_path=out,
        **kwargs,
    )


def _spent(policy: Path) -> tuple[float, float]:
    return tuple(PrivacyLedger.from_policy(SitePolicy.from_toml(policy)).spent())


def _copy_features(tsvs: list[Path], folder: Path) -> list[Path]:
    copies = []
    for tsv in tsvs:
        target = folder / tsv.relative_to(tsv.parents[2])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tsv, target)
        shutil.copy(tsv.with_suffix(".json"), target.with_suffix(".json"))
        copies.append(target)
    return copies


@pytest.fixture(scope="module")
def site_c_max(bundled_features) -> dict[str, float]:
    """siteC's atlas maxima, computed independently on its images' grid."""
    atlas = default_atlas(2)
    tsv = bundled_features["siteC"][0]
    return _independent_max(atlas.image, atlas.labels, _probseg("siteC", tsv))


@pytest.mark.timeout(120)
def test_sidecar_records_the_region_maximum_on_the_resampled_grid(bundled_features):
    atlas = default_atlas(2)
    native = atlas_max_volumes(atlas.image, atlas.labels)  # the 2 mm atlas on its own grid
    for site in SITES:
        tsvs = bundled_features[site]
        for tsv in (tsvs[0], tsvs[-1]):
            sidecar = read_sidecar(tsv)
            assert sidecar["Atlas"]["ResampledToImageGrid"] is True
            recorded = sidecar["Atlas"][ATLAS_MAX_VOLUME]
            expected = _independent_max(atlas.image, atlas.labels, _probseg(site, tsv))
            assert list(recorded) == list(expected)  # every region, in atlas order
            np.testing.assert_allclose(list(recorded.values()), list(expected.values()))
            # the images' 3 mm grid, not the atlas's 2 mm one: the two counts differ
            assert recorded != native
        # every subject on the same grid: the same public maxima
        assert read_atlas_max_volumes(tsvs) == read_sidecar(tsvs[0])["Atlas"][ATLAS_MAX_VOLUME]


@pytest.mark.timeout(120)
def test_bundled_volumes_never_exceed_the_atlas_maximum(bundled_features):
    for site in SITES:
        maxima = read_atlas_max_volumes(bundled_features[site])
        for tsv in bundled_features[site]:
            table = read_features(tsv)
            bound = table["name"].map(maxima).to_numpy()
            volume = table["volume_mm3"].to_numpy()
            assert np.all(np.isnan(volume) | (volume <= bound)), tsv
            voxel = read_sidecar(tsv)["VoxelVolumeMm3"]
            assert np.all(table["voxel_count"].to_numpy() * voxel <= bound)


@pytest.mark.timeout(120)
def test_maximum_on_the_atlas_grid_and_the_largest_over_mixed_grids(bundled_features, tmp_path):
    """One subject's map put on the atlas's 2 mm grid: its sidecar records the atlas's own
    counts; mixed with 3 mm files, the largest per region is used."""
    atlas = default_atlas(2)
    tsvs = _copy_features(bundled_features["siteC"], tmp_path / "features")
    source = _probseg("siteC", tsvs[0])
    grid = nb.load(atlas.image)
    fine = resample_from_to(nb.load(source), (grid.shape, grid.affine), order=1)
    fine = nb.Nifti1Image(np.clip(fine.get_fdata(), 0.0, 1.0).astype(np.float32), grid.affine)
    image = tmp_path / source.name
    fine.to_filename(image)
    result = extract_features(image, atlas.image, atlas.labels)
    assert result.sidecar["Atlas"]["ResampledToImageGrid"] is False
    labels = np.asarray(grid.dataobj).astype(np.int64)
    own = np.bincount(labels.ravel(), minlength=101)[1:] * 8.0  # 2 mm voxels: 8 mm3
    np.testing.assert_allclose(list(result.sidecar["Atlas"][ATLAS_MAX_VOLUME].values()), own)
    coarse = read_atlas_max_volumes(tsvs)
    write_features(result, tsvs[0])  # this subject's features now on the 2 mm grid
    mixed = read_atlas_max_volumes(tsvs)
    np.testing.assert_allclose(list(mixed.values()), np.maximum(own, list(coarse.values())))
    differ = own - np.array(list(coarse.values()))
    assert (differ > 0).any() and (differ < 0).any()  # neither grid dominates


@pytest.mark.timeout(180)
@pytest.mark.parametrize("features", ['default = "atlas"', None], ids=["atlas", "no-table"])
def test_release_with_the_atlas_default_records_its_bounds_and_validates(
    bundled_features, tmp_path, site_policy, site_c_max, features
):
    policy = _policy(tmp_path / "policy", site_policy, features)
    path = _release(bundled_features["siteC"], policy, tmp_path / "siteC_release.json")
    doc = read_release(path)  # the contract recomputes the scaling from the recorded bounds
    load_releases([path])
    bounds = doc["privacy"]["bounds"]
    scaling = doc["statistics"]["sufficient_statistics"]["scaling"]
    assert bounds["age"] == [18.0, 90.0]
    assert len(doc["atlas"]["regions"]) == 100
    for region in doc["atlas"]["regions"]:
        assert bounds[region] == pytest.approx([0.0, site_c_max[region]])
        half = site_c_max[region] / 2
        assert scaling[region] == pytest.approx({"center": half, "scale": half})
    assert _spent(policy)[0] > 0


@pytest.mark.timeout(180)
def test_region_entries_and_a_numeric_default_override_the_atlas(
    bundled_features, tmp_path, site_policy, site_c_max
):
    atlas_one = _policy(
        tmp_path / "p1", site_policy, 'default = "atlas"\n"L_P01" = [1000.0, 9000.0]'
    )
    doc = read_release(
        _release(bundled_features["siteC"], atlas_one, tmp_path / "a_release.json", regions=TWO)
    )
    assert doc["privacy"]["bounds"]["L_P01"] == [1000.0, 9000.0]
    assert doc["privacy"]["bounds"]["R_P12"] == pytest.approx([0.0, site_c_max["R_P12"]])
    numeric = _policy(tmp_path / "p2", site_policy, NUMERIC_DEFAULT + '\n"L_P01" = [1.0, 9.0]')
    doc = read_release(
        _release(bundled_features["siteC"], numeric, tmp_path / "b_release.json", regions=TWO)
    )
    assert doc["privacy"]["bounds"]["L_P01"] == [1.0, 9.0]
    assert doc["privacy"]["bounds"]["R_P12"] == [0.0, 12000.0]


@pytest.mark.timeout(180)
def test_a_response_the_atlas_does_not_bound_is_refused_before_any_charge(
    bundled_features, tmp_path, site_policy
):
    policy = _policy(tmp_path / "policy", site_policy, 'default = "atlas"\n"L_P01" = [0.0, 1.0]')
    mean = ModelSpec(response="mean")
    with pytest.raises(PolicyError) as info:
        _release(
            bundled_features["siteC"], policy, tmp_path / "x_release.json", spec=mean, regions=TWO
        )
    message = str(info.value)
    assert "'bounds.features.default'" in message and "'mean'" in message
    assert "R_P12" in message and "\n" not in message
    assert _spent(policy) == (0.0, 0.0)
    assert not (tmp_path / "x_release.json").exists()
    # every released region declared: the atlas default is not needed
    path = _release(
        bundled_features["siteC"],
        policy,
        tmp_path / "m_release.json",
        spec=mean,
        regions=["L_P01"],
    )
    assert read_release(path)["privacy"]["bounds"]["L_P01"] == [0.0, 1.0]


@pytest.mark.timeout(180)
def test_old_sidecars_without_the_maximum(bundled_features, tmp_path, site_policy):
    tsvs = _copy_features(bundled_features["siteC"], tmp_path / "features")
    sidecar = tsvs[3].with_suffix(".json")
    old = json.loads(sidecar.read_text())
    del old["Atlas"][ATLAS_MAX_VOLUME]
    sidecar.write_text(json.dumps(old))
    assert read_atlas_max_volumes(tsvs) == {}
    policy = _policy(tmp_path / "policy", site_policy, 'default = "atlas"')
    with pytest.raises(PolicyError, match=r"'bounds.features.default'.*RegionMaxVolumeMm3"):
        _release(tsvs, policy, tmp_path / "x_release.json", regions=TWO)
    assert _spent(policy) == (0.0, 0.0)
    numeric = _policy(tmp_path / "numeric", site_policy, NUMERIC_DEFAULT)
    path = _release(tsvs, numeric, tmp_path / "n_release.json", regions=TWO)
    assert read_release(path)["privacy"]["bounds"]["L_P01"] == [0.0, 12000.0]


def _own_grid_max(resolution: int) -> dict[str, float]:
    """The default atlas's regions on its own grid: a numpy bincount × the voxel volume."""
    atlas = default_atlas(resolution)
    img = nb.load(atlas.image)
    counts = np.bincount(np.asarray(img.dataobj).astype(np.int64).ravel(), minlength=101)
    table = pd.read_csv(atlas.labels, sep="\t")
    voxel = abs(np.linalg.det(img.affine[:3, :3]))
    return {n: counts[i] * voxel for i, n in zip(table["index"], table["name"], strict=True)}


@pytest.mark.timeout(120)
def test_plan_cli_takes_the_default_atlas_bounds(tmp_path, capsys, site_policy):
    policy = _policy(tmp_path / "policy", site_policy, 'default = "atlas"\n"L_P02" = [0.0, 9.0]')
    argv = ["--n", "24", "30", "--epsilon", "1", "--policy", str(policy), "--residual-sd", "150"]
    for resolution in (1, 2):
        expected = _own_grid_max(resolution)
        regions = ["--regions", "L_P01", "L_P02", "R_P12"]
        assert plan_cli.main([*argv, *regions, "--atlas-resolution", str(resolution)]) == 0
        out = capsys.readouterr().out
        assert f"response: L_P01 (bounds 0 to {expected['L_P01']:g})" in out
        assert f"response: R_P12 (bounds 0 to {expected['R_P12']:g})" in out
        assert "response: L_P02 (bounds 0 to 9)" in out
        assert (
            plan_cli.main([*argv, "--regions", "100", "--atlas-resolution", str(resolution)]) == 0
        )
        out = capsys.readouterr().out
        assert f"(bounds 0 to {max(expected.values()):g})" in out
    # the policy's own entries need no atlas; the atlas default needs its resolution
    assert plan_cli.main([*argv, "--regions", "L_P02"]) == 0
    capsys.readouterr()
    assert plan_cli.main([*argv, "--regions", "L_P01"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--atlas-resolution" in err[0] and 'default = "atlas"' in err[0]
