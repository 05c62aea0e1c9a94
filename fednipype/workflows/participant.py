"""The participant-level workflow: regional features of every subject/session of a BIDS site.

One branch per subject and session (Nipype iterables), so a subject whose image is broken
fails alone: the others still finish and are written, and :func:`run_participant_wf` reports
each failure with its subject, session, file and error.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fednipype.exceptions import BIDSError, ImageError

if TYPE_CHECKING:
    from nipype.pipeline import engine as pe

    from fednipype.atlas import Atlas

LOGGER = logging.getLogger(__name__)

DESC = "regional"
SUFFIX = "features"
#: Plugins that run jobs on this machine (forked workers share what the parent has loaded).
LOCAL_PLUGINS = frozenset({"Linear", "MultiProc", "LegacyMultiProc"})
#: Seconds between MultiProc's checks of its workers.  Nipype's default (2 s) would dominate
#: sub-second jobs; MultiProc starts at most n_procs jobs per check, so with ~50 ms jobs even
#: 0.1 s leaves workers idle (bench/README.md: siteB runs in 2.0 s at 0.1 s, 1.1 s at 0.02 s).
LOCAL_POLL_SLEEP_DURATION = 0.02


@dataclass(frozen=True)
class ImageJob:
    """One subject/session image the workflow processes."""

    key: str
    subject: str
    session: str | None
    in_file: str


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


def collect_jobs(
    bids_dir: str | os.PathLike[str],
    *,
    participant_label: list[str] | None = None,
    space: str = "MNI152NLin2009cAsym",
    label: str = "GM",
) -> list[ImageJob]:
    """List the probability maps to process, one per subject/session.

    Parameters
    ----------
    bids_dir : path-like
        BIDS dataset whose ``derivatives/`` hold ``…_space-<space>_label-<label>_probseg``.
    participant_label : list of str, optional
        Subjects to keep (with or without ``sub-``); all by default.
    space, label : str
        Entities of the probability maps.

    Returns
    -------
    list of ImageJob
        Sorted by subject and session.

    Raises
    ------
    BIDSError
        If no map is found at all, or a subject/session has more than one.
    """
    from fednipype import bids

    layout = bids.load_layout(bids_dir, derivatives=True)
    subjects = bids.get_subjects(layout, participant_label)
    # One query for the whole dataset: per-subject queries cost seconds on a site of 30.
    records = bids.collect_images(layout, subjects, kind="probseg", label=label, space=space)
    by_key: dict[tuple[str, str | None], list[str]] = {}
    for record in records:
        by_key.setdefault((record.subject, record.session), []).append(record.path)
    jobs = []
    for (subject, session), files in sorted(
        by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        where = f"sub-{subject}" + (f" ses-{session}" if session else "")
        if len(files) > 1:
            raise BIDSError(
                f"{where}: {len(files)} space-{space} label-{label} probseg images match "
                f"({', '.join(Path(f).name for f in files)}); expected one"
            )
        key = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        jobs.append(ImageJob(key, subject, session, str(files[0])))
    if not jobs:
        raise BIDSError(
            f"{bids_dir}: no space-{space} label-{label} probseg image found in its derivatives"
        )
    return jobs


def default_work_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Nipype's working directory when none is given: a ``work`` folder beside the outputs.

    >>> str(default_work_dir("/data/derivatives/fednipype"))
    '/data/derivatives/work'
    """
    return Path(output_dir).absolute().parent / "work"


