"""Command-line parser of the ``fednipype`` BIDS-App (``bids_dir output_dir analysis_level``).

fMRIPrep's spellings are accepted (``-`` and ``_`` forms, ``-w``, ``--nprocs``, ``-v``/``-vv``,
``--bids-filter-file``, ``-d/--derivatives`` …); the README's flag-parity table lists them.
The parser only parses: paths and values are checked by :mod:`fednipype.cli.preflight` before
anything is built or written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fednipype import __version__
from fednipype.cli.errors import ArgumentParser, HelpFormatter, exit_epilog

PROG = "fednipype"


def _label(value: str) -> str:
    value = value.strip()
    return value[4:] if value.startswith("sub-") else value


def _derivative_path(value: str) -> Path:
    """``PATH`` or fMRIPrep's ``NAME=PATH``."""
    name, sep, path = value.partition("=")
    return Path(path if sep and name and "/" not in name else value)


def _res(value: str) -> str:
    """A ``res-`` label: ``2``, ``res-2`` (or fMRIPrep's ``MNI152NLin2009cAsym:res-2``)."""
    value = value.rsplit(":", 1)[-1].strip()
    value = value[4:] if value.startswith("res-") else value
    if not value.isalnum():
        raise argparse.ArgumentTypeError(f"expected a res- label such as 2, got {value!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"n_procs\": 2}}', got {type(value).__name__}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the BIDS-App argument parser.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> args = build_parser().parse_args(
    ...     ["bids_examples/siteA", "out", "participant", "--participant-label", "sub-01", "02",
    ...      "--nthreads", "2", "-w", "work", "-vv"]
    ... )
    >>> args.participant_label, args.n_procs, args.work_dir.name, args.verbose
    (['01', '02'], 2, 'work', 2)
    """
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "fednipype: regional features from BIDS datasets, released under differential "
            "privacy for multi-site analysis."
        ),
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    parser.add_argument(
        "output_dir",
        type=Path,
        help="folder of fednipype's derivative dataset (empty, new, or fednipype's own; "
        "not inside bids_dir)",
    )
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant': per-subject features; 'group': the site's DP release",
    )
    parser.add_argument("--version", action="version", version=f"fednipype {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more output: -v progress messages and tracebacks, -vv debugging",
    )

    bids = parser.add_argument_group("BIDS filtering")
    bids.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        type=_label,
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    bids.add_argument(
        "--space", default="MNI152NLin2009cAsym", help="space- entity of the probability maps"
    )
    bids.add_argument("--label", default="GM", help="label- entity (tissue) of the maps")
    bids.add_argument(
        "--res",
        type=_res,
        metavar="RES",
        help="res- entity of the maps to use, e.g. 2 (default: the native maps, without res-)",
    )
    bids.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        type=Path,
        metavar="FILE",
        help='JSON of entity filters per query, e.g. {"probseg": {"session": "1"}} '
        "(queries: probseg, t1w; null: entity absent)",
    )
    bids.add_argument(
        "-d",
        "--derivatives",
        nargs="+",
        type=_derivative_path,
        metavar="PATH",
        help="derivative datasets holding the maps (e.g. fMRIPrep's or sMRIPrep's output; "
        "PATH or NAME=PATH) instead of bids_dir/derivatives",
    )
    bids.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not validate bids_dir with the BIDS validator (run by default when "
        "bids-validator-deno is installed)",
    )

    perf = parser.add_argument_group("performance")
    perf.add_argument(
        "--nprocs",
        "--nthreads",
        "--n-procs",
        "--n_procs",
        "--n-cpus",
        "--n_cpus",
        dest="n_procs",
        type=int,
        metavar="N",
        help="processes for MultiProc (default: Nipype's, all CPUs)",
    )
    perf.add_argument(
        "--omp-nthreads",
        "--omp_nthreads",
        type=int,
        metavar="N",
        help="threads per process for numerical libraries (default: unlimited)",
    )
    perf.add_argument(
        "--nipype-plugin",
        "--nipype_plugin",
        default="MultiProc",
        metavar="PLUGIN",
        help="Nipype execution plugin: Linear, MultiProc, SLURM, SGE, PBS, …",
    )
    perf.add_argument(
        "--plugin-args",
        "--plugin_args",
        type=_json_object,
        metavar="JSON",
        help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p short"}\'',
    )

    wf = parser.add_argument_group("workflow")
    wf.add_argument("--atlas", type=Path, help="label atlas image (default: fednipype's)")
    wf.add_argument(
        "--atlas-labels",
        "--atlas_labels",
        type=Path,
        help="the atlas's dseg.tsv (columns index, name); with --atlas",
    )
    wf.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        type=Path,
        metavar="DIR",
        help="Nipype working directory, its cache (default: 'work' beside output_dir)",
    )
    wf.add_argument(
        "--notrack",
        action="store_true",
        help="accepted for fMRIPrep parity: fednipype sends nothing; also turns off Nipype's "
        "version check",
    )

    privacy = parser.add_argument_group("privacy (group level)")
    privacy.add_argument("--policy", type=Path, help="the site policy (TOML)")
    privacy.add_argument("--epsilon", type=float, help="privacy loss of this release")
    privacy.add_argument("--delta", type=float, default=1e-5, help="delta of this release")
    privacy.add_argument("--site", help="site label in the release (default: bids_dir's name)")
    privacy.add_argument(
        "--release-dir",
        "--release_dir",
        type=Path,
        metavar="DIR",
        help="folder of the release files, outside the derivative dataset (default: "
        "'release' beside output_dir)",
    )
    privacy.add_argument(
        "--regions",
        nargs="+",
        metavar="R",
        help="release only these atlas regions, pre-registered (default: every region); "
        "'@FILE' reads one name per line. Fewer regions, less noise per region",
    )
    return parser
