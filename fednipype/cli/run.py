"""Entry point of the ``fednipype`` BIDS-App: a thin layer over the library and workflows.

``participant`` extracts regional features of each subject/session into ``output_dir``
(private derivatives); ``group`` turns those features into the site's DP release, charged to
the ledger the ``--policy`` names.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fednipype.cli.parser import build_parser
from fednipype.exceptions import FednipypeError

LOGGER = logging.getLogger("fednipype.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the BIDS-App and return its exit code (0 success, 1 error, 2 usage).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.analysis_level == "group" and (args.policy is None or args.epsilon is None):
        parser.error("the group level needs --policy and --epsilon (no privacy default)")
    if (args.atlas is None) != (args.atlas_labels is None):
        parser.error("--atlas and --atlas-labels go together")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.analysis_level == "participant":
            return _participant(args)
        return _group(args)
    except FednipypeError as err:
        print(f"fednipype: error: {err}", file=sys.stderr)
        return 1


def _participant(args) -> int:
    # Imported here: Nipype, pybids and nibabel take about a second; `fednipype --help` need not.
    from fednipype.atlas import Atlas
    from fednipype.bids import summarize
    from fednipype.cli.participant import format_summary, run_participant_wf

    row = summarize(args.bids_dir, args.participant_label)
    print(format_summary([{"site": args.bids_dir.name, **row}]))
    atlas = (
        Atlas(args.atlas, args.atlas_labels, args.atlas.name.split(".")[0]) if args.atlas else None
    )
    plugin_args = dict(args.plugin_args or {})
    if args.n_procs and args.nipype_plugin == "MultiProc":
        plugin_args.setdefault("n_procs", args.n_procs)
    result = run_participant_wf(
        bids_dir=args.bids_dir,
        output_dir=args.output_dir,
        participant_label=args.participant_label,
        atlas=atlas,
        space=args.space,
        label=args.label,
        work_dir=args.work_dir,
        plugin=args.nipype_plugin,
        plugin_args=plugin_args,
    )
    print(
        f"fednipype: {len(result.outputs)}/{result.n_jobs} feature tables in "
        f"{args.output_dir} ({result.elapsed_s:.1f} s)"
    )
    for failure in result.failures:
        print(f"fednipype: error: {failure}", file=sys.stderr)
    return 0 if result.ok else 1


def _group(args) -> int:
    # Imported here: Nipype and pybids take about a second, and `fednipype --help` need not.
    from fednipype.workflows.release import init_site_release_wf

    site = args.site or args.bids_dir.name
    release = args.output_dir / "release" / f"{site}_release.json"
    workflow = init_site_release_wf(
        bids_dir=args.bids_dir,
        derivatives_dir=args.output_dir,
        policy=args.policy,
        epsilon=args.epsilon,
        delta=args.delta,
        site=site,
        release_file=release,
        participant_label=args.participant_label,
        work_dir=args.work_dir,
    )
    try:
        workflow.run(plugin="Linear")
    except RuntimeError as err:
        # Nipype reports a failed node as RuntimeError; its crash file holds the cause.
        print(
            f"fednipype: error: the release failed ({err}); nothing was released", file=sys.stderr
        )
        return 1
    print(f"fednipype: release written to {release}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