def init_participant_wf(
    *,
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    participant_label: list[str] | None = None,
    atlas: Atlas | None = None,
    space: str = "MNI152NLin2009cAsym",
    label: str = "GM",
    work_dir: str | os.PathLike[str] | None = None,
    name: str = "participant_wf",
) -> pe.Workflow:
    """Build the participant-level workflow: regional features of each subject/session.

    The BIDS dataset is queried when the workflow is built (:func:`collect_jobs`); each
    subject/session becomes one branch of the graph (Nipype iterables), so branches run in
    parallel and fail independently.  The feature node runs in the plugin's workers; the sinks
    are light and run in the main process (``run_without_submitting``).  The workflow is
    configured not to stop on the first crash; :func:`run_participant_wf` runs it with a
    polling interval suited to the plugin and reports failures per subject.

    Parameters
    ----------
    bids_dir : path-like
        Root of the BIDS dataset; tissue probability maps are read from its derivatives.
    output_dir : path-like
        Root of the derivative dataset written (``dataset_description.json`` and
        ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_desc-regional_features.tsv`` + ``.json``).
    participant_label : list of str, optional
        Subjects to process, with or without ``sub-``; all by default.
    atlas : fednipype.atlas.Atlas, optional
        Label atlas; by default fednipype's 2 mm default atlas (resampled by nearest
        neighbour to each image's grid).
    space : str
        Template space of the probability maps (their ``space-`` entity); must agree with the
        atlas's space when the atlas declares one.
    label : str
        Tissue of the probability maps (``label-`` entity), e.g. ``GM``.
    work_dir : path-like, optional
        Nipype's working directory (its cache: re-running with the same one skips finished
        nodes).  Default: :func:`default_work_dir`, a ``work`` folder beside ``output_dir``.
    name : str
        Name of the workflow (and of its folder under ``work_dir``).

    Inputs
    ------
    in_file, subject, session
        Iterated together (``inputnode.synchronize``): one branch per image found; session is
        ``""`` in datasets without sessions.

    Outputs
    -------
    out_tsv, out_json
        Per branch, the stored features table and sidecar (in ``output_dir``).

    Returns
    -------
    nipype.pipeline.engine.Workflow

    Raises
    ------
    BIDSError
        If the dataset cannot be read or holds no matching probability map.
    ImageError
        If the atlas's space differs from ``space``.

    Examples
    --------
    >>> wf = init_participant_wf(bids_dir="bids_examples/siteA", output_dir="derivatives")
    >>> sorted(wf.list_node_names())  # doctest: +NORMALIZE_WHITESPACE
    ['ds_description', 'ds_features', 'features', 'inputnode', 'outputnode']
    >>> len(wf.get_node("inputnode").iterables[0][1])  # 24 subjects x 2 sessions
    48
    """
    workflow, _ = _build_participant_wf(
        bids_dir=bids_dir,
        output_dir=output_dir,
        participant_label=participant_label,
        atlas=atlas,
        space=space,
        label=label,
        work_dir=work_dir,
        name=name,
    )
    return workflow


