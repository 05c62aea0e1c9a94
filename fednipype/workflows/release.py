"""Group (site) level workflow: the participant level's feature tables → one DP release."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from fednipype.interfaces.release import DPRelease, FeatureFiles


def init_site_release_wf(
    *,
    bids_dir: str | os.PathLike[str],
    derivatives_dir: str | os.PathLike[str],
    policy: str | os.PathLike[str],
    epsilon: float,
    delta: float = 1e-5,
    site: str | None = None,
    release_file: str | os.PathLike[str] | None = None,
    release_dir: str | os.PathLike[str] | None = None,
    participant_label: list[str] | None = None,
    response: str = "volume_mm3",
    regions: list[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    name: str = "site_release_wf",
) -> pe.Workflow:
    """Build the site-level workflow that turns participant features into a DP release.

    It reads the regional-feature tables the participant workflow wrote to
    ``derivatives_dir`` (whatever succeeded there: a failed subject is simply absent) and the
    covariates of ``bids_dir/participants.tsv``, then runs :class:`DPRelease`, which charges
    the site's ledger and writes the release.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from fednipype.workflows.release import init_site_release_wf

            wf = init_site_release_wf(bids_dir="bids_examples/siteA",
                                      derivatives_dir="derivatives", policy="policy.toml",
                                      epsilon=1.0)

    Parameters
    ----------
    bids_dir : path-like
        The raw BIDS dataset (for ``participants.tsv``).
    derivatives_dir : path-like
        Output folder of the participant level.
    policy : path-like
        The site policy (TOML).
    epsilon, delta : float
        What the release spends.  ``epsilon`` has no default.
    site : str, optional
        Site label (default: the BIDS folder's name).
    release_file : path-like, optional
        Where to write the release; it must not exist (a release is never overwritten).
    release_dir : path-like, optional
        Otherwise, the folder where the release gets a unique name with its ledger and charge
        ids (:func:`fednipype.site.release.release_name`); default: a ``release`` folder beside
        ``derivatives_dir``, outside the derivative dataset.
    participant_label : list of str, optional
        Subjects to include (default: all with feature tables).
    response : str
        Feature column modelled per region.
    regions : list of str, optional
        Atlas regions to release, pre-registered (default: all).
    work_dir : path-like, optional
        Nipype's working directory (default: a ``work`` folder beside ``derivatives_dir``).
    name : str
        Workflow name.

    Outputs
    -------
    out_release
        The release file.

    Returns
    -------
    nipype.pipeline.engine.Workflow

    Examples
    --------
    >>> import pathlib, tempfile
    >>> policy = pathlib.Path(tempfile.mkdtemp()) / "policy.toml"
    >>> _ = policy.write_text("")  # read when the release runs, not when the graph is built
    >>> wf = init_site_release_wf(bids_dir="bids_examples/siteA", derivatives_dir="bids_examples",
    ...                           policy=policy, epsilon=1.0)
    >>> sorted(wf.list_node_names())
    ['dp_release', 'feature_files', 'outputnode']
    """
    bids_dir = Path(bids_dir).absolute()
    derivatives_dir = Path(derivatives_dir).absolute()
    site = site or bids_dir.name
    if release_file is None:
        release_dir = Path(release_dir or derivatives_dir.parent / "release").absolute()
        target = {"out_dir": str(release_dir)}
    else:
        target = {"out_file": str(Path(release_file).absolute())}
    work = Path(work_dir) if work_dir else derivatives_dir.parent / "work"

    workflow = pe.Workflow(name=name, base_dir=str(work))
    workflow.config["execution"] = {"crashdump_dir": str(work / "crash")}
    feature_files = pe.Node(
        FeatureFiles(
            derivatives_dir=str(derivatives_dir),
            **({"participant_label": list(participant_label)} if participant_label else {}),
        ),
        name="feature_files",
    )
    # Never reuse a cached release: each run is a new release with a new ledger charge.
    dp_release = pe.Node(
        DPRelease(
            participants_file=str(bids_dir / "participants.tsv"),
            policy_file=str(Path(policy).absolute()),
            epsilon=epsilon,
            delta=delta,
            site=site,
            response=response,
            **target,
            **({"regions": list(regions)} if regions else {}),
        ),
        name="dp_release",
        overwrite=True,
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_release"]), name="outputnode")
    # fmt: off
    workflow.connect([
        (feature_files, dp_release, [("out_features", "in_features")]),
        (dp_release, outputnode, [("out_release", "out_release")]),
    ])
    # fmt: on
    return workflow
