"""The participant level from the command line: summary table, run, failures per subject.

Shared by the BIDS-App (``fednipype BIDS_DIR OUTPUT_DIR participant``) and the demo:
:func:`run_participant_wf` finds the site's probability maps (one pybids query), builds
:func:`~fednipype.workflows.participant.init_participant_wf`, runs it with any Nipype plugin,
and reads this run's crash files back into one :class:`Failure` per broken subject/session.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from nipype.utils.filemanip import loadcrash

from fednipype import features
from fednipype.atlas import Atlas, default_atlas
from fednipype.bids import DEFAULT_SPACE, ImageRecord, collect_probseg_maps
from fednipype.cli.console import Progress
from fednipype.derivatives import (
    FEATURES_DESC,
    FEATURES_SUFFIX,
    atlas_entity,
    derivative_path,
    describe_source,
)
from fednipype.images import bids_entities, open_image, unreadable_reason
from fednipype.workflows.participant import init_participant_wf

LOGGER = logging.getLogger(__name__)

#: Plugins that run jobs on this machine (forked workers share what the parent has loaded).
LOCAL_PLUGINS = frozenset({"Linear", "MultiProc", "LegacyMultiProc"})
#: Seconds between MultiProc's checks of its workers.  Nipype's default (2 s) would dominate
#: sub-second jobs; MultiProc starts at most n_procs jobs per check, so with ~50 ms jobs even
#: 0.1 s leaves workers idle (bench/README.md: siteB runs in 2.0 s at 0.1 s, 1.1 s at 0.02 s).
LOCAL_POLL_SLEEP_DURATION = 0.02

#: Columns of the summary table: key of :func:`fednipype.bids.summarize`'s rows, title.
SUMMARY_COLUMNS = [
    ("site", "site"),
    ("subjects", "subjects"),
    ("sessions", "sessions"),
    ("t1w", "T1w"),
    ("gm_probseg", "GM maps"),
    ("participants_rows", "phenotype rows"),
    ("age_missing", "age n/a"),
    ("phenotypes", "phenotype columns"),
]


def format_summary(rows: Sequence[dict]) -> str:
    """Render summary rows (from :func:`fednipype.bids.summarize`) as a text table.

    Examples
    --------
    >>> print(format_summary([{"site": "a", "subjects": 2, "sessions": 2, "t1w": 2,
    ...     "gm_probseg": 0, "participants_rows": 2, "age_missing": 0, "phenotypes": ["age"]}]))
    site  subjects  sessions  T1w  GM maps  phenotype rows  age n/a  phenotype columns
    a            2         2    2        0               2        0                age
    """
    table = pd.DataFrame(
        [{title: row[key] for key, title in SUMMARY_COLUMNS} for row in rows],
        columns=[title for _, title in SUMMARY_COLUMNS],
    )
    table["phenotype columns"] = table["phenotype columns"].map(", ".join)
    return table.to_string(index=False)


@dataclass
class Failure:
    """A subject/session whose features could not be computed."""

    subject: str
    session: str | None
    in_file: str
    node: str
    error: str
    crash_file: str | None = None

    def __str__(self) -> str:
        where = f"sub-{self.subject}" if self.subject else "workflow"
        where += f" ses-{self.session}" if self.session else ""
        crash = f" (crash file: {self.crash_file})" if self.crash_file else ""
        return f"{where}: {self.error}{crash}"


@dataclass
class ParticipantRunResult:
    """What :func:`run_participant_wf` did.

    Attributes
    ----------
    outputs : list of dict
        One entry per subject/session written: ``subject``, ``session``, ``in_file``,
        ``out_tsv``, ``out_json``.
    failures : list of Failure
        Subjects/sessions that failed, with the error message.
    n_jobs : int
        Subject/session images scheduled.
    output_dir, work_dir : pathlib.Path
        Where the derivatives and Nipype's working files are.
    elapsed_s : float
        Wall-clock time of the run.
    """

    outputs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    n_jobs: int = 0
    output_dir: Path | None = None
    work_dir: Path | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every subject/session succeeded."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "n_jobs": self.n_jobs,
            "n_outputs": len(self.outputs),
            "outputs": self.outputs,
            "failures": [asdict(f) for f in self.failures],
            "output_dir": str(self.output_dir),
            "work_dir": str(self.work_dir),
            "elapsed_s": self.elapsed_s,
        }


def default_work_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Nipype's working directory when none is given: a ``work`` folder beside the outputs.

    >>> str(default_work_dir("/data/derivatives/fednipype"))
    '/data/derivatives/work'
    """
    return Path(output_dir).absolute().parent / "work"


