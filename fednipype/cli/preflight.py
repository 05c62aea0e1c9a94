"""Pre-flight checks of the BIDS-App: arguments and paths, before anything is built or written.

As fMRIPrep does, every check that can fail on the user's input runs here, first: the input
dataset (a folder with a valid ``dataset_description.json``, no symbolic-link loop), the output
folder (not the input nor inside it, fednipype's own or empty, writable, not under ``/proc``
or ``/sys``), the working and release folders, the Nipype plugin and its arguments, the atlas,
a BIDS filter file, the derivative datasets, and at the group level the site policy, ε and δ,
the ledger, the participants table and its covariates. Each failure is one exception naming
the argument or file and what was expected; nothing has been written when it is raised.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednipype.atlas import Atlas
from fednipype.bids import (
    check_derivative_dataset,
    find_feature_files,
    read_bids_filters,
    read_description,
    read_participants,
)
from fednipype.cli.errors import UsageError
from fednipype.cli.participant import default_work_dir
from fednipype.contract.calibration import check_delta, check_epsilon
from fednipype.derivatives import PIPELINE_NAME, atlas_entity
from fednipype.exceptions import BIDSError, DataError
from fednipype.grids import read_label_table
from fednipype.images import bids_entities, open_image
from fednipype.site.design import ModelSpec
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import SitePolicy

LOGGER = logging.getLogger(__name__)

#: Folders no output may go to (virtual file systems).
FORBIDDEN_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
#: Plugin arguments fednipype knows, with their type and lower bound (None: no bound).
PLUGIN_ARG_TYPES: dict[str, tuple[type | tuple[type, ...], float | None]] = {
    "n_procs": (int, 1),
    "max_jobs": (int, 1),
    "maxtasksperchild": (int, 1),
    "max_tries": (int, 1),
    "memory_gb": ((int, float), 0),
    "retry_timeout": ((int, float), 0),
    "poll_sleep_duration": ((int, float), 0),
    "raise_insufficient": (bool, None),
    "dont_resubmit_completed_jobs": (bool, None),
    "sbatch_args": (str, None),
    "qsub_args": (str, None),
    "bsub_args": (str, None),
    "template": (str, None),
    "scheduler_args": (str, None),
}
#: Seconds the BIDS validator may take before it is stopped (and the check skipped).
VALIDATOR_TIMEOUT_S = 300
VALIDATOR = "bids-validator-deno"


@dataclass
class Setup:
    """What the pre-flight checks resolved, for the run."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    atlas: Atlas | None = None
    derivatives: bool | list[Path] = True
    filters: dict[str, dict] = field(default_factory=dict)
    filter_file: Path | None = None
    policy: SitePolicy | None = None
    release_dir: Path | None = None
    regions: list[str] | None = None
    site: str = ""
    feature_files: list[Path] = field(default_factory=list)


# -- paths -------------------------------------------------------------------------------------


def _resolve(path: Path, argument: str) -> Path:
    """An absolute path with the links of its existing part resolved; a loop is an error."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BIDSError(f"{argument} {path}: a symbolic-link loop ({err})") from err


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_bids_dir(path: Path) -> Path:
    """The input dataset: an existing folder (no link loop) with a valid description."""
    root = _resolve(path, "bids_dir")
    if not root.exists():
        raise BIDSError(f"bids_dir {path}: does not exist; expected the root of a BIDS dataset")
    if not root.is_dir():
        raise BIDSError(f"bids_dir {path}: not a folder; expected the root of a BIDS dataset")
    read_description(root)
    return root


def _check_writable(folder: Path, argument: str) -> None:
    """Test a write in ``folder`` or, if it does not exist yet, in its nearest ancestor."""
    for root in FORBIDDEN_ROOTS:
        if _inside(folder, root):
            raise BIDSError(f"{argument} {folder}: under {root}, a virtual file system")
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise BIDSError(f"{argument} {folder}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise BIDSError(f"{argument} {folder}: {probe} is a file, not a folder")
    try:
        handle, name = tempfile.mkstemp(prefix=".fednipype-write-test-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        raise BIDSError(
            f"{argument} {folder}: cannot write in {probe} ({err.strerror or err})"
        ) from err


def _fednipype_owned(folder: Path) -> bool:
    """Whether ``folder``'s ``dataset_description.json`` names fednipype in ``GeneratedBy``."""
    path = folder / "dataset_description.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    generated = value.get("GeneratedBy") if isinstance(value, dict) else None
    return isinstance(generated, list) and any(
        isinstance(g, dict) and g.get("Name") == PIPELINE_NAME for g in generated
    )


