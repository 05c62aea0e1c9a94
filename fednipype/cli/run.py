"""Entry point of the ``fednipype`` BIDS-App: a thin layer over the library and workflows.

``participant`` extracts regional features of each subject/session into ``output_dir``
(private derivatives); ``group`` turns those features into the site's DP release, charged to
the ledger the ``--policy`` names, written outside the derivative dataset. Pre-flight checks
(:mod:`fednipype.cli.preflight`) run first; every failure is one line on stderr and an exit
code (:mod:`fednipype.cli.errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fednipype import exceptions
from fednipype.cli.console import Progress, configure_nipype, setup_logging
from fednipype.cli.errors import EXIT_OK, EXIT_PARTIAL, guarded, report
from fednipype.cli.parser import PROG, build_parser

LOGGER = logging.getLogger("fednipype.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the BIDS-App and return its exit code (see ``fednipype --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    if args.notrack:
        os.environ["NIPYPE_NO_ET"] = "1"  # read when Nipype is imported
    return guarded(PROG, lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> int:
    # Imported here: Nipype, pybids and nibabel take about a second; `fednipype --help` and a
    # usage error need not.
    from fednipype.cli import preflight

    configure_nipype(args.verbose)
    if args.analysis_level == "participant":
        return _participant(args, preflight.check_participant(args))
    return _group(args, preflight.check_group(args))


@contextlib.contextmanager
def _thread_limit(n_threads: int | None) -> Iterator[None]:
    """Limit the threads of numerical libraries (``--omp-nthreads``) for the run."""
    if n_threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(limits=n_threads):
        yield


def _participant(args: argparse.Namespace, setup) -> int:
    from fednipype.bids import load_layout, summarize
    from fednipype.cli.participant import format_summary, run_participant_wf

    layout = load_layout(setup.bids_dir, derivatives=setup.derivatives)
    row = summarize(
        setup.bids_dir,
        args.participant_label,
        filters=setup.filters,
        filter_source=setup.filter_file,
        layout=layout,
    )
    print(format_summary([{"site": setup.bids_dir.name, **row}]))
    progress = Progress(0, "subjects")
    with _thread_limit(args.omp_nthreads):
        try:
            result = run_participant_wf(
                bids_dir=setup.bids_dir,
                output_dir=setup.output_dir,
                participant_label=args.participant_label,
                atlas=setup.atlas,
                space=args.space,
                label=args.label,
                work_dir=setup.work_dir,
                plugin=setup.plugin,
                plugin_args=setup.plugin_args,
                derivatives=setup.derivatives,
                res=args.res,
                filters=setup.filters,
                filter_source=setup.filter_file,
                progress=progress,
            )
        finally:
            progress.close()
    print(
        f"fednipype: {len(result.outputs)}/{result.n_jobs} feature tables in "
        f"{setup.output_dir} ({result.elapsed_s:.1f} s)"
    )
    _site_report(setup, failures=result.failures)
    for failure in result.failures:
        report(PROG, _failure_line(failure))
        if failure.crash_file:
            LOGGER.info("crash file of %s: %s", failure.in_file, failure.crash_file)
    return EXIT_PARTIAL if result.failures else EXIT_OK


def _failure_line(failure) -> str:
    """``sub-X[ ses-Y]: <message>`` without the exception's module path.

    >>> from fednipype.cli.participant import Failure
    >>> _failure_line(Failure("02", None, "m.nii.gz", "n",
    ...                       "fednipype.exceptions.ImageError: m.nii.gz: truncated"))
    'sub-02: m.nii.gz: truncated'
    """
    where = f"sub-{failure.subject}" if failure.subject else "workflow"
    where += f" ses-{failure.session}" if failure.session else ""
    name, sep, message = failure.error.partition(": ")
    if sep and name.startswith("fednipype.") and " " not in name:
        return f"{where}: {message}"
    return f"{where}: {failure.error}"


def _group(args: argparse.Namespace, setup) -> int:
    from fednipype.cli.participant import crash_errors
    from fednipype.workflows.release import init_site_release_wf

    workflow = init_site_release_wf(
        bids_dir=setup.bids_dir,
        derivatives_dir=setup.output_dir,
        policy=args.policy.expanduser().absolute(),
        epsilon=args.epsilon,
        delta=args.delta,
        site=setup.site,
        release_dir=setup.release_dir,
        regions=setup.regions,
        participant_label=args.participant_label,
        work_dir=setup.work_dir,
    )
    crash_root = setup.work_dir / "crash"
    crash_root.mkdir(parents=True, exist_ok=True)
    crash_dir = Path(tempfile.mkdtemp(prefix=f"group-{time.strftime('%Y%m%d-%H%M%S')}-",
                                      dir=crash_root))  # fmt: skip
    workflow.config["execution"].update(
        {"crashdump_dir": str(crash_dir), "crashfile_format": "pklz"}
    )
    try:
        graph = workflow.run(plugin="Linear")
    except RuntimeError as err:
        # Nipype reports a failed node as RuntimeError; its crash file holds the cause.
        errors = crash_errors(crash_dir)
        raise _from_crash(errors[0] if errors else str(err)) from None
    release = setup.release_dir
    for node in graph.nodes():
        if node.name == "dp_release" and node.result is not None:
            release = Path(node.result.outputs.out_release)
    print(f"fednipype: release written to {release}")
    _site_report(setup, releases=[release])
    return EXIT_OK


def _from_crash(line: str) -> Exception:
    """The exception a crash file's error line names (``module.Class: message``).

    >>> type(_from_crash("fednipype.exceptions.PrivacyBudgetExceeded: over")).__name__
    'PrivacyBudgetExceeded'
    """
    name, sep, message = line.partition(": ")
    cls = getattr(exceptions, name.rsplit(".", 1)[-1], None) if sep else None
    if isinstance(cls, type) and issubclass(cls, exceptions.FednipypeError):
        return cls(message)
    return exceptions.FednipypeError(f"the release failed: {line}; nothing was released")


def _site_report(setup, *, failures=(), releases=()) -> None:
    """Write the site's HTML report into the output folder; a failure there is a warning."""
    try:
        from fednipype.site.report import write_site_report  # matplotlib: only when writing
    except ImportError:
        return
    try:
        page = write_site_report(
            setup.output_dir,
            bids_dir=setup.bids_dir,
            policy=setup.policy,
            releases=releases,
            failures=failures,
        )
    except Exception as err:  # the report is a convenience: never fail the run for it
        LOGGER.warning("the site report could not be written: %s", err)
        return
    print(f"fednipype: site report {page}", file=sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