def run_participant_wf(
    *,
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    participant_label: list[str] | None = None,
    atlas: Atlas | None = None,
    space: str = DEFAULT_SPACE,
    label: str = "GM",
    work_dir: str | os.PathLike[str] | None = None,
    plugin: str = "MultiProc",
    plugin_args: dict[str, Any] | None = None,
    poll_sleep_duration: float | None = None,
    derivatives: bool | Sequence[str | os.PathLike[str]] = True,
    res: str | None = None,
    filters: dict[str, dict] | None = None,
    filter_source: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    name: str = "participant_wf",
) -> ParticipantRunResult:
    """Find a site's maps, build and run the participant workflow, report failures per subject.

    Nipype runs with ``stop_on_first_crash`` off; when some branches fail, Nipype's final
    ``RuntimeError`` is caught, the successful subjects' outputs stay written, and each
    failure is read back from this run's crash files and reported (logged as an error and
    returned).  A map that cannot be read at all (a dangling or looping symbolic link, e.g. a
    DataLad file never fetched) fails its subject before the run, with the reason.

    Parameters
    ----------
    bids_dir : path-like
        Root of the BIDS dataset; tissue probability maps are read from its derivatives
        (:func:`fednipype.bids.collect_probseg_maps`) or from ``derivatives``.
    output_dir : path-like
        Root of the derivative dataset written.
    participant_label : list of str, optional
        Subjects to process, with or without ``sub-``; all by default.
    atlas : fednipype.atlas.Atlas, optional
        Label atlas; by default fednipype's 2 mm default atlas.
    space, label : str
        ``space-`` and ``label-`` entities of the probability maps.
    work_dir : path-like, optional
        Nipype's working directory (its cache: re-running with the same one skips finished
        nodes).  Default: :func:`default_work_dir`, a ``work`` folder beside ``output_dir``.
    plugin : str
        Any Nipype execution plugin: ``Linear``, ``MultiProc`` (default), ``SLURM``,
        ``SGE``, ``PBS`` …
    plugin_args : dict, optional
        Passed to the plugin, e.g. ``{"n_procs": 2}`` for MultiProc or
        ``{"sbatch_args": "--mem=4G"}`` for SLURM.
    poll_sleep_duration : float, optional
        Seconds between the plugin's checks of running jobs.  By default
        :data:`LOCAL_POLL_SLEEP_DURATION` for local plugins (MultiProc schedules at most
        ``n_procs`` new jobs per check, so with sub-second jobs a long pause leaves workers
        idle) and Nipype's own default for cluster plugins, where each check queries the
        scheduler.
    derivatives : bool or sequence of path-like
        ``True``: maps from ``bids_dir/derivatives``; or derivative datasets elsewhere
        (fMRIPrep's or sMRIPrep's output).
    res : str, optional
        ``res-`` entity of the maps (default: native maps, see
        :func:`fednipype.bids.collect_probseg_maps`).
    filters : dict, optional
        A BIDS filter file's queries (``probseg``).
    filter_source : path-like, optional
        The filter file, named in errors.
    progress : Progress, optional
        Told of each finished subject/session (Nipype's ``status_callback``, local plugins).
    name : str
        Name of the workflow (and of its folder under ``work_dir``).

    Returns
    -------
    ParticipantRunResult
        Outputs written and failures (subject, session, file, node, error, crash file).

    Raises
    ------
    BIDSError
        If the dataset cannot be read or holds no image to process (nothing runs then).
    ImageError
        If the atlas's space differs from ``space``.
    """
    started = time.perf_counter()
    bids_dir = Path(bids_dir).absolute()
    output_dir = Path(output_dir).absolute()
    atlas = atlas or default_atlas(2)
    all_images = collect_probseg_maps(
        bids_dir,
        participant_label=participant_label,
        space=space,
        label=label,
        derivatives=derivatives,
        res=res,
        filters=(filters or {}).get("probseg"),
        filter_source=filter_source,
    )
    # Unreadable maps (dangling or looping links) fail alone, before Nipype sees them.
    unreadable = [
        Failure(i.subject, i.session, i.path, "", f"{i.path}: the map {reason}")
        for i in all_images
        if (reason := unreadable_reason(Path(i.path))) is not None
    ]
    skipped = {f.in_file for f in unreadable}
    images = [i for i in all_images if i.path not in skipped]
    result = ParticipantRunResult(n_jobs=len(all_images), output_dir=output_dir)
    if progress is not None:
        progress.total = len(all_images)
        for _ in unreadable:
            progress.advance(failed=True)
    if not images:
        result.failures = unreadable
        result.elapsed_s = time.perf_counter() - started
        return result

    sources, links = describe_source(bids_dir, output_dir)
    if not isinstance(derivatives, bool):
        for i, folder in enumerate(derivatives):
            more, more_links = describe_source(folder, output_dir, name=f"deriv{i + 1}")
            sources, links = sources + more, {**links, **more_links}
    workflow = init_participant_wf(
        in_files=[image.path for image in images],
        output_dir=output_dir,
        atlas=atlas,
        space=space,
        source_datasets=sources,
        dataset_links=links,
        name=name,
    )
    work_root = Path(work_dir or default_work_dir(output_dir)).absolute()
    workflow.base_dir = str(work_root)
    # A fresh crash folder per run: only this run's failures are reported.
    (work_root / "crash").mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    crash_dir = Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=work_root / "crash"))
    workflow.config["execution"].update(
        {"crashdump_dir": str(crash_dir), "crashfile_format": "pklz"}
    )
    if poll_sleep_duration is None and plugin in LOCAL_PLUGINS:
        poll_sleep_duration = LOCAL_POLL_SLEEP_DURATION
    if poll_sleep_duration is not None:
        workflow.config["execution"]["poll_sleep_duration"] = str(float(poll_sleep_duration))
    plugin_args = dict(plugin_args or {})
    if plugin in LOCAL_PLUGINS:
        _warm_up(atlas, images)
        if progress is not None and progress.enabled:
            plugin_args["status_callback"] = progress.node_status

    LOGGER.info(
        "participant workflow: %d image(s) from %s with %s; outputs in %s, work in %s",
        len(images),
        bids_dir,
        plugin,
        output_dir,
        work_root,
    )
    crashed = False
    # Nipype's MultiProc calls gc.collect() around every node it runs in this process; a full
    # collection walks every live object (pybids, pandas, nipype's graph: ~10^5 objects, about
    # 0.1 s each time), which would dominate the per-subject cost.  Freezing the objects that
    # exist now moves them out of the collector's reach for the run (CPython's gc.freeze).
    gc.collect()
    gc.freeze()
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # Nipype: "Workflow did not execute cleanly"
        crashed = True
        LOGGER.debug("Nipype reported failed nodes: %s", exc)
    finally:
        gc.unfreeze()

    result.work_dir = work_root
    result.elapsed_s = time.perf_counter() - started
    failures = unreadable + _collect_failures(crash_dir, images)
    failed_keys = {(f.subject, f.session) for f in failures}
    out_space = space or atlas.space
    for image in images:
        out_tsv = derivative_path(
            image.subject, image.session, desc=FEATURES_DESC, suffix=FEATURES_SUFFIX,
            extension=".tsv", space=out_space or None, atlas=atlas_entity(atlas.name),
            res=bids_entities(image.path).get("res"), output_dir=output_dir,
        )  # fmt: skip
        if (image.subject, image.session) in failed_keys:
            if out_tsv.exists():
                LOGGER.warning(
                    "%s: failed in this run; %s is left over from an earlier run",
                    image.key,
                    out_tsv,
                )
            continue
        if out_tsv.is_file():
            result.outputs.append(
                {
                    "subject": image.subject,
                    "session": image.session,
                    "in_file": image.path,
                    "out_tsv": str(out_tsv),
                    "out_json": str(out_tsv.with_suffix(".json")),
                }
            )
        else:  # no crash file but no output either: report rather than lose it
            failures.append(
                Failure(image.subject, image.session, image.path, "", "no output was written")
            )
    if crashed and not failures:
        failures.append(Failure("", None, "", "", "Nipype reported a failure (see its log)"))
    result.failures = failures
    for failure in failures:  # the caller reports them; the details are for -v
        LOGGER.info(
            "sub-%s%s failed (%s): %s [%s]",
            failure.subject,
            f" ses-{failure.session}" if failure.session else "",
            failure.in_file,
            failure.error,
            failure.crash_file or "no crash file",
        )
    LOGGER.info(
        "participant workflow: %d of %d image(s) done, %d failed, in %.1f s",
        len(result.outputs),
        len(all_images),
        len(failures),
        result.elapsed_s,
    )
    if not any(crash_dir.iterdir()):
        crash_dir.rmdir()
    return result


