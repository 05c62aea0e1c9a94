"""Example for a site: regional features of its participants, then serve them to a federation.

A site joins a federated training (or a federated analysis) in two steps, both here:

1. **Participant features**: :func:`fednipype.workflows.participant.init_participant_wf` runs
   over the dataset's grey-matter probability maps (one branch per subject/session) and writes
   the regional features as a BIDS derivative dataset (what ``fednipype BIDS OUT participant``
   does). A lab with its own pipeline connects its segmentation's output here instead.
2. **Serve**: the site's Flower SuperNode (:func:`fednipype.federated.supernode.run_supernode`,
   what ``fednipype-site serve`` runs) connects to the consortium's SuperLink over TLS with the
   site's registered key and answers the hub's requests from those features until stopped
   (Ctrl-C or SIGTERM). Every request is checked against the site's policy and privacy
   ledger, and only requests the data owner approved (``fednipype-site approve``) are
   answered: a training request's whole (epsilon, delta) is charged before the first round.

Run::

    python workflows/site_serves_features.py bids_examples/siteA derivatives/siteA \\
        --policy policy.toml --site siteA --superlink hub.example.org:9092 \\
        --root-certificates ca.crt --auth-key siteA.key

``--features-only`` stops after step 1 (e.g. to review the tables before serving them). Like
fednipype's commands, a failure is one line on stderr and an exit code (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nipype.pipeline import engine as pe

from fednipype.atlas import default_atlas
from fednipype.bids import collect_probseg_maps
from fednipype.cli.errors import (
    ArgumentParser,
    HelpFormatter,
    PartialFailure,
    exit_epilog,
    guarded,
)
from fednipype.workflows.participant import init_participant_wf


def build_features(
    bids_dir: Path, derivatives: Path, work_dir: Path, participant_label: list[str] | None = None
) -> pe.Workflow:
    """Step 1: the participant workflow over the dataset's grey-matter maps."""
    images = collect_probseg_maps(bids_dir, participant_label=participant_label)
    workflow = init_participant_wf(
        in_files=[image.path for image in images],
        output_dir=derivatives,
        atlas=default_atlas(2),
        name="site_features_wf",
    )
    workflow.base_dir = str(work_dir)
    workflow.config["execution"].update(
        {"poll_sleep_duration": 0.1, "crashdump_dir": str(work_dir / "crash")}
    )
    return workflow


def serve(args: argparse.Namespace) -> int:
    """Step 2: the site's SuperNode on the features, in the foreground until stopped."""
    from fednipype.federated.supernode import check_site_node, run_supernode

    node = check_site_node(
        site=args.site,
        policy=args.policy,
        bids_dir=args.bids_dir,
        derivatives=args.derivatives,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
    )
    outcome = run_supernode(node)
    print(f"site node stopped: {outcome}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's arguments; a usage error is one line and exit code 2."""
    parser = ArgumentParser(
        prog="site_serves_features.py",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=exit_epilog(),
    )
    parser.add_argument("bids_dir", type=Path, help="the site's BIDS dataset")
    parser.add_argument("derivatives", type=Path, help="where the regional features go")
    parser.add_argument("--participant-label", nargs="+", help="subjects (default: all)")
    parser.add_argument("--work-dir", type=Path, help="Nipype's working folder")
    parser.add_argument("--features-only", action="store_true", help="stop after step 1")
    parser.add_argument("--policy", type=Path, help="the site's policy (bound to its ledger)")
    parser.add_argument("--site", help="the site's public label in the consortium's requests")
    parser.add_argument("--superlink", metavar="HOST:PORT", help="the consortium's SuperLink")
    parser.add_argument("--root-certificates", type=Path, help="the consortium CA (PEM)")
    parser.add_argument("--auth-key", type=Path, help="the site's registered private key")
    args = parser.parse_args(argv)
    needed = ("policy", "site", "superlink", "root_certificates", "auth_key")
    if not args.features_only and any(getattr(args, n) is None for n in needed):
        parser.error(
            "serving needs --policy, --site, --superlink, --root-certificates, --auth-key"
        )
    return args


def run(args: argparse.Namespace) -> int:
    """Step 1, then (without ``--features-only``) step 2."""
    args.bids_dir, args.derivatives = args.bids_dir.absolute(), args.derivatives.absolute()
    work_dir = (args.work_dir or args.derivatives.parent / "work").absolute()
    workflow = build_features(args.bids_dir, args.derivatives, work_dir, args.participant_label)
    try:
        workflow.run()
    except RuntimeError:  # Nipype's "did not execute cleanly": the crash files say why
        raise PartialFailure(
            f"some participants failed (see the crash files in {work_dir / 'crash'}); the "
            f"others' features are in {args.derivatives}"
        ) from None
    print(f"regional features written to {args.derivatives}")
    return 0 if args.features_only else serve(args)


def main(argv: list[str] | None = None) -> int:
    """Run the example; every failure is one line on stderr and a non-zero exit code."""
    args = parse_args(argv)
    return guarded("site_serves_features.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
