"""Hostile inputs through the real command-line entry points, on copies of bundled data.

Each case damages a copy of a small site (bundled siteB, three subjects) or passes a bad
argument, runs ``fednipype`` (participant or group level), ``fednipype-meta``,
``fednipype-budget`` or ``fednipype-demo`` in-process, and checks what a user sees: a non-zero
exit code (the documented one) or a documented partial result, exactly one error line naming
the culprit, no Python traceback, nothing written before a refusal, and at the participant
level the other subjects' outputs intact.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from support import BUNDLED

from fednipype.cli import budget, demo, errors, hub, run
from fednipype.site.policy import example_policy

SUBJECTS = ("01", "02", "03")
MAP = "sub-{s}_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
FEATURES = "sub-{s}_space-MNI152NLin2009cAsym_atlas-fednipype_desc-regional_features.tsv"
FAST = ["--skip-bids-validation", "--nipype-plugin", "Linear"]
#: An affine 90 m away from the atlas: no atlas region in the image's field of view.
FAR = np.array([[3.0, 0, 0, 9e4], [0, 3.0, 0, 9e4], [0, 0, 3.0, 9e4], [0, 0, 0, 1]])
PROGS = {
    "participant": ("fednipype", run.main),
    "group": ("fednipype", run.main),
    "meta": ("fednipype-meta", hub.main),
    "budget": ("fednipype-budget", budget.main),
    "demo": ("fednipype-demo", demo.main),
}


@dataclass
class Env:
    """Paths of one case: the damaged site copy, the output, a scratch folder."""

    root: Path
    ds: Path
    out: Path
    derivs: Path | None = None
    policy: Path | None = None

    def map(self, subject: str) -> Path:
        return self.ds / "derivatives/segmentation" / f"sub-{subject}/anat" / MAP.format(s=subject)


@dataclass
class Case:
    id: str
    level: str
    build: Callable[[Env], list[str]]
    code: int
    culprit: str
    partial: bool = False  # participant level: the others' outputs are written
    runs: bool = False  # the workflow runs before the refusal: no release may be written


# -- the small site -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_site(tmp_path_factory) -> Path:
    """Bundled siteB reduced to three subjects."""
    ds = tmp_path_factory.mktemp("mini") / "siteB"
    shutil.copytree(BUNDLED / "siteB", ds)
    for folder in (ds, ds / "derivatives" / "segmentation"):
        for sub in folder.glob("sub-*"):
            if sub.name[4:] not in SUBJECTS:
                shutil.rmtree(sub)
    lines = (ds / "participants.tsv").read_text().splitlines()
    keep = [lines[0]] + [line for line in lines[1:] if line.split("\t")[0][4:] in SUBJECTS]
    (ds / "participants.tsv").write_text("\n".join(keep) + "\n")
    return ds


@pytest.fixture(scope="module")
def mini_derivatives(mini_site, tmp_path_factory) -> Path:
    """The participant level's output for the small site (for the group-level cases)."""
    out = tmp_path_factory.mktemp("mini-out") / "derivatives"
    assert run.main([str(mini_site), str(out), "participant", *FAST]) == 0
    return out


def _policy(env: Env, *, bind: bool = True, epsilon: float = 10.0, extra: str = "") -> Path:
    folder = env.root / "owner"
    folder.mkdir(exist_ok=True)
    path = folder / "policy.toml"
    path.write_text(extra + example_policy(dataset="siteB", total_epsilon=epsilon))
    if bind:
        assert budget.main(["init", "--policy", str(path)]) == 0
    return path


def _tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size if not p.is_dir() else -1)
        for p in root.rglob("*")
    }


# -- damage --------------------------------------------------------------------------------------


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.unlink(missing_ok=True)
    affine = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    nb.save(nb.Nifti1Image(data, affine), path)