def _warm_up(atlas: Atlas, images: Sequence[ImageRecord]) -> None:
    """Import the feature code and cache the atlas (on the first image's grid) in this process.

    MultiProc's workers are forked from this process: they inherit the imports (scipy.ndimage
    alone takes ~0.6 s) and the cached atlas instead of each paying for them.  Failures are
    ignored here: the feature node reports them for its subject.
    """
    try:
        # The header is checked first: a corrupt one must not make the atlas resample onto
        # a huge grid here (the node reports the image's error for its subject).
        open_image(Path(images[0].path), "image")
        features.warm_atlas_cache(atlas.image, reference_image=images[0].path)
    except Exception as exc:  # broken first image or atlas: reported by the node itself
        LOGGER.debug("atlas warm-up skipped: %s", exc)


def _error_line(traceback_lines: list[str]) -> str:
    """The most informative line of a Nipype crash traceback: the exception the step raised.

    Nipype wraps a node's traceback (chained exceptions included) in its own
    ``NodeExecutionError``; the last fednipype exception in it carries the message meant for
    users (naming the file), else the last exception that is not Nipype's wrapper.

    >>> _error_line(["Traceback ...\\n", "ValueError: inner\\n",
    ...              "nipype.pipeline.engine.nodes.NodeExecutionError: wrapped\\n"])
    'ValueError: inner'
    """
    lines = [line.strip() for line in "".join(traceback_lines).splitlines() if line.strip()]
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded): .+$")
    matches = [line for line in lines if pattern.match(line)]
    ours = [line for line in matches if line.startswith("fednipype.")]
    if ours:
        return ours[-1]
    others = [line for line in matches if "NodeExecutionError" not in line]
    return (others or matches or lines or ["unknown error"])[-1]