def _not_dangling(path: Path, argument: str) -> None:
    if path.is_symlink() and not path.exists():
        raise BIDSError(f"{argument} {path}: a dangling symbolic link; expected a folder")


def check_output_dir(output_dir: Path, bids_dir: Path, *, must_exist: bool = False) -> Path:
    """fednipype's derivative folder: not the input nor inside it, ours or empty, writable."""
    _not_dangling(output_dir, "output_dir")
    out = _resolve(output_dir, "output_dir")
    if out == bids_dir:
        raise BIDSError(
            f"output_dir {output_dir}: is the input dataset; choose a folder outside bids_dir"
        )
    if _inside(out, bids_dir):
        raise BIDSError(
            f"output_dir {output_dir}: inside the input dataset {bids_dir}; choose a folder "
            "outside it (the input is never written)"
        )
    if out.exists() and not out.is_dir():
        raise BIDSError(f"output_dir {output_dir}: exists and is not a folder")
    if must_exist and not out.is_dir():
        raise BIDSError(
            f"output_dir {output_dir}: does not exist; run the participant level first"
        )
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not _fednipype_owned(out):
            shown = ", ".join(entries[:3]) + (" …" if len(entries) > 3 else "")
            raise BIDSError(
                f"output_dir {output_dir}: holds other files ({shown}) and is not fednipype's "
                "derivative dataset (its dataset_description.json does not name fednipype); "
                "choose an empty or new folder"
            )
    _check_writable(out, "output_dir")
    return out


def check_side_dir(path: Path, argument: str, *, bids_dir: Path, output_dir: Path) -> Path:
    """A working or release folder: not a file, outside the input and the derivatives."""
    _not_dangling(path, argument)
    folder = _resolve(path, argument)
    if folder.exists() and not folder.is_dir():
        raise BIDSError(f"{argument} {path}: exists and is a file; expected a folder")
    if _inside(folder, bids_dir):
        raise BIDSError(f"{argument} {path}: inside the input dataset {bids_dir}")
    if _inside(folder, output_dir):
        raise BIDSError(
            f"{argument} {path}: inside the derivative dataset {output_dir}; choose a folder "
            "outside it"
        )
    _check_writable(folder, argument)
    return folder


# -- execution ---------------------------------------------------------------------------------


def known_plugins() -> dict[str, str]:
    """Nipype's execution plugins, lower-case name → name."""
    from nipype.pipeline import plugins  # Nipype, ~1 s to import: the run needs it anyway

    return {
        name[: -len("Plugin")].lower(): name[: -len("Plugin")]
        for name in dir(plugins)
        if name.endswith("Plugin") and name != "Plugin"
    }