def _build_participant_wf(
    *,
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    participant_label: list[str] | None,
    atlas: Atlas | None,
    space: str,
    label: str,
    work_dir: str | os.PathLike[str] | None,
    name: str,
) -> tuple[pe.Workflow, list[ImageJob]]:
    """The workflow of :func:`init_participant_wf` and the jobs it iterates over."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from fednipype.atlas import default_atlas
    from fednipype.interfaces.bids import DerivativeDescription, DerivativesDataSink
    from fednipype.interfaces.features import RegionalFeatures

    atlas = atlas or default_atlas(2)
    if atlas.space and space and atlas.space != space:
        raise ImageError(
            f"{atlas.image}: the atlas is in space '{atlas.space}' but the images requested are "
            f"in space '{space}'"
        )
    bids_dir = Path(bids_dir).absolute()
    output_dir = Path(output_dir).absolute()
    jobs = collect_jobs(bids_dir, participant_label=participant_label, space=space, label=label)

    workflow = pe.Workflow(name=name, base_dir=str(Path(work_dir or default_work_dir(output_dir))))
    workflow.config["execution"] = {
        "stop_on_first_crash": "false",
        "remove_unnecessary_outputs": "false",
    }

    inputnode = pe.Node(
        niu.IdentityInterface(fields=["in_file", "subject", "session"]), name="inputnode"
    )
    # One branch per image; the three fields iterate together (synchronize).
    inputnode.iterables = [
        ("in_file", [job.in_file for job in jobs]),
        ("subject", [job.subject for job in jobs]),
        ("session", [job.session or "" for job in jobs]),
    ]
    inputnode.synchronize = True
    features = pe.Node(
        RegionalFeatures(
            atlas_file=str(atlas.image),
            atlas_labels=str(atlas.labels),
            atlas_name=atlas.name,
            image_kind="probseg",
            image_space=space,
            **({"atlas_space": atlas.space} if atlas.space else {}),
        ),
        name="features",
    )
    ds_features = pe.Node(
        DerivativesDataSink(base_directory=str(output_dir), desc=DESC, suffix=SUFFIX),
        name="ds_features",
        run_without_submitting=True,
    )
    ds_description = pe.Node(
        DerivativeDescription(output_dir=str(output_dir), source_datasets=[bids_dir.as_uri()]),
        name="ds_description",
        run_without_submitting=True,
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_tsv", "out_json"]), name="outputnode")
    # fmt: off
    workflow.connect([
        (inputnode, features, [("in_file", "in_file")]),
        (inputnode, ds_features, [("subject", "subject"), ("session", "session")]),
        (features, ds_features, [("out_tsv", "in_file"), ("out_json", "meta_file")]),
        (ds_features, outputnode, [("out_file", "out_tsv"), ("out_meta", "out_json")]),
    ])
    # fmt: on
    workflow.add_nodes([ds_description])
    return workflow, jobs


def _error_line(traceback_lines: list[str]) -> str:
    """The most informative line of a Nipype crash traceback: the exception the step raised.

    Nipype wraps a node's traceback (chained exceptions included) in its own
    ``NodeExecutionError``; the last fednipype exception in it carries the message meant for
    users (naming the file), else the last exception that is not Nipype's wrapper.
    """
    lines = [line.strip() for line in "".join(traceback_lines).splitlines() if line.strip()]
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded): .+$")
    matches = [line for line in lines if pattern.match(line)]
    ours = [line for line in matches if line.startswith("fednipype.")]
    if ours:
        return ours[-1]
    others = [line for line in matches if "NodeExecutionError" not in line]
    return (others or matches or lines or ["unknown error"])[-1]


def _read_crash(path: Path) -> tuple[Any, str]:
    from nipype.utils.filemanip import loadcrash

    try:
        crash = loadcrash(str(path))
    except Exception as exc:  # a crash file we cannot unpickle still tells us a node failed
        return None, f"unreadable crash file ({type(exc).__name__}: {exc})"
    return crash.get("node"), _error_line(list(crash.get("traceback") or []))


def run_participant_wf(
    *,
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    participant_label: list[str] | None = None,
    atlas: Atlas | None = None,
    space: str = "MNI152NLin2009cAsym",
    label: str = "GM",
    work_dir: str | os.PathLike[str] | None = None,
    plugin: str = "MultiProc",
    plugin_args: dict[str, Any] | None = None,
    poll_sleep_duration: float | None = None,
    name: str = "participant_wf",
) -> ParticipantRunResult:
    """Build and run the participant-level workflow; one failing subject does not stop others.

    Nipype runs with ``stop_on_first_crash`` off; when some branches fail, Nipype's final
    ``RuntimeError`` is caught, the successful subjects' outputs stay written, and each
    failure is read back from this run's crash files and reported (logged as an error and
    returned).

    Parameters
    ----------
    bids_dir, output_dir, participant_label, atlas, space, label, work_dir, name
        As for :func:`init_participant_wf`.
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

    Returns
    -------
    ParticipantRunResult
        Outputs written and failures (subject, session, file, node, error, crash file).

    Raises
    ------
    BIDSError
        If the dataset holds no image to process (nothing runs then).
    """
    started = time.perf_counter()
    workflow, jobs = _build_participant_wf(
        bids_dir=bids_dir,
        output_dir=output_dir,
        participant_label=participant_label,
        atlas=atlas,
        space=space,
        label=label,
        work_dir=work_dir,
        name=name,
    )
    output_dir = Path(output_dir).absolute()
    work_root = Path(workflow.base_dir)
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
    if plugin in LOCAL_PLUGINS:
        _warm_up(workflow, jobs)

    plugin_args = dict(plugin_args or {})
    LOGGER.info(
        "participant workflow: %d image(s) from %s with %s; outputs in %s, work in %s",
        len(jobs),
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

    result = ParticipantRunResult(
        n_jobs=len(jobs),
        output_dir=output_dir,
        work_dir=work_root,
        elapsed_s=time.perf_counter() - started,
    )
    failures = _collect_failures(crash_dir, jobs)
    failed_keys = {f.subject + "\0" + (f.session or "") for f in failures}
    from fednipype.bids import derivative_path

    for job in jobs:
        out_tsv = derivative_path(
            job.subject, job.session, desc=DESC, suffix=SUFFIX, extension=".tsv",
            output_dir=output_dir,
        )  # fmt: skip
        job_id = job.subject + "\0" + (job.session or "")
        if job_id in failed_keys:
            if out_tsv.exists():
                LOGGER.warning(
                    "%s: failed in this run; %s is left over from an earlier run", job.key, out_tsv
                )
            continue
        if out_tsv.is_file():
            result.outputs.append(
                {
                    "subject": job.subject,
                    "session": job.session,
                    "in_file": job.in_file,
                    "out_tsv": str(out_tsv),
                    "out_json": str(out_tsv.with_suffix(".json")),
                }
            )
        else:  # no crash file but no output either: report rather than lose it
            failures.append(
                Failure(job.subject, job.session, job.in_file, "", "no output was written")
            )
    if crashed and not failures:
        failures.append(Failure("", None, "", "", "Nipype reported a failure (see its log)"))
    result.failures = failures
    for failure in failures:
        LOGGER.error(
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
        len(jobs),
        len(failures),
        result.elapsed_s,
    )
    if not any(crash_dir.iterdir()):
        crash_dir.rmdir()
    return result


def _warm_up(workflow: pe.Workflow, jobs: list[ImageJob]) -> None:
    """Import the feature code and cache the atlas (on the first image's grid) in this process.

    MultiProc's workers are forked from this process: they inherit the imports (scipy.ndimage
    alone takes ~0.6 s) and the cached atlas instead of each paying for them.  Failures are
    ignored here: the feature node reports them for its subject.
    """
    from fednipype import features

    node = workflow.get_node("features")
    try:
        features.warm_atlas_cache(node.inputs.atlas_file, reference_image=jobs[0].in_file)
    except Exception as exc:  # broken first image or atlas: reported by the node itself
        LOGGER.debug("atlas warm-up skipped: %s", exc)


def _collect_failures(crash_dir: Path, jobs: list[ImageJob]) -> list[Failure]:
    """Map this run's crash files back to subjects/sessions."""
    by_file = {job.in_file: job for job in jobs}
    by_entities = {(job.subject, job.session or ""): job for job in jobs}
    failures: dict[str, Failure] = {}
    for crash_file in sorted(crash_dir.glob("crash-*")):
        node, error = _read_crash(crash_file)
        job = None
        if node is not None:
            inputs = node.inputs
            in_file = getattr(inputs, "in_file", None)
            subject = getattr(inputs, "subject", None)
            session = getattr(inputs, "session", None)
            if isinstance(in_file, str) and in_file in by_file:  # the feature node
                job = by_file[in_file]
            elif isinstance(subject, str):  # a sink
                job = by_entities.get((subject, session if isinstance(session, str) else ""))
        node_name = str(getattr(node, "fullname", "") or "")
        if job is None:
            failures[str(crash_file)] = Failure("", None, "", node_name, error, str(crash_file))
        elif job.key not in failures:  # the first node to fail in a branch is the cause
            failures[job.key] = Failure(
                job.subject, job.session, job.in_file, node_name, error, str(crash_file)
            )
    return list(failures.values())