def crash_errors(crash_dir: str | os.PathLike[str]) -> list[str]:
    """The error line of each crash file in ``crash_dir`` (see :func:`_error_line`)."""
    return [_read_crash(path)[1] for path in sorted(Path(crash_dir).glob("crash-*"))]


def _read_crash(path: Path) -> tuple[Any, str]:
    """The node of a crash file and its error line."""
    try:
        crash = loadcrash(str(path))
    except Exception as exc:  # a crash file we cannot unpickle still tells us a node failed
        return None, f"unreadable crash file ({type(exc).__name__}: {exc})"
    return crash.get("node"), _error_line(list(crash.get("traceback") or []))


def _collect_failures(crash_dir: Path, images: Sequence[ImageRecord]) -> list[Failure]:
    """Map this run's crash files back to subjects/sessions.

    Every node of a branch has the branch's image among its inputs: the feature node as
    ``in_file``, the sink as ``source_file``.
    """
    by_file = {image.path: image for image in images}
    failures: dict[str, Failure] = {}
    for crash_file in sorted(crash_dir.glob("crash-*")):
        node, error = _read_crash(crash_file)
        image = None
        if node is not None:
            for name in ("in_file", "source_file"):
                value = getattr(node.inputs, name, None)
                if isinstance(value, str) and value in by_file:
                    image = by_file[value]
                    break
        node_name = str(getattr(node, "fullname", "") or "")
        if image is None:
            failures[str(crash_file)] = Failure("", None, "", node_name, error, str(crash_file))
        elif image.key not in failures:  # the first node to fail in a branch is the cause
            failures[image.key] = Failure(
                image.subject, image.session, image.path, node_name, error, str(crash_file)
            )
    return list(failures.values())