def check_plugin(name: str, args: dict[str, Any] | None, n_procs: int | None) -> tuple[str, dict]:
    """The plugin's canonical name and its typed arguments (``--n-procs`` merged in)."""
    plugins = known_plugins()
    canonical = plugins.get(name.strip().lower())
    if canonical is None:
        raise UsageError(
            f"--nipype-plugin {name!r}: not a Nipype plugin; expected one of "
            f"{', '.join(sorted(plugins.values()))}"
        )
    checked = dict(args or {})
    for key, value in checked.items():
        if key == "status_callback":
            raise UsageError(
                "--plugin-args: 'status_callback' cannot be set from the command line"
            )
        if key not in PLUGIN_ARG_TYPES:
            LOGGER.warning(
                "--plugin-args: %r is unknown to fednipype; passed to Nipype as is", key
            )
            continue
        kind, low = PLUGIN_ARG_TYPES[key]
        wrong_type = not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        if wrong_type or (low is not None and value < low):
            names = kind.__name__ if isinstance(kind, type) else "number"
            bound = f" >= {low}" if low is not None else ""
            raise UsageError(f"--plugin-args: {key!r} must be a {names}{bound}, got {value!r}")
    if n_procs is not None:
        if n_procs < 1:
            raise UsageError(f"--nprocs: must be an integer >= 1, got {n_procs}")
        if canonical in ("MultiProc", "LegacyMultiProc"):
            checked.setdefault("n_procs", n_procs)
    return canonical, checked


def check_atlas(atlas: Path | None, labels: Path | None) -> Atlas | None:
    """The atlas image (header checked) and its label table, or ``None`` for the default."""
    if atlas is None and labels is None:
        return None
    if atlas is None or labels is None:
        raise UsageError("--atlas and --atlas-labels go together")
    open_image(atlas.expanduser().absolute(), "atlas image (--atlas)")
    read_label_table(labels.expanduser().absolute())
    name = bids_entities(atlas).get("atlas") or atlas.name.split(".")[0]
    return Atlas(atlas.expanduser().absolute(), labels.expanduser().absolute(), name)


