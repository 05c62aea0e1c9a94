"""Entry point of ``fednipype-meta``: pool site releases and write the coordinator's report.

::

    fednipype-meta siteA_release.json siteB_release.json siteC_release.json -o results/ \\
        [--method REML|DL|PM] [--test z|knha] [--regions R ...] [--terms T ...]

writes into ``results/``:

``pooled_results.tsv``
    Per region, term and method (pooled regression, fixed effect, random effects): estimate,
    standard error, interval, p-value, k, heterogeneity, in original units.
``site_estimates.tsv``
    Each site's own estimates (what the forest plots show).
``forest_<region>_<term>.png``
    One forest plot per plotted region and term. Terms: ``--terms``, default every term but
    the intercept. Regions: ``--regions`` (which also restricts the tables); without it every
    region when the atlas has at most 10, otherwise the first 10 in atlas order — the command
    says so on stderr and on the page, and the tables still hold every region.
``index.html``
    The summary page linking the plots.

Every release is validated and checked for poolability before anything is written. The outputs
are written into a temporary folder beside the output folder and moved into place at the end:
after an error (one line on stderr naming the file, exit code 3 for an invalid release or
path, 2 for a usage error; ``--help`` lists them) the output folder is as it was
— absent if it did not exist. Into an existing folder the files are moved one by one (each
replaced atomically, ``index.html`` last); files of earlier runs that this run does not write
are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fednipype import __version__
from fednipype.cli.console import setup_logging
from fednipype.cli.errors import (
    ArgumentParser,
    HelpFormatter,
    exit_epilog,
    guarded,
)
from fednipype.exceptions import FednipypeError, ReleaseValidationError
from fednipype.hub.pooling import pool
from fednipype.hub.releases import load_releases
from fednipype.hub.reports import TSV_NAME, write_meta_report

PROG = "fednipype-meta"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``fednipype-meta``."""
    parser = ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
        description=(
            "Pool differentially private site releases: pooled regression of the summed "
            "sufficient statistics and fixed/random-effects meta-analysis of the site "
            "estimates, with forest plots and an HTML summary."
        ),
    )
    parser.add_argument(
        "releases", nargs="+", type=Path, metavar="RELEASE.json", help="one release per site"
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        required=True,
        type=Path,
        metavar="OUTDIR",
        help="folder for pooled_results.tsv, site_estimates.tsv, forest plots and index.html",
    )
    group = parser.add_argument_group("meta-analysis")
    group.add_argument(
        "--method",
        default="REML",
        type=str.upper,
        choices=("REML", "DL", "PM"),
        help="random-effects tau2 estimator (default: %(default)s)",
    )
    group.add_argument(
        "--test",
        default="z",
        type=str.lower,
        choices=("z", "knha"),
        help="random-effects test: Wald z or Knapp-Hartung t (default: %(default)s)",
    )
    group.add_argument(
        "--common-intercept",
        action="store_true",
        help="pooled regression with one intercept for all sites (default: an intercept per "
        "site, i.e. site as a fixed effect, which keeps site offsets out of the slopes)",
    )
    group = parser.add_argument_group("selection")
    group.add_argument(
        "--regions",
        nargs="+",
        metavar="R",
        help="regions to analyse, tabulate and plot (default: all; plots for at most the first "
        "10 unless named here)",
    )
    group.add_argument(
        "--terms",
        nargs="+",
        metavar="T",
        help="model terms to plot, e.g. age 'group[patient]' (default: every term except the "
        "intercept; the tables always hold every term)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: debugging)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs from ``tmp`` to ``out_dir``."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    names = sorted(p.name for p in tmp.iterdir())
    names.sort(key=lambda name: name == "index.html")  # the page last: its links exist first
    for name in names:
        os.replace(tmp / name, out_dir / name)
    tmp.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-meta`` and return its exit code (see ``fednipype-meta --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    return guarded(PROG, lambda: _run(args), verbose=args.verbose)


def _load(paths: Sequence[Path]) -> list:
    """Load the releases; a file nested too deeply for the JSON parser is named."""
    try:
        return load_releases(paths)
    except RecursionError:
        for path in paths:
            try:
                json.loads(Path(path).read_text(encoding="utf-8"))
            except RecursionError:
                raise ReleaseValidationError(
                    f"{path}: JSON nested too deeply; expected a release document"
                ) from None
            except (OSError, ValueError):
                continue
        raise


def _run(args: argparse.Namespace) -> int:
    out_dir: Path = args.output_dir
    tmp: Path | None = None
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise FednipypeError(f"{out_dir}: exists and is not a folder")
        releases = _load(args.releases)
        terms = list(releases[0].doc["model"]["terms"])
        unknown = [t for t in args.terms or () if t not in terms]
        if unknown:
            raise FednipypeError(
                f"--terms: {', '.join(map(repr, unknown))} not in the releases' model terms "
                f"({', '.join(terms)})"
            )
        result = pool(
            releases,
            method=args.method,
            test=args.test,
            regions=args.regions,
            site_effects=not args.common_intercept,
        )
        out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.absolute().parent, prefix=f".{out_dir.name}.tmp-"))
        report = write_meta_report(result, tmp, terms=args.terms, plot_regions=args.regions)
        _install(tmp, out_dir)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    for note in report.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(
        f"pooled {len(result.releases)} release(s) ({', '.join(r.site for r in result.releases)}) "
        f"over {len(result.regions)} region(s): {out_dir / TSV_NAME}, "
        f"{len(report.plots)} forest plot(s), {out_dir / 'index.html'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