def _huge_header(path: Path) -> None:
    """A ~2 KB .nii.gz whose header claims 2000^3 float64 voxels (defect 1)."""
    header = nb.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float64)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    raw = header.binaryblock + b"\0" * 4 + os.urandom(1024)
    path.unlink(missing_ok=True)
    path.write_bytes(gzip.compress(raw))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _map_case(name: str, damage: Callable[[Path], None], culprit: str) -> Case:
    def build(env: Env) -> list[str]:
        damage(env.map("02"))
        return [str(env.ds), str(env.out), "participant", *FAST]

    return Case(name, "participant", build, errors.EXIT_PARTIAL, culprit, partial=True)


def _part(name: str, extra: Callable[[Env], list[str]], code: int, culprit: str) -> Case:
    def build(env: Env) -> list[str]:
        more = extra(env)  # first: it may point the case at other folders
        return [str(env.ds), str(env.out), "participant", *more]

    return Case(name, "participant", build, code, culprit)


def _write(relative: str, text: str | bytes) -> Callable[[Env], None]:
    def write(env: Env) -> None:
        path = env.ds / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return write


def _then(damage: Callable[[Env], None], args: list[str] | None = None) -> Callable[[Env], list]:
    def build(env: Env) -> list[str]:
        damage(env)
        return list(args if args is not None else FAST)

    return build


def _other_pipeline(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "x",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep"}],
            }
        )
    )
    (env.out / "sub-01").mkdir()
    return FAST


def _file_out(env: Env) -> list[str]:
    env.out.write_text("not a folder")
    return FAST


def _loop_bids(env: Env) -> list[str]:
    loop = env.root / "loop"
    loop.symlink_to(loop)
    env.ds = loop
    return FAST