def validate_bids(bids_dir: Path, *, timeout: float = VALIDATOR_TIMEOUT_S) -> None:
    """Run the BIDS validator on the input when it is installed; its errors are a refusal.

    Skipped (with an INFO line) when ``bids-validator-deno`` is not on the PATH, and with a
    warning when it does not finish within ``timeout`` seconds.

    Raises
    ------
    BIDSError
        The validator reports errors: their number and the first one.
    """
    executable = shutil.which(VALIDATOR)
    if executable is None:
        LOGGER.info("BIDS validation skipped: %s is not installed", VALIDATOR)
        return
    try:
        done = subprocess.run(
            [executable, "--format", "json", str(bids_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        LOGGER.warning("BIDS validation skipped: %s took over %.0f s", VALIDATOR, timeout)
        return
    try:
        issues = json.loads(done.stdout)["issues"]["issues"]
    except (ValueError, KeyError, TypeError):
        LOGGER.warning("BIDS validation skipped: %s gave no readable report", VALIDATOR)
        return
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        first = errors[0]
        where = first.get("location") or ""
        raise BIDSError(
            f"bids_dir {bids_dir}: the BIDS validator reports {len(errors)} error(s); first: "
            f"{first.get('code')} {where} {first.get('issueMessage') or ''}".rstrip()
            + " (--skip-bids-validation runs anyway)"
        )


# -- the two levels ----------------------------------------------------------------------------


def _common(args: argparse.Namespace, *, must_exist: bool) -> Setup:
    bids_dir = check_bids_dir(args.bids_dir)
    output_dir = check_output_dir(args.output_dir, bids_dir, must_exist=must_exist)
    work = args.work_dir if args.work_dir is not None else default_work_dir(output_dir)
    work_dir = check_side_dir(work, "--work-dir", bids_dir=bids_dir, output_dir=output_dir)
    if args.omp_nthreads is not None and args.omp_nthreads < 1:
        raise UsageError(f"--omp-nthreads: must be an integer >= 1, got {args.omp_nthreads}")
    plugin, plugin_args = check_plugin(args.nipype_plugin, args.plugin_args, args.n_procs)
    return Setup(bids_dir, output_dir, work_dir, plugin=plugin, plugin_args=plugin_args)


def check_participant(args: argparse.Namespace) -> Setup:
    """Every check of the participant level; nothing is written.

    Raises
    ------
    UsageError, BIDSError, ImageError
        Naming the argument or file.
    """
    setup = _common(args, must_exist=False)
    setup.atlas = check_atlas(args.atlas, args.atlas_labels)
    if args.bids_filter_file is not None:
        setup.filter_file = args.bids_filter_file.expanduser().absolute()
        setup.filters = read_bids_filters(setup.filter_file)
    if args.derivatives:
        folders = []
        for folder in args.derivatives:
            resolved = _resolve(folder, "--derivatives")
            if not resolved.is_dir():
                raise BIDSError(f"--derivatives {folder}: not a folder")
            check_derivative_dataset(resolved)
            folders.append(resolved)
        setup.derivatives = folders
    if not args.skip_bids_validation:
        validate_bids(setup.bids_dir)
    return setup


def check_group(args: argparse.Namespace) -> Setup:
    """Every check of the group level, before the release workflow is built.

    The participant level's features, the participants table and the covariates the model
    needs, the policy, ε and δ, the ledger, the release folder.

    Raises
    ------
    UsageError, BIDSError, PolicyError
        Naming the argument or file.
    """
    if args.policy is None or args.epsilon is None:
        raise UsageError("the group level needs --policy and --epsilon (no privacy default)")
    setup = _common(args, must_exist=True)
    if not _fednipype_owned(setup.output_dir):
        raise BIDSError(
            f"output_dir {args.output_dir}: not fednipype's derivative dataset; run the "
            "participant level into it first"
        )
    atlas = None
    if args.atlas is not None:
        atlas = atlas_entity(
            bids_entities(args.atlas).get("atlas") or args.atlas.name.split(".")[0]
        )
    setup.feature_files = find_feature_files(
        setup.output_dir, args.participant_label, atlas=atlas, res=args.res
    )
    _check_covariates(setup.bids_dir / "participants.tsv", setup.feature_files)
    policy_file = args.policy.expanduser().absolute()
    setup.policy = SitePolicy.from_toml(policy_file)
    check_epsilon(args.epsilon, "--epsilon")
    check_delta(args.delta, "--delta")
    PrivacyLedger.from_policy(setup.policy)
    setup.site = args.site or setup.bids_dir.name
    release_dir = args.release_dir or setup.output_dir.parent / "release"
    release_dir = check_side_dir(
        release_dir, "--release-dir", bids_dir=setup.bids_dir, output_dir=setup.output_dir
    )
    setup.release_dir = release_dir
    setup.regions = _regions(args.regions)
    return setup


def _check_covariates(participants: Path, feature_files: list[Path]) -> None:
    """The participants table has rows, the model's columns, and values for them.

    Raises
    ------
    BIDSError
        Naming the file and the column (a non-finite value names the participant too, from
        :func:`fednipype.bids.read_participants`).
    """
    if not participants.is_file():
        raise BIDSError(
            f"{participants}: participants.tsv not found; the group level needs the "
            "participants' covariates"
        )
    table = read_participants(participants)
    if table.empty:
        raise BIDSError(f"{participants}: no participant rows (only a header)")
    spec = ModelSpec()
    missing = [c for c in spec.covariates if c not in table.columns]
    if missing:
        raise BIDSError(
            f"{participants}: the model needs column(s) {', '.join(missing)}; columns are "
            f"{', '.join(table.columns)}"
        )
    subjects = sorted({f"sub-{bids_entities(f)['sub']}" for f in feature_files})
    rows = table.loc[table.index.intersection(subjects)]
    if rows.empty:
        raise BIDSError(
            f"{participants}: no row for any of the {len(subjects)} subject(s) with features"
        )
    for column in spec.covariates:
        if rows[column].isna().all():
            raise BIDSError(
                f"{participants}: column '{column}' is n/a for every participant with features; "
                "the model needs values"
            )


def _regions(values: list[str] | None) -> list[str] | None:
    """``--regions``: names, or ``@FILE`` with one name per line (blank lines and # ignored)."""
    if not values:
        return None
    names: list[str] = []
    for value in values:
        if not value.startswith("@"):
            names.append(value)
            continue
        path = Path(value[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"--regions {value}: cannot read the file ({err})") from err
        names += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return names
