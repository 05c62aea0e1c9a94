"""Command-line parser of the ``fednipype`` BIDS-App (``bids_dir output_dir analysis_level``)."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from fednipype import __version__


def _path_exists(path: str, parser: argparse.ArgumentParser, *, kind: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        parser.error(f"{kind} does not exist: {path}")
    return resolved


def _label(value: str) -> str:
    value = value.strip()
    return value[4:] if value.startswith("sub-") else value


def build_parser() -> argparse.ArgumentParser:
    """Build the BIDS-App argument parser.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> args = build_parser().parse_args(
    ...     ["bids_examples/siteA", "out", "participant", "--participant-label", "sub-01", "02"]
    ... )
    >>> args.participant_label
    ['01', '02']
    """
    parser = argparse.ArgumentParser(
        prog="fednipype",
        description=(
            "fednipype: regional features from BIDS datasets, released under differential "
            "privacy for multi-site analysis."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exists = partial(_path_exists, parser=parser, kind="BIDS folder")
    parser.add_argument("bids_dir", type=exists, help="root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="folder for the derivatives")
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant': per-subject work; 'group': the site-level step",
    )
    parser.add_argument("--version", action="version", version=f"fednipype {__version__}")

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

    perf = parser.add_argument_group("performance")
    perf.add_argument("--n-procs", type=int, default=None, help="processes for MultiProc")
    perf.add_argument(
        "--nipype-plugin",
        default="MultiProc",
        help="Nipype execution plugin (Linear, MultiProc, SLURM, SGE, PBS, …)",
    )
    perf.add_argument(
        "--plugin-args",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p short"}\'',
    )

    wf = parser.add_argument_group("workflow")
    wf.add_argument("--atlas", type=Path, help="label atlas image (default: fednipype's)")
    wf.add_argument("--atlas-labels", type=Path, help="the atlas's dseg.tsv (index, name)")
    wf.add_argument("--work-dir", type=Path, help="Nipype working directory (its cache)")

    privacy = parser.add_argument_group("privacy (group level)")
    privacy.add_argument("--policy", type=Path, help="the site policy (TOML)")
    privacy.add_argument("--epsilon", type=float, help="privacy loss of this release")
    privacy.add_argument("--delta", type=float, default=1e-5, help="delta of this release")
    privacy.add_argument("--site", help="site label in the release (default: BIDS folder name)")
    return parser


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value