def _filter(text: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        path = env.root / "filter.json"
        path.write_text(text)
        return [*FAST, "--bids-filter-file", str(path)]

    return build


def _bad_atlas(env: Env) -> list[str]:
    atlas = env.root / "atlas.nii.gz"
    _huge_header(atlas)
    labels = env.root / "atlas_dseg.tsv"
    labels.write_text("index\tname\n1\tA\n")
    return [*FAST, "--atlas", str(atlas), "--atlas-labels", str(labels)]


def _validator_error(env: Env) -> list[str]:
    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    (env.ds / "sub-01" / "anat" / "sub-01_bogus.nii.gz").write_bytes(b"x")
    return ["--nipype-plugin", "Linear"]


def _long_field(env: Env) -> list[str]:
    lines = (env.ds / "participants.tsv").read_text().splitlines()
    lines.append("sub-" + "x" * 10_000_000 + "!\t30\tF\tcontrol\tR")
    (env.ds / "participants.tsv").write_text("\n".join(lines) + "\n")
    return FAST


def _two_maps(env: Env) -> list[str]:
    second = env.map("01").with_name(MAP.format(s="01").replace("_label", "_desc-x_label"))
    shutil.copy(env.map("01"), second)
    return FAST


def _proc(env: Env) -> list[str]:
    env.out = Path("/proc/fednipype-test-out")
    return FAST


def _sys(env: Env) -> list[str]:
    env.out = Path("/sys/fednipype-test-out")
    return FAST


PARTICIPANT_CASES = [
    # Broken maps: that subject fails alone, the others' outputs are written (exit 5).
    _map_case("map-header-2000cubed", _huge_header, "2000"),
    _map_case(
        "map-dangling-symlink", lambda p: _link(p, "../.git/annex/objects/XX/key"), "DataLad"
    ),
    _map_case("map-symlink-loop", lambda p: _link(p, p.name), "loop"),
    _map_case("map-zero-bytes", lambda p: p.write_bytes(b""), "zero-byte"),
    _map_case("map-truncated-gzip", _truncate, "truncated"),
    _map_case("map-html-page", lambda p: p.write_bytes(b"<html>404</html>" * 20), "NIfTI"),
    _map_case("map-4d", lambda p: _nifti(p, np.zeros((5, 5, 5, 2), np.float32)), "3-D"),
    _map_case(
        "map-probabilities-over-1", lambda p: _nifti(p, np.full((60, 72, 60), 7.0)), "probabilit"
    ),
    _map_case("map-all-nan", lambda p: _nifti(p, np.full((9, 9, 9), np.nan, np.float32)), "NaN"),
    _map_case("map-grid-far-away", lambda p: _nifti(p, np.full((9, 9, 9), 0.5), FAR), "overlap"),
    _map_case(
        "map-complex-voxels", lambda p: _nifti(p, np.zeros((5, 5, 5), np.complex64)), "voxel type"
    ),
    _map_case("map-2d-image", lambda p: _nifti(p, np.zeros((60, 72), np.float32)), "3-D"),
    # The input dataset.
    _part("bids-dir-missing", lambda e: (shutil.rmtree(e.ds), FAST)[1], 3, "does not exist"),
    _part(
        "bids-dir-is-a-file",
        lambda e: (shutil.rmtree(e.ds), e.ds.write_text("x"), FAST)[2],
        3,
        "not a folder",
    ),
    _part("bids-dir-symlink-loop", _loop_bids, 3, "loop"),
    _part(
        "no-dataset-description",
        _then(lambda e: (e.ds / "dataset_description.json").unlink()),
        3,
        "dataset_description.json",
    ),
    _part(
        "empty-dataset-description",
        _then(_write("dataset_description.json", "")),
        3,
        "not valid JSON",
    ),
    _part(
        "dataset-description-a-list",
        _then(_write("dataset_description.json", "[1]")),
        3,
        "JSON object",
    ),
    _part("no-maps-at-all", _then(lambda e: shutil.rmtree(e.ds / "derivatives")), 3, "probseg"),
    _part("two-maps-one-session", _two_maps, 3, "expected one"),
    _part("unknown-participant", lambda e: [*FAST, "--participant-label", "sub-77"], 3, "sub-77"),
    _part("participants-10MB-field", _long_field, 3, "participant_id"),
    _part("bids-validator-error", _validator_error, 3, "BIDS validator"),
    # The output, working and derivative folders.
    _part("output-is-input", lambda e: (setattr(e, "out", e.ds), FAST)[1], 3, "input dataset"),
    _part(
        "output-inside-input",
        lambda e: (setattr(e, "out", e.ds / "derivatives" / "fednipype"), FAST)[1],
        3,
        "inside the input",
    ),
    _part("output-is-a-file", _file_out, 3, "not a folder"),
    _part("output-of-another-pipeline", _other_pipeline, 3, "not fednipype"),
    _part(
        "output-not-empty",
        lambda e: (e.out.mkdir(), (e.out / "notes.txt").write_text("x"), FAST)[2],
        3,
        "holds other files",
    ),
    _part("output-under-proc", _proc, 3, "/proc"),
    _part("output-under-sys", _sys, 3, "/sys"),
    _part(
        "output-parent-is-a-file",
        lambda e: ((e.root / "f").write_text("x"), setattr(e, "out", e.root / "f" / "o"), FAST)[2],
        3,
        "is a file",
    ),
    _part(
        "output-dangling-symlink",
        lambda e: (e.out.symlink_to(e.root / "gone" / "x"), FAST)[1],
        3,
        "dangling",
    ),
    _part(
        "work-dir-is-a-file",
        lambda e: ((e.root / "w").write_text("x"), [*FAST, "-w", str(e.root / "w")])[1],
        3,
        "is a file",
    ),
    _part(
        "work-dir-inside-input", lambda e: [*FAST, "-w", str(e.ds / "work")], 3, "inside the input"
    ),
    _part(
        "work-dir-inside-output",
        lambda e: [*FAST, "--work_dir", str(e.out / "work")],
        3,
        "inside the derivative",
    ),
    _part("derivatives-missing", lambda e: [*FAST, "-d", str(e.root / "nope")], 3, "nope"),
    _part(
        "derivatives-without-description",
        lambda e: ((e.root / "d").mkdir(), [*FAST, "--derivatives", str(e.root / "d")])[1],
        3,
        "dataset_description.json",
    ),
    # Execution arguments.
    _part("plugin-bogus", lambda e: [*FAST, "--nipype-plugin", "Bogus"], 2, "Bogus"),
    _part(
        "plugin-args-n-procs-string",
        lambda e: [*FAST, "--plugin-args", '{"n_procs":"abc"}'],
        2,
        "n_procs",
    ),
    _part(
        "plugin-args-n-procs-zero",
        lambda e: [*FAST, "--plugin_args", '{"n_procs": 0}'],
        2,
        "n_procs",
    ),
    _part(
        "plugin-args-not-json",
        lambda e: [*FAST, "--plugin-args", "{n_procs: 2"],
        2,
        "--plugin-args",
    ),
    _part("plugin-args-a-list", lambda e: [*FAST, "--plugin-args", "[1, 2]"], 2, "JSON object"),
    _part(
        "plugin-args-callback",
        lambda e: [*FAST, "--plugin-args", '{"status_callback": 1}'],
        2,
        "status_callback",
    ),
    _part("n-procs-negative", lambda e: [*FAST, "--n-procs", "-3"], 2, "--nprocs"),
    _part("nthreads-not-a-number", lambda e: [*FAST, "--nthreads", "abc"], 2, "--nprocs"),
    _part("omp-nthreads-zero", lambda e: [*FAST, "--omp-nthreads", "0"], 2, "--omp-nthreads"),
    _part("res-not-a-label", lambda e: [*FAST, "--res", "2-mm"], 2, "--res"),
    _part("res-absent", lambda e: [*FAST, "--res", "9"], 3, "res-9"),
    _part("unknown-option", lambda e: [*FAST, "--bogus"], 2, "--bogus"),
    # The atlas and the filter file.
    _part(
        "atlas-without-labels",
        lambda e: [*FAST, "--atlas", str(e.root / "a.nii.gz")],
        2,
        "--atlas-labels",
    ),
    _part(
        "atlas-missing",
        lambda e: [
            *FAST,
            "--atlas",
            str(e.root / "a.nii.gz"),
            "--atlas-labels",
            str(e.root / "a.tsv"),
        ],
        3,
        "a.nii.gz",
    ),
    _part("atlas-header-2000cubed", _bad_atlas, 3, "2000"),
    _part(
        "filter-file-missing",
        lambda e: [*FAST, "--bids-filter-file", str(e.root / "f.json")],
        3,
        "f.json",
    ),
    _part("filter-file-not-json", _filter("{probseg"), 3, "filter.json"),
    _part("filter-file-unknown-query", _filter('{"bold": {}}'), 3, "'bold'"),
    _part("filter-file-unknown-entity", _filter('{"probseg": {"colour": "red"}}'), 3, "colour"),
    _part("filter-file-bad-value", _filter('{"probseg": {"session": {"a": 1}}}'), 3, "'probseg'"),
]


# -- group level ---------------------------------------------------------------------------------


def _group(extra: Callable[[Env], list[str]], *, bind: bool = True) -> Callable[[Env], list]:
    def build(env: Env) -> list[str]:
        env.policy = _policy(env, bind=bind)
        more = extra(env)  # first: it may point the case at other folders
        return [str(env.ds), str(env.derivs), "group", "--policy", str(env.policy), *more]

    return build


def _g(
    name: str, extra: Callable[[Env], list[str]], code: int, culprit: str, runs=False, **kw
) -> Case:
    return Case(name, "group", _group(extra, **kw), code, culprit, runs=runs)


def _participants(text: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        (env.ds / "participants.tsv").write_text(text)
        return ["--epsilon", "1"]

    return build


def _bad_policy(text: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.policy.write_text(text)
        return ["--epsilon", "1"]

    return build


HEADER = "participant_id\tage\tsex\tgroup\thandedness\n"
GROUP_CASES = [
    _g("missing-epsilon", lambda e: [], 2, "--epsilon"),
    _g("epsilon-not-a-number", lambda e: ["--epsilon", "abc"], 2, "--epsilon"),
    _g("epsilon-negative", lambda e: ["--epsilon=-1"], 4, "--epsilon"),
    _g("epsilon-nan", lambda e: ["--epsilon", "nan"], 4, "--epsilon"),
    _g("epsilon-inf", lambda e: ["--epsilon", "inf"], 4, "--epsilon"),
    _g("delta-above-1", lambda e: ["--epsilon", "1", "--delta", "1.5"], 4, "--delta"),
    _g("policy-missing", lambda e: (e.policy.unlink(), ["--epsilon", "1"])[1], 4, "policy"),
    _g("policy-not-toml", _bad_policy("[budget\nepsilon ="), 4, "TOML"),
    _g(
        "policy-without-bounds",
        _bad_policy("[budget]\nepsilon = 1.0\ndelta = 1e-5\n"),
        4,
        "policy.toml",
    ),
    _g("ledger-never-initialised", lambda e: ["--epsilon", "1"], 4, "ledger", bind=False),
    _g("budget-exceeded", lambda e: ["--epsilon", "50"], 4, "epsilon", runs=True),
    _g(
        "participants-missing",
        lambda e: ((e.ds / "participants.tsv").unlink(), ["--epsilon", "1"])[1],
        3,
        "participants.tsv",
    ),
    _g("participants-empty", _participants(""), 3, "empty"),
    _g("participants-header-only", _participants(HEADER), 3, "no participant rows"),
    _g(
        "ages-all-n/a",
        _participants(HEADER + "".join(f"sub-{s}\tn/a\tF\tcontrol\tR\n" for s in SUBJECTS)),
        3,
        "'age'",
    ),
    _g(
        "age-1e400",
        _participants(
            HEADER + "sub-01\t30\tF\tcontrol\tR\n"
            "sub-02\t1e400\tM\tpatient\tR\nsub-03\t40\tF\tcontrol\tR\n"
        ),
        3,
        "sub-02",
    ),
    _g(
        "participants-without-sex",
        _participants("participant_id\tage\tgroup\nsub-01\t3\tx\n"),
        3,
        "sex",
    ),
    _g(
        "group-derivatives-missing",
        lambda e: (setattr(e, "derivs", e.root / "none"), ["--epsilon", "1"])[1],
        3,
        "participant level first",
    ),
    _g(
        "derivatives-not-fednipype",
        lambda e: (
            (e.root / "empty").mkdir(),
            setattr(e, "derivs", e.root / "empty"),
            ["--epsilon", "1"],
        )[2],
        3,
        "not fednipype",
    ),
    _g(
        "release-dir-is-a-file",
        lambda e: (
            (e.root / "r").write_text("x"),
            ["--epsilon", "1", "--release-dir", str(e.root / "r")],
        )[1],
        3,
        "is a file",
    ),
    _g(
        "release-dir-inside-input",
        lambda e: ["--epsilon", "1", "--release_dir", str(e.ds / "release")],
        3,
        "inside the input",
    ),
    _g(
        "atlas-not-in-output",
        lambda e: ["--epsilon", "1", "--atlas", str(e.root / "tpl-X_atlas-Other_dseg.nii.gz")],
        3,
        "atlas-Other",
    ),
]


# -- fednipype-meta, fednipype-budget, fednipype-demo ------------------------------------------


def _meta(
    name: str, write: Callable[[Path], None] | None, culprit: str, code: int = 3, extra=()
) -> Case:
    def build(env: Env) -> list[str]:
        release = env.root / "siteX_release.json"
        if write is not None:
            write(release)
        return [str(release), "-o", str(env.root / "meta"), *extra]

    return Case(f"meta-{name}", "meta", build, code, culprit)


META_CASES = [
    _meta("missing", None, "siteX_release.json"),
    _meta("not-json", lambda p: p.write_text("{not json"), "JSON"),
    _meta(
        "deeply-nested", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"
    ),
    _meta("a-list", lambda p: p.write_text("[1, 2]"), "siteX_release.json"),
    _meta(
        "10MB-field",
        lambda p: p.write_text(json.dumps({"schema_version": "2.0", "x": "y" * 10_000_000})),
        "release",
    ),
    _meta("empty", lambda p: p.write_text(""), "siteX_release.json"),
    _meta("no-schema-version", lambda p: p.write_text("{}"), "schema_version"),
    _meta("bad-method", lambda p: p.write_text("{}"), "--method", 2, ("--method", "BOGUS")),
]
BUDGET_CASES = [
    Case(
        "budget-policy-missing",
        "budget",
        lambda e: ["show", "--policy", str(e.root / "none.toml")],
        4,
        "none.toml",
    ),
    Case(
        "budget-policy-not-toml",
        "budget",
        lambda e: (
            (e.root / "p.toml").write_text("[x"),
            ["show", "--policy", str(e.root / "p.toml")],
        )[1],
        4,
        "p.toml",
    ),
]
DEMO_CASES = [
    Case("demo-sites-missing", "demo", lambda e: [str(e.root / "none"), str(e.out)], 3, "none"),
    Case("demo-no-sites", "demo", lambda e: [str(e.root), str(e.out)], 3, "no BIDS dataset"),
    Case(
        "demo-n-procs-zero",
        "demo",
        lambda e: [str(BUNDLED), str(e.out), "--n-procs", "0"],
        2,
        "--n-procs",
    ),
]

CASES = PARTICIPANT_CASES + GROUP_CASES + META_CASES + BUDGET_CASES + DEMO_CASES


def test_there_are_at_least_60_hostile_cases():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    print(f"\n{len(CASES)} hostile inputs through the command line")
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input(case: Case, mini_site, mini_derivatives, tmp_path, capsys):
    env = Env(root=tmp_path, ds=tmp_path / "ds" / "siteB", out=tmp_path / "out")
    shutil.copytree(mini_site, env.ds)
    if case.level == "group":
        env.derivs = tmp_path / "derivatives"
        shutil.copytree(mini_derivatives, env.derivs)
    argv = case.build(env)
    before = _tree(tmp_path)
    prog, main = PROGS[case.level]
    started = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse: usage errors and --help
        code = exit_info.code
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()

    assert code == case.code, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    assert case.culprit in lines[0], lines[0]
    assert len(lines[0]) <= errors.MAX_LINE + 40
    if case.partial:
        # That subject failed, fast; the others' outputs are written.
        assert "sub-02" in lines[0] and elapsed < 60
        for subject in ("01", "03"):
            assert (env.out / f"sub-{subject}" / "anat" / FEATURES.format(s=subject)).is_file()
        assert not (env.out / "sub-02" / "anat" / FEATURES.format(s="02")).exists()
    elif case.runs:  # refused by the release node: the ledger refused, nothing was released
        assert not [p for p in tmp_path.rglob("*_release.json")]
    elif case.level in ("participant", "group"):
        assert _tree(tmp_path) == before, "something was written before the refusal"


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_a_broken_map_never_aborts_the_run(plugin, mini_site, tmp_path, capsys):
    """A dangling (DataLad) link and a lying header in one run, with either local plugin."""
    ds = tmp_path / "siteB"
    shutil.copytree(mini_site, ds)
    maps = ds / "derivatives" / "segmentation"
    _link(maps / "sub-01" / "anat" / MAP.format(s="01"), "../../.git/annex/objects/key")
    _huge_header(maps / "sub-03" / "anat" / MAP.format(s="03"))
    argv = [str(ds), str(tmp_path / "out"), "participant", "--skip-bids-validation"]
    code = run.main([*argv, "--nipype-plugin", plugin, "--nprocs", "2"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_PARTIAL and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fednipype: error: ")]
    assert len(lines) == 2 and "sub-01" in lines[0] and "sub-03" in lines[1]
    assert (tmp_path / "out" / "sub-02" / "anat" / FEATURES.format(s="02")).is_file()


def test_verbose_shows_the_traceback(mini_site, tmp_path, capsys):
    code = run.main(
        [
            str(mini_site),
            str(tmp_path / "o"),
            "participant",
            "-v",
            "--nipype-plugin",
            "Bogus",
            "--skip-bids-validation",
        ]
    )
    err = capsys.readouterr().err
    assert code == errors.EXIT_USAGE and "Traceback" in err and "Bogus" in err
